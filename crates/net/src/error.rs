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
    /// A CNI network configuration cannot be used.
    #[error("CNI config {path}: {reason}")]
    CniConfig {
        /// The file (or the conf dir when no file fits).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A CNI plugin binary is not in the bin dirs.
    #[error(
        "CNI plugin {plugin:?} not found in the CNI bin dirs ({dirs}); install it there (Debian: containernetworking-plugins in /usr/lib/cni) or fix --cni-bin-dir"
    )]
    CniPluginMissing {
        /// The plugin type (binary name).
        plugin: String,
        /// The dirs searched.
        dirs: String,
    },
    /// A CNI plugin failed.
    #[error("CNI plugin {plugin} {command} failed: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
    Cni {
        /// The plugin type.
        plugin: String,
        /// ADD, DEL or CHECK.
        command: String,
        /// The CNI error code (0: the plugin printed none).
        code: u32,
        /// Its message.
        msg: String,
        /// Its details, or what it printed on stderr.
        details: String,
    },
    /// A CNI plugin did not finish in time (it was killed).
    #[error("CNI plugin {plugin} {command} did not finish within {after:?} and was killed")]
    CniTimeout {
        /// The plugin type.
        plugin: String,
        /// ADD, DEL or CHECK.
        command: String,
        /// The time limit.
        after: std::time::Duration,
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
