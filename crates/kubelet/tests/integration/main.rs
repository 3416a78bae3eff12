//! Integration tests of this crate, in one test binary (one link instead of one per file:
//! test binaries link every dependency, and disk on the build machines is limited).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

// skiff-runtime's test images and containerd harness, shared rather than copied.
#[path = "../../../runtime/tests/integration/common/layers.rs"]
mod common;
#[path = "../../../runtime/tests/integration/containerd.rs"]
mod containerd;
mod eviction_cri;
mod pods;
mod server;
