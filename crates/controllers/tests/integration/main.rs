//! Integration tests of this crate, in one test binary (one link instead of one per file:
//! test binaries link every dependency, and disk on the build machines is limited).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
mod cronjob;
mod daemonset;
mod deployment;
mod disruption;
mod endpoints;
mod events;
mod gc;
mod job;
mod namespaces;
mod nodes;
mod replicaset;
mod statefulset;
