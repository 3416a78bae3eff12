//! skiff-bench as a library: hollow nodes for scale tests and the end-to-end tests.

pub mod hollow;
