//! Throwaway nodes on one machine: a process in fresh network, mount, UTS and PID namespaces,
//! optionally wired to a lab bridge by a veth pair. Everything a node or bridge creates is removed
//! when it is dropped (also while unwinding from a panic).
//!
//! ```no_run
//! use std::process::Command;
//! use std::time::Duration;
//! use skiff_lab::{Bridge, Link, Node};
//!
//! # fn main() -> Result<(), skiff_lab::LabError> {
//! let bridge = Bridge::create(&skiff_lab::unique_name("skl"), "10.99.0.1/24")?;
//! let mut node = Node::builder("n1")
//!     .link(Link::new(bridge.name(), "10.99.0.2/24"))
//!     .spawn(sleeper())?;
//! let mut ip = Command::new("ip");
//! ip.args(["-br", "addr"]);
//! let out = node.exec_in(ip)?.output();
//! node.stop(Duration::from_secs(1))?;
//! # drop(out);
//! # Ok(())
//! # }
//! # fn sleeper() -> Command { let mut c = Command::new("sleep"); c.arg("infinity"); c }
//! ```
//!
//! Links are made with rtnetlink (no `ip` binary). The PID namespace is entered the way
//! `unshare --fork` does it, but in-process from a `pre_exec` hook (see `src/nsexec.rs`).

mod bridge;
mod error;
mod netlink;
mod node;
mod nsexec;

pub use bridge::Bridge;
pub use error::LabError;
pub use node::{Link, Node, NodeBuilder};

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh name `<prefix>-<8 hex digits>`, unique enough for parallel tests and labs
/// (interface names must stay within 15 bytes, so keep `prefix` at 6 bytes or fewer).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", short_id())
}

/// 8 random hex digits (std's per-process random hasher keys, mixed with pid, time and a counter).
pub(crate) fn short_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("{:08x}", h.finish() as u32)
}

/// Fails with [`LabError::NotRoot`] unless the effective uid is 0 (namespaces and links need it).
pub fn require_root() -> Result<(), LabError> {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        Ok(())
    } else {
        Err(LabError::NotRoot { uid: uid.as_raw() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_short_and_distinct() {
        let a = unique_name("skl");
        let b = unique_name("skl");
        assert_ne!(a, b);
        assert_eq!(a.len(), 12);
        assert!(a.starts_with("skl-"));
    }
}
