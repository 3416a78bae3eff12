//! Integration tests of this crate, in one test binary (one link instead of one per file:
//! test binaries link every dependency, and disk on the build machines is limited).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
mod containerd;
mod containers;
mod cri_containerd;
mod images;
mod pull;
mod trait_object;
