//! skiff-runtime: images (store, import, unpack), overlay rootfs, and containers held by
//! per-container shims running youki's libcontainer. Knows no Kubernetes types.

pub mod api;
pub mod cgroup;
pub mod cri;
pub mod crilog;
pub mod error;
pub mod pull;
pub mod reference;
pub mod runtime;
pub mod sandbox;
pub mod shim;
pub mod spec;
pub mod store;
pub mod unpack;

pub use api::{
    AttachSession, DuplexStream, ExecSession, ImageFs, ImageInfo, Runtime, SandboxState,
    SandboxStatus, StreamRequest,
};
pub use cri::CriRuntime;
pub use error::{Error, Result};
pub use runtime::{
    Attach, AttachStream, BuiltinRuntime, ContainerState, ContainerStatus, ExecOutput, ExecProcess,
    RuntimeConfig,
};
pub use sandbox::{Sandbox, SandboxConfig};
pub use spec::{ContainerConfig, Device, Mount, MountKind, Resources};
pub use store::{ImageEntry, ImageStore};
