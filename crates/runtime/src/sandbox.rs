//! Pod sandboxes: network, UTS and IPC namespaces pinned by bind mounts under the runtime's
//! state dir (so they outlive processes), with the pod hostname set.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, io_err, sys_err};

/// What a pod sandbox is made of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SandboxConfig {
    /// a name (part of the id)
    pub name: String,
    /// the pod's hostname
    pub hostname: String,
    /// use the host's network namespace (no netns is created)
    #[serde(default)]
    pub host_network: bool,
    /// use the host's IPC namespace
    #[serde(default)]
    pub host_ipc: bool,
}

/// A created sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sandbox {
    /// its id
    pub id: String,
    /// how it was asked for
    pub config: SandboxConfig,
    /// the pinned network namespace, for the pod network (None with host network)
    pub netns: Option<PathBuf>,
    /// the pinned UTS namespace
    pub utsns: PathBuf,
    /// the pinned IPC namespace (None with host IPC)
    pub ipcns: Option<PathBuf>,
    /// the pod cgroup (relative to the cgroup root)
    pub cgroup: String,
    /// creation time (ns since epoch)
    pub created_at: i64,
}

/// Creates namespace files in `dir` and pins fresh namespaces onto them.
pub(crate) fn pin_namespaces(
    dir: &Path,
    cfg: &SandboxConfig,
) -> Result<(Option<PathBuf>, PathBuf, Option<PathBuf>)> {
    let mut flags = CloneFlags::CLONE_NEWUTS;
    let mut pins: Vec<(&str, PathBuf)> = vec![("uts", dir.join("uts"))];
    if !cfg.host_network {
        flags |= CloneFlags::CLONE_NEWNET;
        pins.push(("net", dir.join("net")));
    }
    if !cfg.host_ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
        pins.push(("ipc", dir.join("ipc")));
    }
    for (_, p) in &pins {
        File::create(p).map_err(io_err("create namespace file", p))?;
    }
    let hostname = cfg.hostname.clone();
    let pins2 = pins.clone();
    // A dedicated thread: unshare changes only this thread's namespaces, and the thread ends
    // right after, so no other task ever runs inside them.
    let res = std::thread::spawn(move || -> Result<()> {
        unshare(flags).map_err(sys_err("unshare pod namespaces"))?;
        nix::unistd::sethostname(&hostname)
            .map_err(sys_err(format!("set pod hostname {hostname:?}")))?;
        for (ns, p) in &pins2 {
            let src = format!("/proc/thread-self/ns/{ns}");
            mount(
                Some(src.as_str()),
                p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(sys_err(format!("bind mount {src} onto {}", p.display())))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| Error::InvalidState("namespace pinning thread panicked".into()))?;
    if let Err(e) = res {
        unpin(dir);
        return Err(e);
    }
    let path = |n: &str| pins.iter().find(|(k, _)| *k == n).map(|(_, p)| p.clone());
    Ok((path("net"), dir.join("uts"), path("ipc")))
}

/// Unmounts and removes the namespace files in `dir` (ignoring ones that are gone).
pub(crate) fn unpin(dir: &Path) {
    for n in ["net", "uts", "ipc"] {
        let p = dir.join(n);
        if p.exists() {
            let _ = umount2(&p, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&p);
        }
    }
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Every mount point at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let d = dir.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .map(str::to_string)
        .collect()
}
