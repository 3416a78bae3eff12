//! Pod sandboxes: network, UTS and IPC namespaces pinned by bind mounts under the runtime's
//! state dir (so they outlive processes), with the pod hostname set. The sandboxes dir is a
//! private mount of its own (see [`ensure_pins_mount`]), so a container's creation can drop every
//! other pod's pins from its mount namespace at once.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd};
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
        if flags.contains(CloneFlags::CLONE_NEWNET) {
            bring_lo_up()?;
        }
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

/// Sets the loopback interface of the current thread's network namespace up.
fn bring_lo_up() -> Result<()> {
    let err = |op: &str| Error::Sys {
        op: format!("{op} (loopback of the pod network namespace)"),
        source: nix::Error::last(),
    };
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("socket"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own, through a valid socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(err("get flags"));
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own, through a valid socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(err("set lo up"));
    }
    Ok(())
}

/// Opens a TCP connection to `127.0.0.1:port` inside the network namespace pinned at `netns`
/// (port-forward). The socket lives in that namespace; the calling thread does not move.
pub fn connect_in_netns(
    netns: &Path,
    port: u16,
    timeout: std::time::Duration,
) -> Result<std::net::TcpStream> {
    let ns = File::open(netns).map_err(io_err("open network namespace", netns))?;
    let path = netns.to_path_buf();
    std::thread::spawn(move || -> Result<std::net::TcpStream> {
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(sys_err(format!(
            "enter network namespace {}",
            path.display()
        )))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(io_err(
            "connect to port in pod network namespace",
            format!("{}:{port}", path.display()),
        ))
    })
    .join()
    .map_err(|_| Error::InvalidState("port-forward thread panicked".into()))?
}

/// The file names of a sandbox's namespace pins (the ones its config asks for exist).
pub(crate) const PIN_NAMES: [&str; 3] = ["net", "uts", "ipc"];

/// Unmounts and removes the namespace files in `dir` (ignoring ones that are gone).
pub(crate) fn unpin(dir: &Path) {
    for n in PIN_NAMES {
        let p = dir.join(n);
        if p.exists() {
            let _ = umount2(&p, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&p);
        }
    }
}

/// Makes `dir` (the runtime's sandboxes dir, which holds every pod's namespace pins) a mount
/// point of its own, with private propagation, unless it is one already.
///
/// Why: with 100 pods the host's mount table holds 300 pins, and every container creation pays
/// for each mount several times over: libcontainer reads the whole `/proc/self/mountinfo` once
/// per cgroup v1 controller and again for its rootfs, and copies the table into the container's
/// new mount namespace. With the pins under one mount, a shim's private mount namespace drops
/// them all with a single unmount (see the shim's `enter_private_mounts`). Private, so pins made
/// later do not propagate into other mount namespaces and an unmount in a copy never reaches
/// the host. The bind is recursive to keep pins made before it visible (an older skiff's).
pub fn ensure_pins_mount(dir: &Path) -> Result<()> {
    if is_mounted(dir) {
        return Ok(());
    }
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys_err(format!("bind mount {} onto itself", dir.display())))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys_err(format!("make {} a private mount", dir.display())))
}

/// Undoes [`ensure_pins_mount`] (and unmounts any pins still below it).
pub fn release_pins_mount(dir: &Path) {
    if is_mounted(dir) {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
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
