//! The network crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while wiring pods, allocating addresses or applying rules.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An address or CIDR could not be parsed or does not fit.
    #[error("invalid network value {input:?}: {reason}")]
    Invalid {
        /// What the caller gave.
        input: String,
        /// Why it was refused.
        reason: String,
    },
    /// Every address of the pod CIDR is taken.
    #[error(
        "no free address left in {cidr} ({allocated} allocated); detach unused sandboxes or give the node a larger pod CIDR"
    )]
    PoolExhausted {
        /// The pod CIDR.
        cidr: String,
        /// How many addresses are allocated.
        allocated: usize,
    },
    /// The IPAM state on disk cannot be used.
    #[error("ipam state {path}: {reason}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A link the caller named is missing.
    #[error("link {name:?} not found; call Network::ensure_bridge first or check the name")]
    NoSuchLink {
        /// The link name.
        name: String,
    },
    /// A netlink request failed.
    #[error("netlink: {op} failed: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// An I/O or system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused or failed.
    #[error("nft: {op} failed ({status}): {stderr}")]
    Nft {
        /// What was being done.
        op: String,
        /// The exit status.
        status: String,
        /// What nft printed on stderr.
        stderr: String,
    },
}

impl NetError {
    pub(crate) fn io(op: impl Into<String>, source: impl Into<std::io::Error>) -> NetError {
        NetError::Io {
            op: op.into(),
            source: source.into(),
        }
    }

    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> NetError {
        NetError::Netlink {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn invalid(input: impl Into<String>, reason: impl Into<String>) -> NetError {
        NetError::Invalid {
            input: input.into(),
            reason: reason.into(),
        }
    }
}
