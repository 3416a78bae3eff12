//! The Kubernetes resource model skiff serves, with no I/O: the resource table, `Status` errors,
//! object-meta helpers, selectors, validation, defaulting, strategic merge patch and Table output.

pub mod defaults;
pub mod meta;
pub mod resources;
pub mod selector;
pub mod smp;
pub mod ssa;
pub mod status;
pub mod table;
pub mod validation;

pub use resources::{RESOURCES, ResourceInfo};
pub use status::{ApiError, Cause};
