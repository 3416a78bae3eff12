//! Shared helpers for the net crate's root tests: throwaway namespaces (skiff-lab nodes),
//! running code inside them, and listing what is left in them.
#![allow(dead_code)]

use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;

use skiff_lab::Node;

/// Panics with a clear message unless running as root (CI runs these tests as root).
pub fn require_root() {
    if let Err(e) = skiff_lab::require_root() {
        panic!(
            "this test needs root (it creates network namespaces, links and nftables tables): {e}"
        );
    }
}

/// A throwaway namespace set (network, mount, UTS, PID) holding a `sleep infinity`.
pub fn netns_node(name: &str) -> Node {
    require_root();
    let mut sleep = Command::new("sleep");
    sleep.arg("infinity");
    Node::builder(name).spawn(sleep).expect("spawn a lab node")
}

/// Runs `f` on a thread inside the network namespace `ns`.
pub fn in_netns<T: Send>(node: &Node, f: impl FnOnce() -> T + Send) -> T {
    let fd = node.netns();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Output of `cmd args` run inside `node` (all of its namespaces); panics when it fails.
pub fn run_in(node: &Node, cmd: &str, args: &[&str]) -> String {
    let mut c = Command::new(cmd);
    c.args(args);
    let out = node
        .exec_in(c)
        .expect("prepare command")
        .output()
        .expect("run command in node");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names of the links in `node`'s network namespace.
pub fn links(node: &Node) -> Vec<String> {
    run_in(node, "ip", &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
