//! Integration tests of this crate, in one test binary (one link instead of one per file:
//! test binaries link every dependency, and disk on the build machines is limited).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod cni;
mod common;
mod network;
mod nft;
mod overlay;
