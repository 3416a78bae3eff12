//! The lab's error type.

/// Everything that can go wrong while building or tearing down a node or bridge.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Namespaces and links need root.
    #[error("the lab needs root (namespaces, links): running as uid {uid}; run as root")]
    NotRoot {
        /// The effective uid that was found.
        uid: u32,
    },
    /// An address was not an IPv4 CIDR.
    #[error("invalid address {input:?}: expected an IPv4 address with prefix, like 10.99.0.2/24")]
    InvalidAddr {
        /// What the caller gave.
        input: String,
    },
    /// A node, host or interface name is unusable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// What the caller gave.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A link with this name exists already; the lab never adopts links it did not create.
    #[error("link {name:?} already exists; pick another name (see skiff_lab::unique_name)")]
    Exists {
        /// The link name.
        name: String,
    },
    /// A link the caller named is not there.
    #[error("link {name:?} not found; create it first (Bridge::create)")]
    NoSuchLink {
        /// The link name.
        name: String,
    },
    /// A netlink request failed.
    #[error("netlink: {op} failed: {source}")]
    Netlink {
        /// What was attempted, naming the link.
        op: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was attempted, naming the path or object.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    pub(crate) fn io(op: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        LabError::Io {
            op: op.into(),
            source: source.into(),
        }
    }

    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        LabError::Netlink {
            op: op.into(),
            source,
        }
    }
}
