//! A throwaway node: one process tree in fresh network, mount, UTS and PID namespaces.

use std::ffi::{CString, OsString};
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

use crate::bridge::{check_ifname, delete_link};
use crate::nsexec::{self, Plan};
use crate::{LabError, netlink};

/// The interface name a node sees for its veth end.
pub const NODE_IFNAME: &str = "eth0";

/// A node's connection to a lab bridge: a veth pair, host end on `bridge`, node end `eth0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Name of an existing bridge (usually a [`crate::Bridge`]).
    pub bridge: String,
    /// The node end's IPv4 address with prefix, e.g. `10.99.0.2/24`.
    pub addr: String,
    /// Optional default gateway for the node (e.g. the bridge's address).
    pub gateway: Option<Ipv4Addr>,
}

impl Link {
    /// A link to `bridge` with address `addr` on the node end, no default route.
    pub fn new(bridge: impl Into<String>, addr: impl Into<String>) -> Link {
        Link {
            bridge: bridge.into(),
            addr: addr.into(),
            gateway: None,
        }
    }

    /// Adds a default route via `gateway` inside the node.
    pub fn gateway(mut self, gateway: Ipv4Addr) -> Link {
        self.gateway = Some(gateway);
        self
    }
}

/// Builds a [`Node`]; see [`Node::builder`].
#[derive(Debug)]
pub struct NodeBuilder {
    name: String,
    hostname: Option<String>,
    link: Option<Link>,
    die_with_parent: bool,
}

impl NodeBuilder {
    /// The node's hostname (default: its name).
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = Some(hostname.into());
        self
    }

    /// Connects the node to a bridge (default: no link, only `lo`).
    pub fn link(mut self, link: Link) -> Self {
        self.link = Some(link);
        self
    }

    /// Same as [`NodeBuilder::link`], taking an option.
    pub fn veth(mut self, link: Option<Link>) -> Self {
        self.link = link;
        self
    }

    /// Whether the node is SIGKILLed when the *thread* that spawned it exits (default: true, so
    /// that a killed test runner leaves no node behind). Turn it off when spawning from a thread
    /// that may end before the node should (e.g. a tokio blocking-pool thread).
    pub fn die_with_parent(mut self, yes: bool) -> Self {
        self.die_with_parent = yes;
        self
    }

    /// Starts `cmd` as PID 1 of a fresh PID namespace, in fresh network, mount (private, with its
    /// own /proc) and UTS namespaces. Stdio, environment and working directory of `cmd` are kept.
    pub fn spawn(self, mut cmd: Command) -> Result<Node, LabError> {
        crate::require_root()?;
        let hostname = self.hostname.unwrap_or_else(|| self.name.clone());
        if hostname.is_empty() || hostname.len() > 64 || hostname.contains('\0') {
            return Err(LabError::InvalidName {
                name: hostname,
                reason: "a hostname has 1 to 64 bytes and no NUL",
            });
        }
        let link = match &self.link {
            Some(link) => {
                check_ifname(&link.bridge)?;
                let (ip, prefix) = netlink::parse_cidr(&link.addr)?;
                Some((link, ip, prefix))
            }
            None => None,
        };

        let netns = netlink::new_netns()?;
        let id = crate::short_id();
        let mut host_link = HostLink(None);
        if let Some((link, ip, prefix)) = link {
            let host = format!("skv-{id}");
            let peer = format!("skp-{id}");
            netlink::run(netlink::Netns::Current, |h| {
                let (host, peer, fd) = (&host, &peer, netns.as_fd());
                async move { netlink::create_veth(&h, host, peer, &link.bridge, fd).await }
            })?;
            host_link = HostLink(Some(host));
            netlink::run(netlink::Netns::Enter(netns.as_fd()), |h| {
                let peer = &peer;
                async move {
                    netlink::configure_peer(&h, peer, NODE_IFNAME, ip, prefix, link.gateway).await
                }
            })?;
        }

        let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| LabError::io("create a pipe", e))?;
        let netns_for_child = netns
            .try_clone()
            .map_err(|e| LabError::io("duplicate the netns fd", e))?;
        let plan = Plan {
            enter: vec![(netns_for_child, CloneFlags::CLONE_NEWNET)],
            unshare: CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWPID,
            private_root: true,
            hostname: Some(OsString::from(&hostname)),
            mount_proc: true,
            die_with_parent: self.die_with_parent,
            cwd: None,
            pid_report: Some(report_w),
        };
        nsexec::install(&mut cmd, plan);
        let spawned = cmd.spawn();
        let program = cmd.get_program().to_owned();
        // Close our copies of the fds the hook holds (above all the pipe's write end).
        drop(cmd);
        let child = spawned
            .map_err(|e| LabError::io(format!("start {program:?} in node {}", self.name), e))?;
        let pid = read_pid(report_r).map_err(|e| {
            LabError::io(format!("learn the pid of node {}'s process", self.name), e)
        })?;
        tracing::debug!(node = %self.name, pid, veth = ?host_link.0, "lab node started");
        Ok(Node {
            name: self.name,
            hostname,
            pid,
            child,
            status: None,
            die_with_parent: self.die_with_parent,
            host_link,
            netns,
        })
    }
}

fn read_pid(r: OwnedFd) -> std::io::Result<u32> {
    let mut buf = [0u8; 4];
    std::fs::File::from(r).read_exact(&mut buf)?;
    let pid = i32::from_ne_bytes(buf);
    u32::try_from(pid).map_err(|_| std::io::Error::other(format!("bad pid {pid}")))
}

/// The host end of a node's veth pair; deleted on drop (which removes both ends).
#[derive(Debug)]
struct HostLink(Option<String>);

impl Drop for HostLink {
    fn drop(&mut self) {
        if let Some(name) = self.0.take()
            && let Err(error) = delete_link(&name)
        {
            tracing::warn!(link = %name, %error, "could not delete lab veth");
        }
    }
}

/// A running node. Dropping it kills its processes and removes its veth and namespaces.
#[derive(Debug)]
pub struct Node {
    name: String,
    hostname: String,
    pid: u32,
    child: Child,
    status: Option<ExitStatus>,
    die_with_parent: bool,
    // Dropped after the process is dead: first the veth, then the last handle on the netns.
    host_link: HostLink,
    netns: OwnedFd,
}

impl Node {
    /// Starts building node `name`.
    pub fn builder(name: impl Into<String>) -> NodeBuilder {
        NodeBuilder {
            name: name.into(),
            hostname: None,
            link: None,
            die_with_parent: true,
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's hostname.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Host pid of the node's main process (PID 1 inside the node).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Path of the node's network namespace (valid while the main process runs).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    /// The node's network namespace (held by the node, so valid even after its process exits).
    pub fn netns(&self) -> std::os::fd::BorrowedFd<'_> {
        self.netns.as_fd()
    }

    /// Name of the host end of the node's veth pair, if it has a link.
    pub fn host_veth(&self) -> Option<&str> {
        self.host_link.0.as_deref()
    }

    /// Prepares `cmd` to run inside the node: its PID, UTS, network and mount namespaces (so it
    /// sees the node's /proc). The returned command is `cmd`; spawn it as usual. Its `Child` is a
    /// supervisor outside the node whose exit status is the command's (128+signal if killed).
    pub fn exec_in(&self, mut cmd: Command) -> Result<Command, LabError> {
        let netns = self
            .netns
            .try_clone()
            .map_err(|e| LabError::io("duplicate the netns fd", e))?;
        let mut enter = vec![(netns, CloneFlags::CLONE_NEWNET)];
        for (kind, flag) in [
            ("pid", CloneFlags::CLONE_NEWPID),
            ("uts", CloneFlags::CLONE_NEWUTS),
            ("mnt", CloneFlags::CLONE_NEWNS),
        ] {
            let path = format!("/proc/{}/ns/{kind}", self.pid);
            let file = std::fs::File::open(&path).map_err(|e| {
                LabError::io(
                    format!("open {path} (is node {} still running?)", self.name),
                    e,
                )
            })?;
            enter.push((OwnedFd::from(file), flag));
        }
        let cwd = match cmd.get_current_dir() {
            Some(dir) => Some(CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
                LabError::InvalidName {
                    name: dir.display().to_string(),
                    reason: "a working directory must not contain NUL",
                }
            })?),
            None => None,
        };
        nsexec::install(
            &mut cmd,
            Plan {
                enter,
                die_with_parent: self.die_with_parent,
                cwd,
                ..Plan::default()
            },
        );
        Ok(cmd)
    }

    /// The main process's stdout, if it was piped (`Stdio::piped()`); once.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The main process's stderr, if it was piped; once.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Whether the main process has exited (its status once it has).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, LabError> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| LabError::io(format!("wait for node {}", self.name), e))?;
        }
        Ok(self.status)
    }

    /// Waits for the main process to exit.
    pub fn wait(&mut self) -> Result<ExitStatus, LabError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self
            .child
            .wait()
            .map_err(|e| LabError::io(format!("wait for node {}", self.name), e))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Sends SIGTERM to the main process, waits up to `grace`, then SIGKILLs the node. All
    /// processes of the node die with its PID 1. Returns the main process's status (a signal
    /// shows as exit code 128+signal).
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, LabError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if !grace.is_zero() {
            // The supervisor forwards SIGTERM to the main process.
            self.signal(Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Some(status) = self.try_wait()? {
                    return Ok(status);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // SIGKILL to the main process (PID 1: the whole PID namespace dies with it); the
        // supervisor reaps it and exits. Its pid cannot have been reused: the supervisor, its
        // parent, was still running a moment ago and exits only after reaping it.
        if self.try_wait()?.is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                Signal::SIGKILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Last resort: kill the supervisor; the main process has SIGKILL as parent-death signal.
        self.signal(Signal::SIGKILL);
        self.wait()
    }

    /// Sends `sig` to the node's supervisor, which forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT,
    /// SIGUSR1 and SIGUSR2 to the main process (SIGKILL kills the whole node).
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, sig);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(error) = self.stop(Duration::ZERO) {
            tracing::warn!(node = %self.name, %error, "could not stop lab node");
        }
        tracing::debug!(node = %self.name, "lab node removed");
    }
}
