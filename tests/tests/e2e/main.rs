//! Integration tests of this crate, in one test binary (one link instead of one per file:
//! test binaries link every dependency, and disk on the build machines is limited).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod admission;
mod bad_input;
mod controllers;
mod kubectl;
mod lifecycle;
mod node_cni_plugins;
mod node_cri;
mod node_eviction;
mod node_multinode;
mod node_pods;
mod node_service_account;
mod node_services;
mod openapi_v2;
mod protobuf;
mod python_client;
mod service_account;
mod shared_datastore;
