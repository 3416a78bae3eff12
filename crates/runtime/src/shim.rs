//! The per-container shim (`skiff shim`): a single-threaded process that creates the container
//! with libcontainer, survives its parent (double fork + setsid), pumps stdout/stderr into a
//! CRI-format log, reaps the container, records its exit, and deletes it. Also `shim exec`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{
    ForkResult, Pid, dup, dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, setsid,
};
use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroups;
use crate::crilog::LineSplitter;
use crate::error::{Error, Result, io_err};

/// File name of the shim's state inside the container dir.
pub const STATE_FILE: &str = "shim.json";
/// File name of the control FIFO inside the container dir.
pub const CTL_FIFO: &str = "ctl";

/// Lifecycle of a container as the shim sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShimStatus {
    /// created, waiting for start
    Created,
    /// the process runs
    Running,
    /// the process ended (or was never started and got deleted)
    Exited,
}

/// What the shim records about its container (written atomically).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShimState {
    /// lifecycle
    pub status: ShimStatus,
    /// pid of the shim
    pub shim_pid: i32,
    /// pid of the container's init (host pid namespace)
    pub pid: Option<i32>,
    /// start time of `pid` in clock ticks since boot (guards against pid reuse)
    pub pid_start_ticks: Option<u64>,
    /// creation time (ns since epoch)
    pub created_at: i64,
    /// start time (ns since epoch)
    pub started_at: Option<i64>,
    /// exit time (ns since epoch)
    pub finished_at: Option<i64>,
    /// exit code (128+signal when killed by a signal)
    pub exit_code: Option<i32>,
    /// signal that killed it
    pub signal: Option<i32>,
    /// the kernel OOM killer killed a process of the container
    pub oom_killed: bool,
    /// set when the container was never started and got deleted
    pub deleted_before_start: bool,
    /// the libcontainer container has been deleted (cgroup and state removed)
    pub cleaned_up: bool,
    /// error from start or delete
    pub error: Option<String>,
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn pid_start_ticks(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

/// Reads a shim state file.
pub fn read_state(dir: &Path) -> Result<ShimState> {
    let p = dir.join(STATE_FILE);
    let b = fs::read(&p).map_err(io_err("read shim state", &p))?;
    serde_json::from_slice(&b).map_err(|source| Error::Json { path: p, source })
}

fn write_state(dir: &Path, st: &ShimState) -> Result<()> {
    let p = dir.join(STATE_FILE);
    let tmp = dir.join(".shim.json.tmp");
    let b = serde_json::to_vec_pretty(st).map_err(|source| Error::Json {
        path: p.clone(),
        source,
    })?;
    fs::write(&tmp, b).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &p).map_err(io_err("rename", &p))
}

/// Arguments of `shim create`.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    /// container id
    pub id: String,
    /// container dir (bundle/, ctl, shim.json)
    pub dir: PathBuf,
    /// libcontainer root
    pub root: PathBuf,
    /// CRI log file
    pub log: PathBuf,
    /// cgroupsPath, for OOM accounting
    pub cgroup: String,
    /// the container gets a stdin pipe, fed by attach clients
    pub stdin: bool,
    /// close the container's stdin when the first attach client closes its side
    pub stdin_once: bool,
    /// the container's stdio is a pseudo-terminal (its output is logged as stdout)
    pub tty: bool,
    /// the runtime's sandboxes dir when it is a mount of its own: the shim creates the container
    /// from a mount namespace without it (see [`enter_private_mounts`])
    pub pins_root: Option<PathBuf>,
    /// the container's sandbox dir (its namespace pins), kept in that namespace
    pub sandbox_dir: Option<PathBuf>,
}

impl CreateArgs {
    /// The command-line form (after `shim`).
    pub fn to_args(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "create".into(),
            "--id".into(),
            self.id.clone(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--root".into(),
            self.root.display().to_string(),
            "--log".into(),
            self.log.display().to_string(),
            "--cgroup".into(),
            self.cgroup.clone(),
            "--stdin".into(),
            if self.stdin { "1" } else { "0" }.into(),
            "--stdin-once".into(),
            if self.stdin_once { "1" } else { "0" }.into(),
            "--tty".into(),
            if self.tty { "1" } else { "0" }.into(),
        ];
        if let Some(p) = &self.pins_root {
            v.extend(["--pins-root".into(), p.display().to_string()]);
        }
        if let Some(p) = &self.sandbox_dir {
            v.extend(["--sandbox-dir".into(), p.display().to_string()]);
        }
        v
    }
}

/// Arguments of `shim exec`.
#[derive(Debug, Clone, Default)]
pub struct ExecArgs {
    /// container id
    pub id: String,
    /// libcontainer root
    pub root: PathBuf,
    /// where to write the exit result (JSON)
    pub result: PathBuf,
    /// the command
    pub argv: Vec<String>,
    /// an OCI process document (user, env, cwd, capabilities, args, terminal)
    pub process: Option<PathBuf>,
    /// give the process a pseudo-terminal (relayed over the shim's stdin/stdout)
    pub tty: bool,
    /// a FIFO that carries `ROWS COLS` lines to resize the terminal
    pub resize: Option<PathBuf>,
}

impl ExecArgs {
    /// The command-line form (after `shim`).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "exec".into(),
            "--id".into(),
            self.id.clone(),
            "--root".into(),
            self.root.display().to_string(),
            "--result".into(),
            self.result.display().to_string(),
        ];
        if let Some(p) = &self.process {
            v.extend(["--process".into(), p.display().to_string()]);
        }
        if self.tty {
            v.extend(["--tty".into(), "1".into()]);
        }
        if let Some(p) = &self.resize {
            v.extend(["--resize".into(), p.display().to_string()]);
        }
        v.push("--".into());
        v.extend(self.argv.iter().cloned());
        v
    }
}

/// Result of `shim exec`, written to its result file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResult {
    /// exit code of the command (128+signal when killed)
    pub exit_code: Option<i32>,
    /// why it could not run
    pub error: Option<String>,
}

fn parse_flags(args: &[String]) -> (HashMap<String, String>, Vec<String>) {
    let mut flags = HashMap::new();
    let mut rest = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            rest.extend(args[i + 1..].iter().cloned());
            break;
        }
        if let Some(name) = a.strip_prefix("--") {
            if let Some(v) = args.get(i + 1) {
                flags.insert(name.to_string(), v.clone());
            }
            i += 2;
        } else {
            rest.push(a.clone());
            i += 1;
        }
    }
    (flags, rest)
}

/// Entry point of `skiff shim ARGS` (args after `shim`). Returns the process exit code. Must be
/// called before any thread is started.
pub fn main(args: Vec<String>) -> i32 {
    let Some((sub, rest)) = args.split_first() else {
        eprintln!("usage: skiff shim create|exec ...");
        return 2;
    };
    let (flags, argv) = parse_flags(rest);
    let get = |k: &str| flags.get(k).cloned().unwrap_or_default();
    match sub.as_str() {
        "create" => match parse_create(&args) {
            Err(msg) => {
                eprintln!("{msg}");
                2
            }
            Ok(a) => match create(a) {
                Ok(()) => 0,
                Err(msg) => {
                    eprintln!("{msg}");
                    1
                }
            },
        },
        "zygote" => zygote(),
        "exec" => {
            let a = ExecArgs {
                id: get("id"),
                root: get("root").into(),
                result: get("result").into(),
                argv,
                process: flags.get("process").map(PathBuf::from),
                tty: get("tty") == "1",
                resize: flags.get("resize").map(PathBuf::from),
            };
            if a.id.is_empty() || a.result.as_os_str().is_empty() || a.argv.is_empty() {
                eprintln!(
                    "skiff shim exec: --id, --root, --result and a command after -- are required"
                );
                return 2;
            }
            exec(a)
        }
        other => {
            eprintln!("skiff shim: unknown subcommand {other:?} (create, exec, zygote)");
            2
        }
    }
}

/// Parses `create` arguments (the command-line form after `shim`, as [`CreateArgs::to_args`]
/// makes them).
pub fn parse_create(args: &[String]) -> std::result::Result<CreateArgs, String> {
    let Some(("create", rest)) = args.split_first().map(|(s, r)| (s.as_str(), r)) else {
        return Err("skiff shim zygote: not a create request".into());
    };
    let (flags, _) = parse_flags(rest);
    let get = |k: &str| flags.get(k).cloned().unwrap_or_default();
    let a = CreateArgs {
        id: get("id"),
        dir: get("dir").into(),
        root: get("root").into(),
        log: get("log").into(),
        cgroup: get("cgroup"),
        stdin: get("stdin") == "1",
        stdin_once: get("stdin-once") == "1",
        tty: get("tty") == "1",
        pins_root: flags.get("pins-root").map(PathBuf::from),
        sandbox_dir: flags.get("sandbox-dir").map(PathBuf::from),
    };
    if a.id.is_empty()
        || a.dir.as_os_str().is_empty()
        || a.root.as_os_str().is_empty()
        || a.log.as_os_str().is_empty()
    {
        return Err("skiff shim create: --id, --dir, --root and --log are required".into());
    }
    Ok(a)
}

/// `skiff shim zygote`: forks container shims for the runtime that started it, so that a
/// container's creation does not pay for a new process image. Each exec of the (large) skiff
/// binary cost the shim the dynamic loader, glibc's start-up (whose CPU-cache probing executes
/// CPUID, which traps to the hypervisor in a VM) and the page faults of a fresh address space;
/// in the 100-pod burst that was about a quarter of the shims' CPU. The zygote is
/// single-threaded and stays small: it only reads requests and forks.
///
/// Its stdin is a `SOCK_SEQPACKET` socket from the runtime. Each message is a JSON array of
/// `create` arguments and carries one descriptor (`SCM_RIGHTS`) on which the forked child
/// reports `ok` or the error, as `skiff shim create` does on its stdout/stderr. When the runtime
/// closes its end (the server stops or dies), the zygote exits; the shims it forked live on.
fn zygote() -> i32 {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::io::IoSliceMut;
    use std::os::fd::{FromRawFd, RawFd};
    // The kernel reaps the create processes (they report over their descriptor, not by exit
    // status); each child restores the default before it forks its shim.
    // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (n, fds) = match recvmsg::<()>(0, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        {
            Ok(m) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = m.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(f) = c {
                            fds.extend(f);
                        }
                    }
                }
                (m.bytes, fds)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("skiff shim zygote: receive: {e}");
                return 1;
            }
        };
        // SAFETY: the descriptors came with this message (SCM_RIGHTS) and nothing else owns them.
        let mut fds: Vec<OwnedFd> = fds
            .into_iter()
            .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
            .collect();
        if n == 0 && fds.is_empty() {
            // The runtime closed its end.
            return 0;
        }
        let Some(reply) = fds.pop() else { continue };
        drop(fds);
        let args: std::result::Result<Vec<String>, String> = serde_json::from_slice(&buf[..n])
            .map_err(|e| format!("skiff shim zygote: bad request: {e}"));
        // SAFETY: the zygote is single-threaded, so the child may run arbitrary code.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // SAFETY: restoring the default disposition has no memory effects.
                unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
                // The zygote's socket is not the child's to hold.
                if let Ok(null) = File::open("/dev/null") {
                    let _ = dup2_stdin(null.as_fd());
                }
                let res = args.and_then(|args| {
                    set_cmdline(&args);
                    parse_create(&args).and_then(create)
                });
                let msg = match res {
                    Ok(()) => "ok\n".to_string(),
                    Err(m) => format!("{}\n", m.replace('\n', " ")),
                };
                let _ = File::from(reply).write_all(msg.as_bytes());
                std::process::exit(0);
            }
            Ok(ForkResult::Parent { .. }) => drop(reply),
            Err(e) => {
                let _ = File::from(reply)
                    .write_all(format!("skiff shim zygote: fork: {e}\n").as_bytes());
            }
        }
    }
}

/// Room the runtime leaves in the zygote's command line (a last argument of spaces) for
/// [`set_cmdline`].
pub const ZYGOTE_CMDLINE_ROOM: usize = 4096;

/// Makes `/proc/<pid>/cmdline` of a forked shim read `… create --id …` as it does for an exec'd
/// one (tools and tests find shims by it), by writing the arguments over the zygote's own in
/// place, from its `zygote` argument on. Best effort: the kernel's PR_SET_MM, which could point
/// the command line elsewhere, needs CAP_SYS_RESOURCE, which a root in a VM or container may
/// not have.
fn set_cmdline(args: &[String]) {
    let Ok(stat) = fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name's ")": the 3rd (state) is the first; arg_start and
    // arg_end are the 48th and 49th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (Some(start), Some(end)) = (
        f.get(45).and_then(|s| s.parse::<usize>().ok()),
        f.get(46).and_then(|s| s.parse::<usize>().ok()),
    ) else {
        return;
    };
    if start == 0 || end <= start {
        return;
    }
    // SAFETY: [arg_start, arg_end) is this process's argument area, mapped and writable (the
    // top of its initial stack), and nothing in this process holds a Rust reference to it
    // (std reads argv only when asked, and the shim does not ask again).
    let area = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let Some(at) = area.windows(7).position(|w| w == b"zygote\0") else {
        return;
    };
    let mut text = Vec::new();
    for a in args {
        text.extend_from_slice(a.as_bytes());
        text.push(0);
    }
    let room = &mut area[at..];
    if text.len() > room.len() {
        return;
    }
    room[..text.len()].copy_from_slice(&text);
    room[text.len()..].fill(0);
}

/// Creates the container and its shim: returns once the shim reports the container created
/// (or why not).
fn create(a: CreateArgs) -> std::result::Result<(), String> {
    let (ready_r, ready_w) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("skiff shim: pipe: {e}"))?;
    // SAFETY: the shim is single-threaded at this point (called from main before any thread or
    // async runtime is started, or in a child of the single-threaded zygote), so the child may
    // run arbitrary code after fork.
    match unsafe { fork() } {
        Err(e) => Err(format!("skiff shim: fork: {e}")),
        Ok(ForkResult::Parent { .. }) => {
            drop(ready_w);
            // Read one line: the container's not-yet-exec'd init also holds the write end, so
            // end-of-file would only come when the container starts.
            let mut msg = String::new();
            let mut f = File::from(ready_r);
            let mut b = [0u8; 512];
            while !msg.ends_with('\n') {
                match f.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => msg.push_str(&String::from_utf8_lossy(&b[..n])),
                }
            }
            let msg = msg.trim_end().to_string();
            if msg == "ok" {
                Ok(())
            } else if msg.is_empty() {
                Err("skiff shim: the shim died before reporting".into())
            } else {
                Err(msg)
            }
        }
        Ok(ForkResult::Child) => {
            drop(ready_r);
            let code = shim_process(&a, ready_w);
            // Never return into the caller's main (which would run its exit path twice).
            std::process::exit(code);
        }
    }
}

/// Once the container is created, its init has its own mount namespace with the rootfs pivoted
/// in, and the overlay mount on the host (`<container dir>/rootfs`) is no longer used: execs join
/// the container's mount namespace, the writable layer is read from `upper/`, and a restarted
/// container gets a new rootfs. Detaching it keeps the host's mount table at the pod sandboxes'
/// pins. That matters for start-up speed: every container creation reads the whole
/// `/proc/self/mountinfo` several times (libcontainer's cgroup v1 and rootfs set-up) and copies
/// the host's mount table into its new namespace, all under the kernel's global mount lock, so
/// each mount left on the host makes every later start slower. The overlay itself lives on in
/// the container's namespace and goes when its last process does.
fn detach_host_rootfs(rootfs: &Path) {
    if let Err(e) = nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH) {
        tracing::debug!(rootfs = %rootfs.display(), error = %e, "host rootfs mount not detached");
    }
}

/// The shim's way back to the host's mount namespace after [`enter_private_mounts`].
struct HostMounts {
    ns: File,
    cwd: Option<PathBuf>,
}

/// Moves the (single-threaded) shim into a mount namespace of its own for the container's
/// creation: a copy of the host's, minus every pod's namespace pins except this container's own.
/// libcontainer's processes start from here, so the mount table they read (once per cgroup v1
/// controller, and for the rootfs) and copy into the container's namespace is the host's few
/// system mounts, not 3 pins per pod on the node (see `sandbox::ensure_pins_mount`). Mounts
/// here are slaves of the host's, so host mounts still reach the container as before. Returns
/// None, staying in the host's namespace, if any step fails: that only costs speed.
fn enter_private_mounts(a: &CreateArgs) -> Option<HostMounts> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    use std::os::fd::AsRawFd;
    let pins_root = a.pins_root.as_ref()?;
    let ns = File::open("/proc/self/ns/mnt")
        .map_err(|e| tracing::warn!(error = %e, "open host mount namespace"))
        .ok()?;
    let host = HostMounts {
        ns,
        cwd: std::env::current_dir().ok(),
    };
    // This container's pins, opened while they are still reachable.
    let pins: Vec<(PathBuf, File)> = a
        .sandbox_dir
        .iter()
        .flat_map(|d| crate::sandbox::PIN_NAMES.map(|n| d.join(n)))
        .filter_map(|p| File::open(&p).ok().map(|f| (p, f)))
        .collect();
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS) {
        tracing::warn!(error = %e, "unshare mount namespace; creating from the host's");
        return None;
    }
    let setup = || -> std::result::Result<(), String> {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("make mounts slaves: {e}"))?;
        umount2(pins_root, MntFlags::MNT_DETACH)
            .map_err(|e| format!("unmount {}: {e}", pins_root.display()))?;
        for (p, f) in &pins {
            let src = format!("/proc/self/fd/{}", f.as_raw_fd());
            mount(
                Some(src.as_str()),
                p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("bind namespace onto {}: {e}", p.display()))?;
        }
        Ok(())
    };
    match setup() {
        Ok(()) => Some(host),
        Err(e) => {
            tracing::warn!(error = %e, "private mount namespace not set up; creating from the host's");
            leave_private_mounts(host);
            None
        }
    }
}

/// Returns the shim to the host's mount namespace (its private one goes with its last
/// process), so it holds no copy of the host's mounts for the container's lifetime.
fn leave_private_mounts(host: HostMounts) {
    if let Err(e) = nix::sched::setns(&host.ns, nix::sched::CloneFlags::CLONE_NEWNS) {
        tracing::warn!(error = %e, "return to the host mount namespace");
        return;
    }
    // setns moves the working directory to the namespace's root.
    if let Some(cwd) = host.cwd {
        let _ = std::env::set_current_dir(cwd);
    }
}

/// Closes every inherited descriptor above stderr except `keep` (the shim must hold nothing of
/// its parent's, or the parent's pipes never see end-of-file).
fn close_inherited(keep: i32) {
    let fds: Vec<i32> = match fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing a descriptor number this process owns no Rust object for (the
            // shim has opened nothing but `keep` yet); a stale number from read_dir only fails.
            unsafe { libc::close(fd) };
        }
    }
}

fn detach_stdio(dir: &Path) -> Result<()> {
    let _ = setsid();
    let null = File::open("/dev/null").map_err(io_err("open", "/dev/null"))?;
    let logp = dir.join("shim.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&logp)
        .map_err(io_err("open", &logp))?;
    dup2_stdin(null.as_fd()).map_err(|e| io_err("dup2 stdin", "/dev/null")(e.into()))?;
    dup2_stdout(log.as_fd()).map_err(|e| io_err("dup2 stdout", &logp)(e.into()))?;
    dup2_stderr(log.as_fd()).map_err(|e| io_err("dup2 stderr", &logp)(e.into()))?;
    Ok(())
}

fn shim_process(a: &CreateArgs, ready: OwnedFd) -> i32 {
    close_inherited(std::os::fd::AsRawFd::as_raw_fd(&ready));
    let mut ready = Some(File::from(ready));
    let report = |ready: &mut Option<File>, msg: &str| {
        if let Some(mut f) = ready.take() {
            let _ = f.write_all(format!("{}\n", msg.replace('\n', " ")).as_bytes());
        }
    };
    if let Err(e) = detach_stdio(&a.dir) {
        report(&mut ready, &format!("skiff shim {}: {e}", a.id));
        return 1;
    }
    match run_shim(a, &mut ready) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(id = %a.id, error = %e, "shim failed");
            report(&mut ready, &format!("skiff shim {}: {e}", a.id));
            1
        }
    }
}

fn run_shim(a: &CreateArgs, ready: &mut Option<File>) -> Result<()> {
    let created_at = now_ns();
    let mut state = ShimState {
        status: ShimStatus::Created,
        shim_pid: std::process::id() as i32,
        pid: None,
        pid_start_ticks: None,
        created_at,
        started_at: None,
        finished_at: None,
        exit_code: None,
        signal: None,
        oom_killed: false,
        deleted_before_start: false,
        cleaned_up: false,
        error: None,
    };
    let ctl = a.dir.join(CTL_FIFO);
    let _ = fs::remove_file(&ctl);
    nix::unistd::mkfifo(&ctl, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| io_err("mkfifo", &ctl)(e.into()))?;
    let ctl_file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&ctl)
        .map_err(io_err("open", &ctl))?;
    if let Some(parent) = a.log.parent() {
        fs::create_dir_all(parent).map_err(io_err("create log dir", parent))?;
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.log)
        .map_err(io_err("open container log", &a.log))?;
    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io_err("pipe", &a.dir)(e.into()))?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io_err("pipe", &a.dir)(e.into()))?;
    fs::create_dir_all(&a.root).map_err(io_err("create", &a.root))?;
    let mut stdin_w: Option<File> = None;
    let mut builder = ContainerBuilder::new(a.id.clone(), SyscallType::Linux)
        .with_root_path(&a.root)
        .map_err(|e| Error::Container(e.to_string()))?;
    if a.stdin && !a.tty {
        let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| io_err("pipe", &a.dir)(e.into()))?;
        builder = builder.with_stdin(r);
        stdin_w = Some(File::from(w));
    }
    // Attach clients connect here; without it (path too long) attach is unavailable.
    let attach_path = a.dir.join(ATTACH_SOCKET);
    let listener = match std::os::unix::net::UnixListener::bind(&attach_path) {
        Ok(l) => {
            let _ = l.set_nonblocking(true);
            Some(l)
        }
        Err(e) => {
            tracing::warn!(id = %a.id, error = %e, path = %attach_path.display(), "attach socket unavailable");
            None
        }
    };
    let mut clients: Vec<Client> = Vec::new();
    let console = a.dir.join("console.sock");
    let console_listener = if a.tty {
        // libcontainer hands the terminal's master over this socket; the pipes stay unused
        // (their write ends are dropped, so they read as closed).
        drop(out_w);
        drop(err_w);
        let l = std::os::unix::net::UnixListener::bind(&console)
            .map_err(io_err("bind console socket", &console))?;
        builder = builder.with_console_socket(Some(&console));
        Some(l)
    } else {
        builder = builder.with_stdout(out_w).with_stderr(err_w);
        None
    };
    let host_mounts = enter_private_mounts(a);
    let built = builder
        .as_init(a.dir.join("bundle"))
        .with_systemd(false)
        .with_detach(true)
        .build();
    if let Some(h) = host_mounts {
        leave_private_mounts(h);
    }
    let mut container =
        built.map_err(|e| Error::Container(format!("create container {}: {e}", a.id)))?;
    let out_r = match &console_listener {
        Some(l) => {
            let master = receive_master(l, &console);
            let _ = fs::remove_file(&console);
            let master = master?;
            if a.stdin {
                let w = dup(master.as_fd()).map_err(|e| io_err("dup", &console)(e.into()))?;
                stdin_w = Some(File::from(w));
            }
            master
        }
        None => out_r,
    };
    detach_host_rootfs(&a.dir.join("rootfs"));
    let pid = container.pid().map(|p| p.as_raw());
    state.pid = pid;
    state.pid_start_ticks = pid.and_then(pid_start_ticks);
    write_state(&a.dir, &state)?;
    tracing::info!(id = %a.id, ?pid, "container created");
    if let Some(mut f) = ready.take() {
        let _ = f.write_all(b"ok\n");
    }

    // A pidfd turns readable when the init exits: poll wakes at once instead of at its timeout
    // (output pipes can close before the exit is reapable).
    let exit_fd = pid.and_then(pidfd_open);
    let cgroups = Cgroups::host();
    let mut out_split = LineSplitter::new("stdout");
    let mut err_split = LineSplitter::new("stderr");
    let mut out_open = true;
    let mut err_open = true;
    let mut ctl_buf = String::new();
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // Stop pumping once the process is gone and the pipes are drained (or after a grace
        // period, in case an escaped process holds them open).
        if let Some(t) = exited_at
            && ((!out_open && !err_open) || t.elapsed() > Duration::from_secs(2))
        {
            break;
        }
        let mut fds = vec![PollFd::new(ctl_file.as_fd(), PollFlags::POLLIN)];
        let mut tags = vec![Tag::Ctl];
        if out_open {
            fds.push(PollFd::new(out_r.as_fd(), PollFlags::POLLIN));
            tags.push(Tag::Out);
        }
        if err_open {
            fds.push(PollFd::new(err_r.as_fd(), PollFlags::POLLIN));
            tags.push(Tag::Err);
        }
        if let Some(l) = &listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            tags.push(Tag::Listener);
        }
        if let (Some(f), None) = (&exit_fd, exited_at) {
            fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
            tags.push(Tag::Exit);
        }
        for (i, c) in clients.iter().enumerate() {
            if c.reading {
                fds.push(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN));
                tags.push(Tag::Client(i));
            }
        }
        let _ = poll(&mut fds, PollTimeout::from(50u16));
        let ready: Vec<Tag> = fds
            .iter()
            .zip(tags.iter())
            .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, t)| *t)
            .collect();
        drop(fds);
        let ctl_ready = ready.contains(&Tag::Ctl);
        let mut gone = Vec::new();
        for t in &ready {
            match *t {
                Tag::Ctl => {}
                Tag::Out => {
                    out_open = pump(&out_r, &mut buf, &mut out_split, &mut log, 1, &mut clients)
                }
                Tag::Err => {
                    err_open = pump(&err_r, &mut buf, &mut err_split, &mut log, 2, &mut clients)
                }
                // The init exited: reaped below.
                Tag::Exit => {}
                Tag::Listener => {
                    if let Some(Ok((c, _))) = listener.as_ref().map(|l| l.accept()) {
                        let _ = c.set_nonblocking(true);
                        clients.push(Client {
                            stream: c,
                            reading: true,
                        });
                    }
                }
                Tag::Client(i) => {
                    let mut b = [0u8; 4096];
                    match clients.get(i).map(|c| (&c.stream).read(&mut b)) {
                        Some(Ok(0)) => {
                            // Half-closed: no more input, but it still gets output.
                            if let Some(c) = clients.get_mut(i) {
                                c.reading = false;
                            }
                            if a.stdin_once {
                                stdin_w = None;
                            }
                        }
                        Some(Err(_)) | None => gone.push(i),
                        Some(Ok(n)) => {
                            if let Some(w) = stdin_w.as_mut() {
                                let _ = w.write_all(&b[..n]);
                            }
                        }
                    }
                }
            }
        }
        gone.sort_unstable();
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }
        if ctl_ready {
            let mut b = [0u8; 256];
            if let Ok(n) = (&ctl_file).read(&mut b) {
                ctl_buf.push_str(&String::from_utf8_lossy(&b[..n]));
            }
            while let Some(i) = ctl_buf.find('\n') {
                let cmd = ctl_buf[..i].trim().to_string();
                ctl_buf.drain(..=i);
                match cmd.as_str() {
                    "start" if state.status == ShimStatus::Created => match container.start() {
                        Ok(()) => {
                            state.status = ShimStatus::Running;
                            state.started_at = Some(now_ns());
                            write_state(&a.dir, &state)?;
                            tracing::info!(id = %a.id, "container started");
                        }
                        Err(e) => {
                            state.error = Some(format!("start: {e}"));
                            write_state(&a.dir, &state)?;
                        }
                    },
                    "delete" if state.status == ShimStatus::Created => {
                        state.deleted_before_start = true;
                        if let Some(p) = pid {
                            let _ = nix::sys::signal::kill(
                                Pid::from_raw(p),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                        exited_at = Some(Instant::now());
                    }
                    c if c.starts_with("resize ") && a.tty => {
                        let mut it = c
                            .split_whitespace()
                            .skip(1)
                            .filter_map(|x| x.parse::<u16>().ok());
                        if let (Some(rows), Some(cols)) = (it.next(), it.next()) {
                            let ws = libc::winsize {
                                ws_row: rows,
                                ws_col: cols,
                                ws_xpixel: 0,
                                ws_ypixel: 0,
                            };
                            // SAFETY: TIOCSWINSZ reads a winsize we own, on the terminal we hold.
                            unsafe {
                                libc::ioctl(
                                    std::os::fd::AsRawFd::as_raw_fd(&out_r),
                                    libc::TIOCSWINSZ,
                                    &ws,
                                )
                            };
                        }
                    }
                    "reopen-log" => {
                        // The kubelet rotated the log (renamed it): continue in a fresh file.
                        match OpenOptions::new().create(true).append(true).open(&a.log) {
                            Ok(f) => log = f,
                            Err(e) => {
                                tracing::error!(id = %a.id, error = %e, "reopen container log")
                            }
                        }
                    }
                    other => {
                        tracing::warn!(id = %a.id, command = other, status = ?state.status, "ignored shim command")
                    }
                }
            }
        }
        // Reap every child; the container's init is one of them.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) => {
                    if Some(p.as_raw()) == pid {
                        state.exit_code = Some(code);
                        exited_at.get_or_insert_with(Instant::now);
                        state.finished_at.get_or_insert_with(now_ns);
                    }
                }
                Ok(WaitStatus::Signaled(p, sig, _)) => {
                    if Some(p.as_raw()) == pid {
                        state.signal = Some(sig as i32);
                        state.exit_code = Some(128 + sig as i32);
                        exited_at.get_or_insert_with(Instant::now);
                        state.finished_at.get_or_insert_with(now_ns);
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    // Drain what is left.
    for (fd, split) in [(&out_r, &mut out_split), (&err_r, &mut err_split)] {
        let _ = nix::fcntl::fcntl(
            fd.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let sid = if split.is_stdout() { 1 } else { 2 };
        while pump(fd, &mut buf, split, &mut log, sid, &mut clients) {}
        let _ = split.finish(&mut log);
    }
    let _ = log.flush();
    if !a.cgroup.is_empty() {
        state.oom_killed = cgroups.oom_kills(&a.cgroup).unwrap_or(0) > 0;
    }
    state.status = ShimStatus::Exited;
    state.finished_at.get_or_insert_with(now_ns);
    // Report the exit first (waiters see it at once), then clean up and report again.
    write_state(&a.dir, &state)?;
    if let Err(e) = container.delete(true) {
        state.error = Some(format!("delete: {e}"));
    } else {
        state.cleaned_up = true;
    }
    write_state(&a.dir, &state)?;
    let _ = fs::remove_file(&ctl);
    drop(clients);
    let _ = fs::remove_file(&attach_path);
    tracing::info!(id = %a.id, exit_code = ?state.exit_code, oom_killed = state.oom_killed, "container exited");
    Ok(())
}

fn receive_master(l: &std::os::unix::net::UnixListener, sock: &Path) -> Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd};
    let (conn, _) = l.accept().map_err(io_err("accept console socket", sock))?;
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .map_err(|e| io_err("receive terminal", sock)(e.into()))?;
    for c in msg
        .cmsgs()
        .map_err(|e| io_err("read terminal message", sock)(e.into()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed this descriptor in our table for us alone.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(Error::Container(format!(
        "no terminal received on {}",
        sock.display()
    )))
}

/// Copies stdin to the terminal and the terminal to stdout until the process is gone; applies
/// `ROWS COLS` lines from the resize FIFO.
fn relay_tty(master: OwnedFd, pid: Pid, resize: Option<&Path>) {
    let resize_file = resize.and_then(|p| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .ok()
    });
    let stdin = std::io::stdin();
    let mut stdin_open = true;
    let mut buf = vec![0u8; 16 * 1024];
    let mut exited_at: Option<Instant> = None;
    loop {
        if exited_at.is_some_and(|t| t.elapsed() > Duration::from_millis(200)) {
            break;
        }
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if let Some(f) = &resize_file {
            fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
        }
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        let _ = poll(&mut fds, PollTimeout::from(50u16));
        let rev: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if rev[0] {
            match nix::unistd::read(&master, &mut buf) {
                Ok(0) | Err(nix::errno::Errno::EIO) => break,
                Ok(n) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
                Err(_) => {}
            }
        }
        let mut idx = 1;
        if let Some(f) = &resize_file {
            if rev.get(idx).copied().unwrap_or(false) {
                let mut b = [0u8; 128];
                if let Ok(n) = nix::unistd::read(f, &mut b) {
                    for line in String::from_utf8_lossy(&b[..n]).lines() {
                        let mut it = line
                            .split_whitespace()
                            .filter_map(|x| x.parse::<u16>().ok());
                        if let (Some(rows), Some(cols)) = (it.next(), it.next()) {
                            let ws = libc::winsize {
                                ws_row: rows,
                                ws_col: cols,
                                ws_xpixel: 0,
                                ws_ypixel: 0,
                            };
                            // SAFETY: TIOCSWINSZ reads a winsize we own, on the terminal we hold.
                            unsafe {
                                libc::ioctl(
                                    std::os::fd::AsRawFd::as_raw_fd(&master),
                                    libc::TIOCSWINSZ,
                                    &ws,
                                )
                            };
                        }
                    }
                }
            }
            idx += 1;
        }
        if stdin_open && rev.get(idx).copied().unwrap_or(false) {
            match nix::unistd::read(&stdin, &mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    let _ = nix::unistd::write(&master, &buf[..n]);
                }
            }
        }
        if exited_at.is_none() {
            // Exited but not yet reaped (the caller reaps): a zombie.
            let stat =
                fs::read_to_string(format!("/proc/{}/stat", pid.as_raw())).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                exited_at = Some(Instant::now());
            }
        }
    }
}

/// An attach connection.
struct Client {
    stream: std::os::unix::net::UnixStream,
    /// still sending stdin
    reading: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Exit,
    Ctl,
    Out,
    Err,
    Listener,
    Client(usize),
}

/// A pollable descriptor for `pid` (readable once it exits); None where the kernel has no
/// `pidfd_open` (before 5.3): the loop then notices the exit at its poll timeout.
pub(crate) fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// File name of the attach socket inside the container dir.
pub const ATTACH_SOCKET: &str = "attach.sock";

/// Reads once from a pipe into the log and to attach clients (frames: stream byte 1/2, u32
/// big-endian length, data; a client that cannot keep up is dropped); false at end of stream.
fn pump(
    fd: &OwnedFd,
    buf: &mut [u8],
    split: &mut LineSplitter,
    log: &mut File,
    stream: u8,
    clients: &mut Vec<Client>,
) -> bool {
    match nix::unistd::read(fd, buf) {
        Ok(0) => false,
        Ok(n) => {
            let _ = split.feed(&buf[..n], log);
            if !clients.is_empty() {
                let mut frame = Vec::with_capacity(n + 5);
                frame.push(stream);
                frame.extend_from_slice(&(n as u32).to_be_bytes());
                frame.extend_from_slice(&buf[..n]);
                clients.retain_mut(|c| c.stream.write_all(&frame).is_ok());
            }
            true
        }
        Err(nix::errno::Errno::EINTR) => true,
        Err(_) => false,
    }
}

fn exec(a: ExecArgs) -> i32 {
    let res = run_exec(&a);
    let result = match res {
        Ok(code) => ExecResult {
            exit_code: Some(code),
            error: None,
        },
        Err(e) => ExecResult {
            exit_code: None,
            error: Some(e.to_string()),
        },
    };
    let body = serde_json::to_vec(&result).unwrap_or_default();
    if let Err(e) = fs::write(&a.result, body) {
        eprintln!("skiff shim exec: write {}: {e}", a.result.display());
        return 1;
    }
    0
}

fn run_exec(a: &ExecArgs) -> Result<i32> {
    // The command's stderr is our stderr as given; our own diagnostics (and libcontainer's)
    // must not mix into it: they go nowhere (errors reach the caller via the result file).
    let orig_err = dup(std::io::stderr().as_fd()).map_err(|e| io_err("dup", "stderr")(e.into()))?;
    let null = File::options()
        .write(true)
        .open("/dev/null")
        .map_err(io_err("open", "/dev/null"))?;
    dup2_stderr(null.as_fd()).map_err(|e| io_err("dup2 stderr", "/dev/null")(e.into()))?;
    let mut b = ContainerBuilder::new(a.id.clone(), SyscallType::Linux)
        .with_root_path(&a.root)
        .map_err(|e| Error::Container(e.to_string()))?;
    let mut listener = None;
    if a.tty {
        // libcontainer hands the pseudo-terminal's master over this socket.
        let sock = a.result.with_extension("sock");
        let l = std::os::unix::net::UnixListener::bind(&sock)
            .map_err(io_err("bind console socket", &sock))?;
        listener = Some((l, sock.clone()));
        b = b.with_console_socket(Some(sock));
    } else {
        let out = dup(std::io::stdout().as_fd()).map_err(|e| io_err("dup", "stdout")(e.into()))?;
        let err = orig_err;
        let inp = dup(std::io::stdin().as_fd()).map_err(|e| io_err("dup", "stdin")(e.into()))?;
        b = b.with_stdin(inp).with_stdout(out).with_stderr(err);
    }
    let pid = b
        .as_tenant()
        .with_container_args(a.argv.clone())
        .with_process(a.process.as_ref())
        .with_detach(a.tty)
        .build()
        .map_err(|e| Error::Container(format!("exec in {}: {e}", a.id)))?;
    let pid = Pid::from_raw(pid.as_raw());
    if let Some((l, sock)) = listener {
        let master = receive_master(&l, &sock);
        let _ = fs::remove_file(&sock);
        relay_tty(master?, pid, a.resize.as_deref());
    }
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(Error::Sys {
                    op: format!("wait for exec in {}", a.id),
                    source: e,
                });
            }
        }
    }
}
