//! The error type of the runtime crate.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed on a path.
    #[error("{op} {path}: {source}")]
    Io {
        /// what was being done
        op: &'static str,
        /// the path it was done to
        path: PathBuf,
        /// the underlying error
        #[source]
        source: std::io::Error,
    },
    /// An image reference could not be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// the reference as given
        reference: String,
        /// why it is invalid
        reason: String,
    },
    /// A blob's content does not match its digest.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// what was being verified
        what: String,
        /// the expected digest
        expected: String,
        /// the digest of the content
        actual: String,
    },
    /// An image archive or layer is malformed or unsafe.
    #[error("invalid image content in {path}: {reason}")]
    InvalidImage {
        /// the archive or layer
        path: PathBuf,
        /// what is wrong with it
        reason: String,
    },
    /// A layer entry would escape the layer root.
    #[error(
        "layer {layer}: entry {entry:?} escapes the layer root ({reason}); refusing to unpack this image"
    )]
    UnsafeLayerEntry {
        /// the layer blob
        layer: String,
        /// the entry path
        entry: String,
        /// why it is refused
        reason: &'static str,
    },
    /// The image is not in the store.
    #[error("image {0} not found in the image store; import or pull it first")]
    ImageNotFound(String),
    /// A container or sandbox is not known.
    #[error("{kind} {id} not found")]
    NotFound {
        /// "container" or "sandbox"
        kind: &'static str,
        /// its id
        id: String,
    },
    /// An operation is not possible in the current state.
    #[error("{0}")]
    InvalidState(String),
    /// A JSON document could not be read or written.
    #[error("json {path}: {source}")]
    Json {
        /// the document
        path: PathBuf,
        /// the underlying error
        #[source]
        source: serde_json::Error,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Sys {
        /// what was being done
        op: String,
        /// the errno
        #[source]
        source: nix::Error,
    },
    /// libcontainer reported an error (inside the shim).
    #[error("libcontainer: {0}")]
    Container(String),
    /// The shim failed; its message is included.
    #[error("shim for container {id} failed: {message}")]
    Shim {
        /// the container id
        id: String,
        /// what the shim reported
        message: String,
    },
    /// The OCI spec could not be built.
    #[error("oci spec: {0}")]
    Spec(String),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::Io`] closure for `map_err`.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}

/// Builds an [`Error::Sys`] closure for `map_err`.
pub(crate) fn sys_err(op: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
    let op = op.into();
    move |source| Error::Sys { op, source }
}
