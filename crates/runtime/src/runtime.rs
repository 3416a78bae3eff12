//! The runtime API used from async code: sandboxes and containers whose processes are held by
//! per-container shims; all state lives on disk, so a new `BuiltinRuntime` re-adopts running containers.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroup::{CgroupStats, Cgroups};
use crate::error::{Error, Result, io_err, sys_err};
use crate::pull::RegistriesConfig;
use crate::sandbox::{
    Sandbox, SandboxConfig, ensure_pins_mount, is_mounted, pin_namespaces, release_pins_mount,
    unpin,
};
use crate::shim::{
    CTL_FIFO, CreateArgs, ExecArgs, ExecResult, ShimState, ShimStatus, now_ns, pid_start_ticks,
    read_state,
};
use crate::spec::{ContainerConfig, Placement, build_spec};
use crate::store::ImageStore;

/// How a runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// state dir (containers/, sandboxes/, lc/), e.g. `<data-dir>/agent/runtime`
    pub state_dir: PathBuf,
    /// the image store
    pub images: ImageStore,
    /// the shim command: program then leading args (`[/usr/bin/skiff, shim]`)
    pub shim_command: Vec<OsString>,
    /// the cgroup under which pod cgroups are made (e.g. `skiff`)
    pub cgroup_parent: String,
}

/// State of a container.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    /// created, not started
    Created,
    /// running
    Running,
    /// exited
    Exited,
    /// the shim is gone without recording an exit
    Unknown,
}

/// What the runtime reports about a container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerStatus {
    /// id
    pub id: String,
    /// name from the config
    pub name: String,
    /// sandbox it belongs to
    pub sandbox_id: Option<String>,
    /// image reference as given
    pub image: String,
    /// image manifest digest
    pub image_digest: String,
    /// state
    pub state: ContainerState,
    /// init pid (host)
    pub pid: Option<i32>,
    /// creation time (ns)
    pub created_at: i64,
    /// start time (ns)
    pub started_at: Option<i64>,
    /// exit time (ns)
    pub finished_at: Option<i64>,
    /// exit code
    pub exit_code: Option<i32>,
    /// killed by the OOM killer
    pub oom_killed: bool,
    /// CRI log path
    pub log_path: PathBuf,
    /// error from the shim
    pub error: Option<String>,
}

/// A running exec with its stdio as pipes (no TTY).
#[derive(Debug)]
pub struct ExecProcess {
    /// the process' stdin (drop it to send end-of-file)
    pub stdin: Option<tokio::process::ChildStdin>,
    /// its stdout
    pub stdout: Option<tokio::process::ChildStdout>,
    /// its stderr
    pub stderr: Option<tokio::process::ChildStderr>,
    child: tokio::process::Child,
    result: PathBuf,
    id: String,
    process: PathBuf,
    resize: Option<PathBuf>,
}

impl ExecProcess {
    /// Sets the terminal size (TTY execs only).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let Some(p) = &self.resize else {
            return Err(Error::InvalidState(
                "resize needs an exec with a tty".into(),
            ));
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .map_err(io_err("open resize fifo", p))?;
        f.write_all(format!("{rows} {cols}\n").as_bytes())
            .map_err(io_err("write", p))
    }

    /// Waits for the process and returns its exit code.
    pub async fn wait(mut self) -> Result<i32> {
        drop(self.stdin.take());
        self.child
            .wait()
            .await
            .map_err(io_err("wait for shim exec", &self.result))?;
        let _ = tokio::fs::remove_file(&self.process).await;
        if let Some(p) = &self.resize {
            let _ = tokio::fs::remove_file(p).await;
        }
        let body = tokio::fs::read(&self.result)
            .await
            .map_err(io_err("read exec result", &self.result))?;
        let _ = tokio::fs::remove_file(&self.result).await;
        let r: ExecResult = serde_json::from_slice(&body).map_err(|source| Error::Json {
            path: self.result.clone(),
            source,
        })?;
        match (r.exit_code, r.error) {
            (Some(code), _) => Ok(code),
            (None, e) => Err(Error::Shim {
                id: self.id,
                message: e.unwrap_or_else(|| "exec failed".into()),
            }),
        }
    }
}

/// Which stream an attach frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachStream {
    /// the container's stdout
    Stdout,
    /// the container's stderr
    Stderr,
}

/// A connection to a running container's stdio through its shim.
#[derive(Debug)]
pub struct Attach {
    stream: tokio::net::UnixStream,
}

impl Attach {
    /// The next chunk of output; `None` when the container's output ended.
    pub async fn next(&mut self) -> Result<Option<(AttachStream, Vec<u8>)>> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 5];
        match self.stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io_err("read attach stream", PathBuf::from("attach"))(e)),
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut data = vec![0u8; len];
        self.stream
            .read_exact(&mut data)
            .await
            .map_err(io_err("read attach stream", PathBuf::from("attach")))?;
        let which = if head[0] == 2 {
            AttachStream::Stderr
        } else {
            AttachStream::Stdout
        };
        Ok(Some((which, data)))
    }

    /// Sends bytes to the container's stdin (if it was created with `stdin`).
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream
            .write_all(data)
            .await
            .map_err(io_err("write attach stdin", PathBuf::from("attach")))
    }

    /// Closes our stdin side (with `stdin_once` the container's stdin closes too).
    pub async fn close_stdin(&mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream
            .shutdown()
            .await
            .map_err(io_err("close attach stdin", PathBuf::from("attach")))
    }
}

/// Output of a synchronous exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// exit code (128+signal when killed)
    pub exit_code: i32,
    /// stdout
    pub stdout: Vec<u8>,
    /// stderr
    pub stderr: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ContainerRecord {
    id: String,
    sandbox_id: Option<String>,
    config: ContainerConfig,
    image_digest: String,
    log_path: PathBuf,
    cgroup: String,
    created_at: i64,
}

/// The built-in container runtime. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BuiltinRuntime {
    cfg: Arc<RuntimeConfig>,
    cgroups: Cgroups,
    registries: Arc<RegistriesConfig>,
    /// Shim runs (a container's creation by libcontainer) going on at once (see
    /// [`create_slots`]).
    create_slots: Arc<tokio::sync::Semaphore>,
    /// Whether the sandboxes dir is a mount of its own (see [`ensure_pins_mount`]); None until
    /// first needed.
    pins_mount: Arc<std::sync::Mutex<Option<bool>>>,
    /// Container records by id, read from disk once: a record is written at creation and never
    /// changed, and the kubelet asks every container's status at every pod sync.
    records: Arc<std::sync::Mutex<HashMap<String, Arc<ContainerRecord>>>>,
    /// The shim zygote, started at the first container creation.
    zygote: Arc<std::sync::Mutex<Option<Zygote>>>,
}

/// A running `skiff shim zygote` and the runtime's end of its request socket. Closing the
/// socket ends it; dropping this also kills and reaps it at once.
#[derive(Debug)]
struct Zygote {
    /// a `SOCK_SEQPACKET` socket: one message per request, and end-of-file for the zygote when
    /// this end closes (a datagram socket has none, and the zygote would outlive the server)
    sock: std::os::fd::OwnedFd,
    child: std::process::Child,
}

impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many container creations run at once: twice the CPUs. A creation is CPU work in the
/// kernel under global locks (the mount table, cgroup and sysfs trees); a burst of 100 at once
/// only made them queue there. Measured with `make bench-pods` on 2 CPUs (BENCHMARKS.md): 4 at
/// once gave the burst p99 1.10-1.28 s against 1.18-1.49 s unlimited, at the same CPU cost; 2
/// and 8 were no better than 4.
fn create_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 2)
}

/// Bytes under `dir`: the lengths of everything in it but directories (a symlink counts its own
/// length and is not followed; unreadable parts are skipped).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let ok =
        fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if ok.is_err() {
        let t = now_ns() as u64 ^ u64::from(std::process::id());
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 8) * 8)) as u8;
        }
    }
    hex::encode(b)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A prepared container's rootfs and spec, made once its creation has a slot (see
/// [`BuiltinRuntime::create`]).
struct PendingRootfs {
    rootfs: PathBuf,
    overlay_opts: String,
    cfg: ContainerConfig,
    image_config: crate::store::ImageConfig,
    place: Placement,
    spec_path: PathBuf,
}

impl PendingRootfs {
    /// Mounts the overlay rootfs and writes the OCI spec (the user is resolved from the
    /// mounted rootfs' /etc/passwd and /etc/group).
    fn mount_and_write_spec(self) -> Result<()> {
        mount(
            Some("overlay"),
            &self.rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(self.overlay_opts.as_str()),
        )
        .map_err(sys_err(format!(
            "mount overlay rootfs at {}",
            self.rootfs.display()
        )))?;
        let spec = build_spec(&self.cfg, &self.image_config, &self.rootfs, &self.place)?;
        let body = serde_json::to_vec_pretty(&spec).map_err(|source| Error::Json {
            path: self.spec_path.clone(),
            source,
        })?;
        fs::write(&self.spec_path, body).map_err(io_err("write", &self.spec_path))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::InvalidState(format!("runtime task failed: {e}")))?
}

impl BuiltinRuntime {
    /// Opens a runtime on its state dir; containers already there (held by running shims) are
    /// adopted as they are.
    pub fn new(cfg: RuntimeConfig) -> Result<Self> {
        for d in ["containers", "sandboxes", "lc"] {
            let p = cfg.state_dir.join(d);
            fs::create_dir_all(&p).map_err(io_err("create runtime state dir", &p))?;
        }
        if cfg.shim_command.is_empty() {
            return Err(Error::InvalidState(
                "runtime config: shim_command is empty; give the skiff binary path".into(),
            ));
        }
        Ok(Self {
            cfg: Arc::new(cfg),
            cgroups: Cgroups::host(),
            registries: Arc::new(RegistriesConfig::default()),
            create_slots: Arc::new(tokio::sync::Semaphore::new(create_slots())),
            pins_mount: Arc::new(std::sync::Mutex::new(None)),
            records: Arc::default(),
            zygote: Arc::default(),
        })
    }

    /// Uses `registries` (mirrors, auth, TLS from `registries.yaml`) for pulls.
    pub fn with_registries(mut self, registries: RegistriesConfig) -> Self {
        self.registries = Arc::new(registries);
        self
    }

    /// The registry configuration pulls use.
    pub fn registries(&self) -> &RegistriesConfig {
        &self.registries
    }

    /// Bytes of an image's blobs (config and layers, compressed) as stored.
    pub fn image_size(&self, manifest_digest: &str) -> u64 {
        let Ok(image) = self.cfg.images.resolve(manifest_digest) else {
            return 0;
        };
        image.manifest.layers.iter().map(|l| l.size).sum::<u64>() + image.manifest.config.size
    }

    /// The image store.
    pub fn images(&self) -> &ImageStore {
        &self.cfg.images
    }

    fn ctr_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("containers").join(id)
    }

    fn sb_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("sandboxes").join(id)
    }

    // ---------------------------------------------------------------- sandboxes

    /// Makes the sandboxes dir a mount of its own, once (see [`ensure_pins_mount`]); returns
    /// whether it is one. Failing that only costs speed, so it is logged, not returned.
    fn pins_mounted(&self) -> bool {
        let mut m = self
            .pins_mount
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = *m {
            return v;
        }
        let dir = self.cfg.state_dir.join("sandboxes");
        let v = match ensure_pins_mount(&dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "sandboxes dir not mounted on its own; container creations read every pin");
                false
            }
        };
        *m = Some(v);
        v
    }

    /// Unmounts the sandboxes dir's own mount (see [`ensure_pins_mount`]), for tearing a
    /// runtime down once its sandboxes are gone. `skiff killall` does the same.
    pub fn release_pins_mount(&self) {
        let mut m = self
            .pins_mount
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        release_pins_mount(&self.cfg.state_dir.join("sandboxes"));
        *m = None;
    }

    /// Creates a pod sandbox: pinned namespaces and a pod cgroup path.
    pub async fn create_sandbox(&self, cfg: SandboxConfig) -> Result<Sandbox> {
        let me = self.clone();
        blocking(move || me.create_sandbox_blocking(cfg)).await
    }

    fn create_sandbox_blocking(&self, cfg: SandboxConfig) -> Result<Sandbox> {
        if !valid_name(&cfg.name) {
            return Err(Error::Spec(format!(
                "sandbox name {:?} must be 1-40 of [A-Za-z0-9._-]",
                cfg.name
            )));
        }
        let id = format!("{}-{}", cfg.name, random_hex(6));
        self.pins_mounted();
        let dir = self.sb_dir(&id);
        fs::create_dir_all(&dir).map_err(io_err("create sandbox dir", &dir))?;
        let (netns, utsns, ipcns) = match pin_namespaces(&dir, &cfg) {
            Ok(x) => x,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let sb = Sandbox {
            id: id.clone(),
            config: cfg,
            netns,
            utsns,
            ipcns,
            cgroup: format!("/{}/{}", self.cfg.cgroup_parent.trim_matches('/'), id),
            created_at: now_ns(),
        };
        let p = dir.join("sandbox.json");
        let body = serde_json::to_vec_pretty(&sb).map_err(|source| Error::Json {
            path: p.clone(),
            source,
        })?;
        fs::write(&p, body).map_err(io_err("write", &p))?;
        tracing::info!(sandbox = %id, netns = ?sb.netns, "sandbox created");
        Ok(sb)
    }

    /// A sandbox by id.
    pub fn sandbox(&self, id: &str) -> Result<Sandbox> {
        let p = self.sb_dir(id).join("sandbox.json");
        let b = fs::read(&p).map_err(|_| Error::NotFound {
            kind: "sandbox",
            id: id.into(),
        })?;
        serde_json::from_slice(&b).map_err(|source| Error::Json { path: p, source })
    }

    /// All sandboxes.
    pub fn list_sandboxes(&self) -> Result<Vec<Sandbox>> {
        let d = self.cfg.state_dir.join("sandboxes");
        let mut out = Vec::new();
        for e in fs::read_dir(&d).map_err(io_err("read", &d))?.flatten() {
            if let Ok(sb) = self.sandbox(&e.file_name().to_string_lossy()) {
                out.push(sb);
            }
        }
        Ok(out)
    }

    /// Removes a sandbox: its containers (stopped with no grace), namespaces, pod cgroup.
    pub async fn remove_sandbox(&self, id: &str) -> Result<()> {
        for c in self.list().await? {
            if c.sandbox_id.as_deref() == Some(id) {
                self.remove(&c.id).await?;
            }
        }
        let me = self.clone();
        let id = id.to_string();
        blocking(move || {
            let sb = me.sandbox(&id)?;
            let dir = me.sb_dir(&id);
            unpin(&dir);
            me.cgroups.remove(&sb.cgroup)?;
            fs::remove_dir_all(&dir).map_err(io_err("remove sandbox dir", &dir))?;
            tracing::info!(sandbox = %id, "sandbox removed");
            Ok(())
        })
        .await
    }

    // ---------------------------------------------------------------- containers

    /// Creates a container (in a sandbox, or standalone with its own namespaces) and its shim.
    /// The process waits for [`BuiltinRuntime::start`].
    pub async fn create(
        &self,
        sandbox_id: Option<&str>,
        cfg: ContainerConfig,
        log_path: PathBuf,
    ) -> Result<String> {
        let me = self.clone();
        let sb = sandbox_id.map(str::to_string);
        let (id, args, rootfs) = blocking(move || me.prepare(sb.as_deref(), cfg, log_path)).await?;
        // Only the rootfs mount and the shim's run take a slot: preparing (which may unpack a
        // big image) does not hold up other pods' creations. The overlay is mounted once the
        // slot is ours, so the host holds at most one mounted rootfs per slot at a time: every
        // creation reads and copies the host's mount table (see `shim::detach_host_rootfs`),
        // and 100 waiting pods' overlays made each of them several times slower.
        let _slot = self.create_slots.acquire().await;
        let me = self.clone();
        let id2 = id.clone();
        blocking(move || {
            let r = rootfs.mount_and_write_spec();
            if r.is_err() {
                let _ = me.cleanup_dir(&id2);
            }
            r
        })
        .await?;
        let shim_args = args.to_args();
        let me = self.clone();
        let a2 = shim_args.clone();
        let outcome = match blocking(move || Ok(me.create_via_zygote(&a2))).await? {
            Some(outcome) => outcome,
            None => {
                let mut cmd = tokio::process::Command::new(&self.cfg.shim_command[0]);
                cmd.args(&self.cfg.shim_command[1..])
                    .args(&shim_args)
                    .stdin(std::process::Stdio::null());
                match cmd.output().await {
                    Ok(out) if out.status.success() => Ok(()),
                    Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
                    Err(e) => {
                        // No shim ran: undo the prepared rootfs mount and dirs.
                        let me = self.clone();
                        let id2 = id.clone();
                        let _ = blocking(move || me.cleanup_dir(&id2)).await;
                        return Err(io_err(
                            "run shim (check the shim command)",
                            PathBuf::from(&self.cfg.shim_command[0]),
                        )(e));
                    }
                }
            }
        };
        if let Err(mut message) = outcome {
            // The shim's own log says what libcontainer did; keep its tail in the error.
            if let Ok(log) = fs::read_to_string(self.ctr_dir(&id).join("shim.log")) {
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                    .take(8)
                    .collect();
                if !tail.is_empty() {
                    message.push_str("; shim log: ");
                    message.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
                }
            }
            let me = self.clone();
            let id2 = id.clone();
            let _ = blocking(move || me.cleanup_dir(&id2)).await;
            return Err(Error::Shim { id, message });
        }
        tracing::info!(container = %id, "container created");
        Ok(id)
    }

    /// Runs a shim's `create` through the zygote (see `shim::zygote`), starting the zygote
    /// first if there is none or it is gone. Returns what the shim reported, or None when no
    /// zygote could be used: the caller then runs `skiff shim create` itself.
    fn create_via_zygote(&self, args: &[String]) -> Option<std::result::Result<(), String>> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::io::{IoSlice, Read};
        use std::os::fd::AsRawFd;
        let body = serde_json::to_vec(args).ok()?;
        let (mut reply, theirs) = std::os::unix::net::UnixStream::pair().ok()?;
        {
            let mut z = self.zygote.lock().ok()?;
            let mut sent = false;
            for _ in 0..2 {
                if z.is_none() {
                    match self.spawn_zygote() {
                        Ok(new) => *z = Some(new),
                        Err(e) => {
                            tracing::warn!(error = %e, "shim zygote not started; running shims directly");
                            return None;
                        }
                    }
                }
                let sock = z.as_ref()?.sock.as_raw_fd();
                let fds = [theirs.as_raw_fd()];
                match sendmsg::<()>(
                    sock,
                    &[IoSlice::new(&body)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                ) {
                    Ok(_) => {
                        sent = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "shim zygote gone; starting a new one");
                        *z = None;
                    }
                }
            }
            if !sent {
                return None;
            }
        }
        // Only the forked child (and, until it closes what it inherited, its shim) holds the
        // other end now: end-of-file comes once the creation is decided.
        drop(theirs);
        let mut out = String::new();
        let _ = reply.read_to_string(&mut out);
        Some(match out.trim_end() {
            "ok" => Ok(()),
            "" => Err("skiff shim: the shim died before reporting".into()),
            m => Err(m.to_string()),
        })
    }

    fn spawn_zygote(&self) -> std::io::Result<Zygote> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (sock, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.cfg.state_dir.join("shim-zygote.log"))?;
        let child = std::process::Command::new(&self.cfg.shim_command[0])
            .args(&self.cfg.shim_command[1..])
            .args(["zygote", "--root"])
            .arg(&self.cfg.state_dir)
            .arg(" ".repeat(crate::shim::ZYGOTE_CMDLINE_ROOM))
            .stdin(std::process::Stdio::from(theirs))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        tracing::debug!(pid = child.id(), "shim zygote started");
        Ok(Zygote { sock, child })
    }

    fn prepare(
        &self,
        sandbox_id: Option<&str>,
        cfg: ContainerConfig,
        log_path: PathBuf,
    ) -> Result<(String, CreateArgs, PendingRootfs)> {
        if !valid_name(&cfg.name) {
            return Err(Error::Spec(format!(
                "container name {:?} must be 1-40 of [A-Za-z0-9._-]",
                cfg.name
            )));
        }
        let sb = sandbox_id.map(|s| self.sandbox(s)).transpose()?;
        let image = self.cfg.images.resolve(&cfg.image)?;
        let layers = self.cfg.images.unpacked_layers(&image)?;
        let id = format!("{}-{}", cfg.name, random_hex(6));
        let dir = self.ctr_dir(&id);
        let res = (|| -> Result<(CreateArgs, PendingRootfs)> {
            for d in ["rootfs", "upper", "work", "bundle"] {
                fs::create_dir_all(dir.join(d)).map_err(io_err("create", dir.join(d)))?;
            }
            let rootfs = dir.join("rootfs");
            let lower: Vec<String> = layers
                .iter()
                .rev()
                .map(|p| p.display().to_string())
                .collect();
            if lower.is_empty() {
                return Err(Error::InvalidImage {
                    path: PathBuf::from(&image.name),
                    reason: "image has no layers".into(),
                });
            }
            let overlay_opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.join(":"),
                dir.join("upper").display(),
                dir.join("work").display()
            );
            let cgroup = match &sb {
                Some(sb) => format!("{}/{}", sb.cgroup, id),
                None => format!("/{}/{}", self.cfg.cgroup_parent.trim_matches('/'), id),
            };
            let place = Placement {
                netns: sb.as_ref().and_then(|s| s.netns.clone()),
                utsns: sb.as_ref().map(|s| s.utsns.clone()),
                ipcns: sb.as_ref().and_then(|s| s.ipcns.clone()),
                private_net: sb.is_none(),
                cgroups_path: cgroup.clone(),
                host_ipc: sb.as_ref().is_some_and(|s| s.config.host_ipc),
            };
            let pending = PendingRootfs {
                rootfs,
                overlay_opts,
                cfg: cfg.clone(),
                image_config: image.config.clone(),
                place,
                spec_path: dir.join("bundle/config.json"),
            };
            let rec = ContainerRecord {
                id: id.clone(),
                sandbox_id: sandbox_id.map(str::to_string),
                config: cfg.clone(),
                image_digest: image.manifest_digest.clone(),
                log_path: log_path.clone(),
                cgroup: cgroup.clone(),
                created_at: now_ns(),
            };
            let rp = dir.join("container.json");
            let body = serde_json::to_vec_pretty(&rec).map_err(|source| Error::Json {
                path: rp.clone(),
                source,
            })?;
            fs::write(&rp, body).map_err(io_err("write", &rp))?;
            let args = CreateArgs {
                id: id.clone(),
                dir: dir.clone(),
                root: self.cfg.state_dir.join("lc"),
                log: log_path,
                cgroup,
                stdin: cfg.stdin,
                stdin_once: cfg.stdin_once,
                tty: cfg.tty,
                pins_root: (sandbox_id.is_some() && self.pins_mounted())
                    .then(|| self.cfg.state_dir.join("sandboxes")),
                sandbox_dir: sandbox_id.map(|s| self.sb_dir(s)),
            };
            Ok((args, pending))
        })();
        match res {
            Ok((a, p)) => Ok((id, a, p)),
            Err(e) => {
                let _ = self.cleanup_dir(&id);
                Err(e)
            }
        }
    }

    fn record(&self, id: &str) -> Result<Arc<ContainerRecord>> {
        if let Some(r) = self.records.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(r);
        }
        let p = self.ctr_dir(id).join("container.json");
        let b = fs::read(&p).map_err(|_| Error::NotFound {
            kind: "container",
            id: id.into(),
        })?;
        let r: Arc<ContainerRecord> =
            Arc::new(serde_json::from_slice(&b).map_err(|source| Error::Json { path: p, source })?);
        if let Ok(mut m) = self.records.lock() {
            m.insert(id.to_string(), r.clone());
        }
        Ok(r)
    }

    fn shim_alive(st: &ShimState) -> bool {
        kill(Pid::from_raw(st.shim_pid), None).is_ok()
            && fs::read_to_string(format!("/proc/{}/stat", st.shim_pid))
                .is_ok_and(|s| !s.contains(") Z "))
    }

    fn status_blocking(&self, id: &str) -> Result<ContainerStatus> {
        let rec = self.record(id)?;
        let st = read_state(&self.ctr_dir(id)).ok();
        let state = match &st {
            None => ContainerState::Unknown,
            Some(s) => match s.status {
                ShimStatus::Exited => ContainerState::Exited,
                _ if !Self::shim_alive(s) => ContainerState::Unknown,
                ShimStatus::Created => ContainerState::Created,
                ShimStatus::Running => ContainerState::Running,
            },
        };
        Ok(ContainerStatus {
            id: rec.id.clone(),
            name: rec.config.name.clone(),
            sandbox_id: rec.sandbox_id.clone(),
            image: rec.config.image.clone(),
            image_digest: rec.image_digest.clone(),
            state,
            pid: st.as_ref().and_then(|s| s.pid),
            created_at: rec.created_at,
            started_at: st.as_ref().and_then(|s| s.started_at),
            finished_at: st.as_ref().and_then(|s| s.finished_at),
            exit_code: st.as_ref().and_then(|s| s.exit_code),
            oom_killed: st.as_ref().is_some_and(|s| s.oom_killed),
            log_path: rec.log_path.clone(),
            error: st.and_then(|s| s.error),
        })
    }

    /// The status of one container.
    pub async fn status(&self, id: &str) -> Result<ContainerStatus> {
        let me = self.clone();
        let id = id.to_string();
        blocking(move || me.status_blocking(&id)).await
    }

    /// All containers (also those created by an earlier runtime instance).
    pub async fn list(&self) -> Result<Vec<ContainerStatus>> {
        let me = self.clone();
        blocking(move || {
            let d = me.cfg.state_dir.join("containers");
            let mut out = Vec::new();
            for e in fs::read_dir(&d).map_err(io_err("read", &d))?.flatten() {
                if let Ok(s) = me.status_blocking(&e.file_name().to_string_lossy()) {
                    out.push(s);
                }
            }
            out.sort_by_key(|s| s.created_at);
            Ok(out)
        })
        .await
    }

    fn send_ctl(&self, id: &str, cmd: &str) -> Result<()> {
        let p = self.ctr_dir(id).join(CTL_FIFO);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .map_err(io_err("open shim control fifo (is the shim alive?)", &p))?;
        f.write_all(format!("{cmd}\n").as_bytes())
            .map_err(io_err("write", &p))
    }

    async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&ContainerStatus) -> bool,
    ) -> Result<ContainerStatus> {
        let deadline = Instant::now() + timeout;
        // Short waits are the common case (start, exit of a short command): back off from 1 ms.
        let mut pause = Duration::from_millis(1);
        loop {
            let s = self.status(id).await?;
            if pred(&s) || Instant::now() >= deadline {
                return Ok(s);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    /// Starts a created container.
    pub async fn start(&self, id: &str) -> Result<()> {
        let s = self.status(id).await?;
        if s.state != ContainerState::Created {
            return Err(Error::InvalidState(format!(
                "container {id} is {:?}, not created; it cannot be started",
                s.state
            )));
        }
        let me = self.clone();
        let id2 = id.to_string();
        blocking(move || me.send_ctl(&id2, "start")).await?;
        let s = self
            .wait_for(id, Duration::from_secs(10), |s| {
                s.state != ContainerState::Created || s.error.is_some()
            })
            .await?;
        if let Some(e) = s.error {
            return Err(Error::Shim {
                id: id.into(),
                message: e,
            });
        }
        if s.state == ContainerState::Created {
            return Err(Error::Shim {
                id: id.into(),
                message: "did not start within 10s".into(),
            });
        }
        Ok(())
    }

    /// Connects to a running container's stdio (output from now on; stdin if enabled).
    pub async fn attach(&self, id: &str) -> Result<Attach> {
        let s = self.status(id).await?;
        if !matches!(s.state, ContainerState::Running | ContainerState::Created) {
            return Err(Error::InvalidState(format!(
                "container {id} is {:?}; attach needs a running container",
                s.state
            )));
        }
        let p = self.ctr_dir(id).join(crate::shim::ATTACH_SOCKET);
        let stream = tokio::net::UnixStream::connect(&p)
            .await
            .map_err(io_err("connect attach socket", &p))?;
        Ok(Attach { stream })
    }

    /// Sets the terminal size of a container created with `tty`.
    pub async fn resize(&self, id: &str, rows: u16, cols: u16) -> Result<()> {
        let me = self.clone();
        let id = id.to_string();
        blocking(move || me.send_ctl(&id, &format!("resize {rows} {cols}"))).await
    }

    /// Makes the shim continue the log in a new file at the log path (after the caller renamed
    /// the old one: log rotation, CRI ReopenContainerLog).
    pub async fn reopen_log(&self, id: &str) -> Result<()> {
        let s = self.status(id).await?;
        if s.state != ContainerState::Running {
            return Err(Error::InvalidState(format!(
                "container {id} is {:?}; only a running container's log can be reopened",
                s.state
            )));
        }
        let me = self.clone();
        let id2 = id.to_string();
        blocking(move || me.send_ctl(&id2, "reopen-log")).await?;
        let path = s.log_path.clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            if Instant::now() >= deadline {
                return Err(Error::Shim {
                    id: id.into(),
                    message: format!("did not reopen {}", path.display()),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Waits until the container exits (or `timeout` passes) and returns its status.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<ContainerStatus> {
        self.wait_for(id, timeout, |s| {
            matches!(s.state, ContainerState::Exited | ContainerState::Unknown)
        })
        .await
    }

    fn signal(&self, id: &str, sig: Signal) -> Result<()> {
        let st = read_state(&self.ctr_dir(id))?;
        if let (Some(pid), Some(ticks)) = (st.pid, st.pid_start_ticks) {
            // Only signal the process we created, never a reused pid.
            if st.status != ShimStatus::Exited && pid_start_ticks(pid) == Some(ticks) {
                match kill(Pid::from_raw(pid), sig) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => {
                        return Err(Error::Sys {
                            op: format!("signal {sig} to container {id}"),
                            source: e,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the container's recorded init process still exists (same pid, same start time).
    fn process_alive(&self, id: &str) -> bool {
        match read_state(&self.ctr_dir(id)) {
            Ok(ShimState {
                pid: Some(pid),
                pid_start_ticks: Some(t),
                ..
            }) => {
                pid_start_ticks(pid) == Some(t)
                    && !fs::read_to_string(format!("/proc/{pid}/stat"))
                        .is_ok_and(|s| s.contains(") Z "))
            }
            _ => false,
        }
    }

    /// Stops a running container: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<ContainerStatus> {
        let s = self.status(id).await?;
        match s.state {
            ContainerState::Exited => return Ok(s),
            ContainerState::Unknown => {
                // The shim is gone: nobody reaps or records; kill what is left ourselves.
                self.signal(id, Signal::SIGKILL)?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.process_alive(id) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if self.process_alive(id) {
                    return Err(Error::InvalidState(format!(
                        "container {id} (shim gone) did not die after SIGKILL"
                    )));
                }
                return self.status(id).await;
            }
            ContainerState::Created => {
                let me = self.clone();
                let id2 = id.to_string();
                blocking(move || me.send_ctl(&id2, "delete")).await?;
            }
            ContainerState::Running => {
                if !grace.is_zero() {
                    self.signal(id, Signal::SIGTERM)?;
                    let s = self.wait(id, grace).await?;
                    if s.state != ContainerState::Running {
                        return Ok(s);
                    }
                }
                self.signal(id, Signal::SIGKILL)?;
            }
        }
        let s = self.wait(id, Duration::from_secs(10)).await?;
        if s.state == ContainerState::Running || s.state == ContainerState::Created {
            return Err(Error::InvalidState(format!(
                "container {id} did not stop after SIGKILL"
            )));
        }
        Ok(s)
    }

    /// Removes a container (stopping it with no grace first): shim, rootfs mount, state dir.
    /// The log file is left to its owner.
    pub async fn remove(&self, id: &str) -> Result<()> {
        self.stop(id, Duration::ZERO).await?;
        // Let the shim finish its clean-up and exit: woken by its pidfd when the kernel has
        // them, else (and as a backstop) by polling its state.
        if let Ok(st) = read_state(&self.ctr_dir(id))
            && Self::shim_alive(&st)
            && let Some(fd) = crate::shim::pidfd_open(st.shim_pid)
            // SAFETY: the AsyncFd owns this OwnedFd, which stays open and the same descriptor
            // until the AsyncFd is dropped.
            && let Ok(fd) = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
        {
            let _ = tokio::time::timeout(Duration::from_secs(10), fd.readable()).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut pause = Duration::from_millis(1);
        while let Ok(st) = read_state(&self.ctr_dir(id)) {
            if !Self::shim_alive(&st) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(25));
        }
        let me = self.clone();
        let id = id.to_string();
        blocking(move || me.cleanup_dir(&id)).await
    }

    fn cleanup_dir(&self, id: &str) -> Result<()> {
        let dir = self.ctr_dir(id);
        let rootfs = dir.join("rootfs");
        if is_mounted(&rootfs) {
            umount2(&rootfs, MntFlags::MNT_DETACH)
                .map_err(sys_err(format!("unmount {}", rootfs.display())))?;
        }
        if let Ok(rec) = self.record(id) {
            // libcontainer removes the leaf; make sure (e.g. after a failed create).
            if self.cgroups.exists(&rec.cgroup) {
                let _ = self.cgroups.remove(&rec.cgroup);
            }
        }
        let lc = self.cfg.state_dir.join("lc").join(id);
        if lc.exists() {
            let _ = fs::remove_dir_all(&lc);
        }
        if let Ok(mut m) = self.records.lock() {
            m.remove(id);
        }
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err("remove container dir", &dir))?;
        }
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    /// Checks that `id` runs and writes the exec's process file; returns (result path, process path).
    async fn prepare_exec(
        &self,
        id: &str,
        argv: &[String],
        tty: bool,
    ) -> Result<(PathBuf, PathBuf)> {
        let s = self.status(id).await?;
        if s.state != ContainerState::Running {
            return Err(Error::InvalidState(format!(
                "container {id} is {:?}; exec needs a running container",
                s.state
            )));
        }
        let result = self
            .ctr_dir(id)
            .join(format!("exec-{}.json", random_hex(6)));
        let process = self.exec_process_file(id, argv, tty, &result)?;
        Ok((result, process))
    }

    /// Runs a command in a running container and returns its output.
    pub async fn exec(&self, id: &str, argv: Vec<String>, timeout: Duration) -> Result<ExecOutput> {
        let (result, process) = self.prepare_exec(id, &argv, false).await?;
        let args = ExecArgs {
            id: id.into(),
            root: self.cfg.state_dir.join("lc"),
            result: result.clone(),
            argv,
            process: Some(process.clone()),
            tty: false,
            resize: None,
        };
        let mut cmd = tokio::process::Command::new(&self.cfg.shim_command[0]);
        cmd.args(&self.cfg.shim_command[1..])
            .args(args.to_args())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| {
                Error::InvalidState(format!("exec in {id} did not finish within {timeout:?}"))
            })?
            .map_err(io_err(
                "run shim exec",
                PathBuf::from(&self.cfg.shim_command[0]),
            ))?;
        let _ = tokio::fs::remove_file(&process).await;
        let body = tokio::fs::read(&result)
            .await
            .map_err(io_err("read exec result", &result))?;
        let _ = tokio::fs::remove_file(&result).await;
        let r: ExecResult = serde_json::from_slice(&body).map_err(|source| Error::Json {
            path: result,
            source,
        })?;
        match (r.exit_code, r.error) {
            (Some(code), _) => Ok(ExecOutput {
                exit_code: code,
                stdout: out.stdout,
                stderr: out.stderr,
            }),
            (None, e) => Err(Error::Shim {
                id: id.into(),
                message: e.unwrap_or_else(|| "exec failed".into()),
            }),
        }
    }

    /// Starts a command in a running container with piped stdin/stdout/stderr (streaming exec).
    /// With `tty` the command gets a pseudo-terminal: its output comes on stdout only and
    /// [`ExecProcess::resize`] sets the window size.
    pub async fn exec_stream(&self, id: &str, argv: Vec<String>, tty: bool) -> Result<ExecProcess> {
        let (result, process) = self.prepare_exec(id, &argv, tty).await?;
        let resize = if tty {
            let p = result.with_extension("resize");
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(sys_err(format!("mkfifo {}", p.display())))?;
            Some(p)
        } else {
            None
        };
        let args = ExecArgs {
            id: id.into(),
            root: self.cfg.state_dir.join("lc"),
            result: result.clone(),
            argv,
            process: Some(process.clone()),
            tty,
            resize: resize.clone(),
        };
        let mut cmd = tokio::process::Command::new(&self.cfg.shim_command[0]);
        cmd.args(&self.cfg.shim_command[1..])
            .args(args.to_args())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(io_err(
            "run shim exec",
            PathBuf::from(&self.cfg.shim_command[0]),
        ))?;
        Ok(ExecProcess {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            result,
            id: id.into(),
            process,
            resize,
        })
    }

    /// Writes the OCI process of an exec: the container's own (user, groups, env, cwd,
    /// capabilities, no_new_privs) with `argv` and the terminal flag.
    fn exec_process_file(
        &self,
        id: &str,
        argv: &[String],
        tty: bool,
        result: &Path,
    ) -> Result<PathBuf> {
        let sp = self.ctr_dir(id).join("bundle/config.json");
        let b = fs::read(&sp).map_err(io_err("read", &sp))?;
        let spec: serde_json::Value = serde_json::from_slice(&b).map_err(|source| Error::Json {
            path: sp.clone(),
            source,
        })?;
        let mut p = spec.get("process").cloned().unwrap_or_default();
        p["args"] = serde_json::json!(argv);
        p["terminal"] = serde_json::json!(tty);
        if tty
            && let Some(env) = p["env"].as_array_mut()
            && !env
                .iter()
                .any(|e| e.as_str().is_some_and(|s| s.starts_with("TERM=")))
        {
            env.push(serde_json::json!("TERM=xterm"));
        }
        let path = result.with_extension("process.json");
        let body = serde_json::to_vec(&p).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        fs::write(&path, body).map_err(io_err("write", &path))?;
        Ok(path)
    }

    /// CPU and memory usage of a container.
    pub async fn stats(&self, id: &str) -> Result<CgroupStats> {
        let rec = self.record(id)?;
        Ok(self.cgroups.stats(&rec.cgroup))
    }

    /// Bytes in the container's writable layer (its overlay upper dir): regular files' sizes,
    /// as the kubelet's ephemeral-storage accounting counts them.
    pub async fn writable_layer_bytes(&self, id: &str) -> Result<u64> {
        self.record(id)?;
        let upper = self.ctr_dir(id).join("upper");
        blocking(move || Ok(dir_bytes(&upper))).await
    }

    /// The cgroup path of a container (relative to the cgroup root).
    pub fn cgroup_of(&self, id: &str) -> Result<String> {
        Ok(self.record(id)?.cgroup.clone())
    }

    /// The container's state dir (for diagnostics and tests).
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.ctr_dir(id)
    }

    /// Removes the runtime's cgroup parent (when nothing is left in it).
    pub fn remove_cgroup_parent(&self) -> Result<()> {
        self.cgroups
            .remove(&format!("/{}", self.cfg.cgroup_parent.trim_matches('/')))
    }

    /// Manifest digests of images that containers (in any state) use.
    pub async fn image_digests_in_use(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = self
            .list()
            .await?
            .into_iter()
            .map(|c| c.image_digest)
            .collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Image garbage collection: when the image file system is more than `high_pct` full,
    /// untags images no container uses (in name order; no last-used tracking yet) until it is
    /// below `low_pct` or none is left, then deletes unreachable blobs and layers. Returns the
    /// names removed.
    pub async fn gc_images(&self, high_pct: u8, low_pct: u8) -> Result<Vec<String>> {
        let store = self.cfg.images.clone();
        let pct = |s: &ImageStore| -> Result<u64> {
            let (used, total) = s.fs_usage()?;
            Ok((used * 100).checked_div(total).unwrap_or(0))
        };
        if pct(&store)? < u64::from(high_pct) {
            return Ok(Vec::new());
        }
        let in_use = self.image_digests_in_use().await?;
        let mut removed = Vec::new();
        for e in store.list()? {
            if in_use.contains(&e.manifest_digest) {
                continue;
            }
            store.untag(&e.name)?;
            removed.push(e.name);
            let keep = in_use.clone();
            let s2 = store.clone();
            blocking(move || s2.gc(&keep)).await?;
            if pct(&store)? < u64::from(low_pct) {
                break;
            }
        }
        let keep = in_use.clone();
        let s2 = store.clone();
        blocking(move || s2.gc(&keep)).await?;
        Ok(removed)
    }

    /// Opens a TCP connection to `port` on the loopback of a sandbox's network namespace.
    pub async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<tokio::net::TcpStream> {
        let sb = self.sandbox(sandbox_id)?;
        let Some(netns) = sb.netns else {
            return Err(Error::InvalidState(format!(
                "sandbox {sandbox_id} uses the host network; connect to the port directly"
            )));
        };
        let std = blocking(move || {
            crate::sandbox::connect_in_netns(&netns, port, Duration::from_secs(5))
        })
        .await?;
        std.set_nonblocking(true)
            .map_err(io_err("set nonblocking", PathBuf::from(sandbox_id)))?;
        tokio::net::TcpStream::from_std(std).map_err(io_err(
            "register port-forward socket",
            PathBuf::from(sandbox_id),
        ))
    }

    /// Removes an image name, refused while a container (in any state) uses the image, then
    /// deletes the blobs and unpacked layers nothing else needs.
    pub async fn remove_image(&self, reference: &str) -> Result<bool> {
        let image = self.cfg.images.resolve(reference)?;
        for c in self.list().await? {
            if c.image_digest == image.manifest_digest {
                return Err(Error::InvalidState(format!(
                    "image {} is used by container {}; remove the container first",
                    image.name, c.id
                )));
            }
        }
        let removed = self.cfg.images.untag(reference)?;
        if removed {
            // Give the space back: blobs and unpacked layers no named image or container needs.
            let keep = self.image_digests_in_use().await?;
            let store = self.cfg.images.clone();
            blocking(move || store.gc(&keep)).await?;
        }
        Ok(removed)
    }

    /// The state dir.
    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }
}
