//! The `Runtime` trait the kubelet sees: one object-safe async interface over pod sandboxes,
//! containers, exec/attach/port-forward and images, implemented by the built-in runtime
//! ([`BuiltinRuntime`]) and by the CRI client (`crate::cri`). Knows no Kubernetes types.

use std::collections::HashSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::cgroup::CgroupStats;
use crate::error::{Error, Result};
use crate::pull::{Credentials, PullProgress};
use crate::runtime::{
    Attach, AttachStream, BuiltinRuntime, ContainerStatus, ExecOutput, ExecProcess,
};
use crate::sandbox::SandboxConfig;
use crate::spec::ContainerConfig;

/// A byte stream in both directions (a port-forward connection).
pub trait DuplexStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> DuplexStream for T {}

/// A boxed reader half.
pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
/// A boxed writer half.
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// State of a pod sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    /// namespaces exist, containers can be created in it
    Ready,
    /// stopped (its containers are stopped), still to be removed
    NotReady,
}

/// What a runtime reports about a pod sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxStatus {
    /// the sandbox id
    pub id: String,
    /// the name it was created with
    pub name: String,
    /// state
    pub state: SandboxState,
    /// the network namespace path for the pod network (None with host network)
    pub netns: Option<PathBuf>,
    /// creation time (ns since epoch)
    pub created_at: i64,
    /// the pod IP the runtime's own network set-up gave the sandbox (CRI runtimes, which call
    /// CNI themselves); None when the caller sets up the pod network
    pub ip: Option<std::net::IpAddr>,
}

/// A streaming request the runtime may serve from its own streaming server (CRI `Exec`,
/// `Attach`, `PortForward` answer with a URL the kubelet proxies the client's upgrade to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRequest {
    /// `kubectl exec`
    Exec {
        /// container id
        id: String,
        /// the command
        argv: Vec<String>,
        /// allocate a TTY
        tty: bool,
        /// stream stdin
        stdin: bool,
        /// stream stdout
        stdout: bool,
        /// stream stderr
        stderr: bool,
    },
    /// `kubectl attach`
    Attach {
        /// container id
        id: String,
        /// the container has a TTY
        tty: bool,
        /// stream stdin
        stdin: bool,
        /// stream stdout
        stdout: bool,
        /// stream stderr
        stderr: bool,
    },
    /// `kubectl port-forward`
    PortForward {
        /// sandbox id
        sandbox_id: String,
        /// the ports asked for (may be empty: SPDY clients name them per stream)
        ports: Vec<u16>,
    },
}

/// One image known to a runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// the image id (manifest or config digest, as the runtime names it)
    pub id: String,
    /// names (normalised references) pointing at it
    pub names: Vec<String>,
    /// size in bytes, where the runtime reports it
    pub size: u64,
    /// the runtime wants it kept (CRI `pinned`, or the runtime's own sandbox image): image
    /// garbage collection never deletes it
    pub pinned: bool,
}

/// The filesystem a runtime keeps its images on (CRI `ImageFsInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFs {
    /// a path on that filesystem (the runtime's image or snapshot dir): statvfs on it gives
    /// the filesystem's capacity and free space
    pub mountpoint: PathBuf,
    /// bytes the images take there, if the runtime says
    pub used_bytes: Option<u64>,
}

/// A streaming exec: stdio halves and the means to resize and wait.
#[async_trait]
pub trait ExecSession: Send {
    /// Takes the process' stdin (drop it to send end-of-file).
    fn take_stdin(&mut self) -> Option<BoxWrite>;
    /// Takes its stdout.
    fn take_stdout(&mut self) -> Option<BoxRead>;
    /// Takes its stderr (None with a TTY).
    fn take_stderr(&mut self) -> Option<BoxRead>;
    /// Sets the terminal size (TTY execs only).
    fn resize(&self, rows: u16, cols: u16) -> Result<()>;
    /// Waits for the process and returns its exit code.
    async fn wait(self: Box<Self>) -> Result<i32>;
}

/// A connection to a running container's stdio.
#[async_trait]
pub trait AttachSession: Send {
    /// The next chunk of output; `None` when the container's output ended.
    async fn next(&mut self) -> Result<Option<(AttachStream, Vec<u8>)>>;
    /// Sends bytes to the container's stdin.
    async fn write_stdin(&mut self, data: &[u8]) -> Result<()>;
    /// Closes our stdin side.
    async fn close_stdin(&mut self) -> Result<()>;
}

/// How a pull reports progress.
pub type ProgressFn<'a> = &'a (dyn Fn(PullProgress) + Send + Sync);

/// The container runtime as the kubelet uses it. Object-safe: hold it as `Arc<dyn Runtime>`.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// A short name for logs and `skiff node` output (`skiff`, `containerd`, ...).
    fn name(&self) -> String;

    /// The runtime's own version (CRI `Version`), for `nodeInfo.containerRuntimeVersion`;
    /// None: the runtime is skiff's own and has skiff's version.
    fn version(&self) -> Option<String> {
        None
    }

    /// True when the runtime sets up pod networks itself (a CRI runtime calls CNI in
    /// RunPodSandbox): the kubelet then attaches no interface of its own and takes the pod IP
    /// from [`SandboxStatus::ip`].
    fn manages_pod_network(&self) -> bool {
        false
    }

    /// The URL of the runtime's own streaming server for this request, if it has one: the
    /// kubelet then forwards the client's upgrade request there instead of calling
    /// [`Runtime::exec`], [`Runtime::attach`] or [`Runtime::port_forward`].
    async fn streaming_url(&self, req: StreamRequest) -> Result<Option<String>> {
        let _ = req;
        Ok(None)
    }

    // ------------------------------------------------------------ sandboxes
    /// Creates and starts a pod sandbox; returns its id.
    async fn run_sandbox(&self, cfg: SandboxConfig) -> Result<String>;
    /// Stops a sandbox's containers (SIGKILL after `grace`); the sandbox stays until removed.
    async fn stop_sandbox(&self, id: &str, grace: Duration) -> Result<()>;
    /// Removes a sandbox with everything in it.
    async fn remove_sandbox(&self, id: &str) -> Result<()>;
    /// The status of one sandbox.
    async fn sandbox_status(&self, id: &str) -> Result<SandboxStatus>;
    /// All sandboxes.
    async fn list_sandboxes(&self) -> Result<Vec<SandboxStatus>>;

    // ------------------------------------------------------------ containers
    /// Creates a container in a sandbox (or standalone); returns its id.
    async fn create_container(
        &self,
        sandbox_id: Option<&str>,
        cfg: ContainerConfig,
        log_path: PathBuf,
    ) -> Result<String>;
    /// Starts a created container.
    async fn start_container(&self, id: &str) -> Result<()>;
    /// Stops a container: SIGTERM, then SIGKILL after `grace`.
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<ContainerStatus>;
    /// Removes a container (killing it if it still runs).
    async fn remove_container(&self, id: &str) -> Result<()>;
    /// The status of one container.
    async fn container_status(&self, id: &str) -> Result<ContainerStatus>;
    /// All containers.
    async fn list_containers(&self) -> Result<Vec<ContainerStatus>>;
    /// The container's CRI-format log file.
    async fn log_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.container_status(id).await?.log_path)
    }
    /// CPU and memory usage.
    async fn container_stats(&self, id: &str) -> Result<CgroupStats>;
    /// Bytes the container's writable layer takes on disk (what it wrote into its rootfs), as
    /// the kubelet counts it against the pod's ephemeral storage; None if the runtime cannot say.
    async fn writable_layer_bytes(&self, id: &str) -> Result<Option<u64>> {
        let _ = id;
        Ok(None)
    }

    // ------------------------------------------------------------ streaming
    /// Runs a command in a running container and returns its output.
    async fn exec_sync(&self, id: &str, argv: Vec<String>, timeout: Duration)
    -> Result<ExecOutput>;
    /// Starts a command with streaming stdio (and a pseudo-terminal with `tty`).
    async fn exec(&self, id: &str, argv: Vec<String>, tty: bool) -> Result<Box<dyn ExecSession>>;
    /// Connects to a running container's stdio.
    async fn attach(&self, id: &str) -> Result<Box<dyn AttachSession>>;
    /// Sets the terminal size of a container created with `tty`.
    async fn resize(&self, id: &str, rows: u16, cols: u16) -> Result<()>;
    /// Opens a TCP connection to `port` inside a sandbox's network namespace.
    async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<Box<dyn DuplexStream>>;

    // ------------------------------------------------------------ images
    /// Pulls an image (with credentials from imagePullSecrets); returns the image id.
    async fn pull_image(
        &self,
        reference: &str,
        creds: &Credentials,
        progress: ProgressFn<'_>,
    ) -> Result<String>;
    /// Imports an OCI-layout or `docker save` tarball; returns the names imported.
    async fn import_image(&self, archive: PathBuf) -> Result<Vec<String>>;
    /// All images.
    async fn list_images(&self) -> Result<Vec<ImageInfo>>;
    /// One image by reference, or None if the runtime does not have it. Its `pinned` is the
    /// runtime's own flag only; [`Runtime::list_images`] also marks the sandbox image.
    async fn image_status(&self, reference: &str) -> Result<Option<ImageInfo>>;
    /// Removes an image name; false if it was not there.
    async fn remove_image(&self, reference: &str) -> Result<bool>;
    /// Removes an image chosen by image garbage collection. The built-in runtime removes its
    /// first name (the next round removes the next one); a CRI runtime removes the image by id,
    /// with all its names, as the kubelet does.
    async fn collect_image(&self, image: &ImageInfo) -> Result<bool> {
        let name = image.names.first().unwrap_or(&image.id);
        self.remove_image(name).await
    }
    /// The filesystem the runtime keeps its images on, if it reports one (CRI `ImageFsInfo`);
    /// None: the caller decides (the kubelet uses its configured image dir or its root).
    async fn image_fs(&self) -> Result<Option<ImageFs>> {
        Ok(None)
    }
    /// Every image reference and id a container of this runtime uses: all containers the
    /// runtime knows, also those of other clients of a shared runtime, and the images of pod
    /// sandboxes. Image garbage collection keeps these. An error means the set is unknown (and
    /// nothing may be collected).
    async fn images_in_use(&self) -> Result<HashSet<String>> {
        let mut out = HashSet::new();
        for c in self.list_containers().await? {
            out.insert(c.image);
            out.insert(c.image_digest);
        }
        out.remove("");
        Ok(out)
    }
}

#[async_trait]
impl ExecSession for ExecProcess {
    fn take_stdin(&mut self) -> Option<BoxWrite> {
        self.stdin.take().map(|s| Box::pin(s) as BoxWrite)
    }
    fn take_stdout(&mut self) -> Option<BoxRead> {
        self.stdout.take().map(|s| Box::pin(s) as BoxRead)
    }
    fn take_stderr(&mut self) -> Option<BoxRead> {
        self.stderr.take().map(|s| Box::pin(s) as BoxRead)
    }
    fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        ExecProcess::resize(self, rows, cols)
    }
    async fn wait(self: Box<Self>) -> Result<i32> {
        ExecProcess::wait(*self).await
    }
}

#[async_trait]
impl AttachSession for Attach {
    async fn next(&mut self) -> Result<Option<(AttachStream, Vec<u8>)>> {
        Attach::next(self).await
    }
    async fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        Attach::write_stdin(self, data).await
    }
    async fn close_stdin(&mut self) -> Result<()> {
        Attach::close_stdin(self).await
    }
}

fn sandbox_status(sb: crate::sandbox::Sandbox) -> SandboxStatus {
    SandboxStatus {
        id: sb.id,
        name: sb.config.name,
        state: SandboxState::Ready,
        netns: sb.netns,
        created_at: sb.created_at,
        ip: None,
    }
}

#[async_trait]
impl Runtime for BuiltinRuntime {
    fn name(&self) -> String {
        "skiff".into()
    }

    async fn run_sandbox(&self, cfg: SandboxConfig) -> Result<String> {
        Ok(self.create_sandbox(cfg).await?.id)
    }

    async fn stop_sandbox(&self, id: &str, grace: Duration) -> Result<()> {
        self.sandbox(id)?;
        for c in self.list().await? {
            if c.sandbox_id.as_deref() == Some(id) {
                self.stop(&c.id, grace).await?;
            }
        }
        Ok(())
    }

    async fn remove_sandbox(&self, id: &str) -> Result<()> {
        BuiltinRuntime::remove_sandbox(self, id).await
    }

    async fn sandbox_status(&self, id: &str) -> Result<SandboxStatus> {
        Ok(sandbox_status(self.sandbox(id)?))
    }

    async fn list_sandboxes(&self) -> Result<Vec<SandboxStatus>> {
        Ok(BuiltinRuntime::list_sandboxes(self)?
            .into_iter()
            .map(sandbox_status)
            .collect())
    }

    async fn create_container(
        &self,
        sandbox_id: Option<&str>,
        cfg: ContainerConfig,
        log_path: PathBuf,
    ) -> Result<String> {
        self.create(sandbox_id, cfg, log_path).await
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        self.start(id).await
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<ContainerStatus> {
        self.stop(id, grace).await
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        self.remove(id).await
    }

    async fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        self.status(id).await
    }

    async fn list_containers(&self) -> Result<Vec<ContainerStatus>> {
        self.list().await
    }

    async fn container_stats(&self, id: &str) -> Result<CgroupStats> {
        self.stats(id).await
    }

    async fn writable_layer_bytes(&self, id: &str) -> Result<Option<u64>> {
        BuiltinRuntime::writable_layer_bytes(self, id)
            .await
            .map(Some)
    }

    async fn exec_sync(
        &self,
        id: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        BuiltinRuntime::exec(self, id, argv, timeout).await
    }

    async fn exec(&self, id: &str, argv: Vec<String>, tty: bool) -> Result<Box<dyn ExecSession>> {
        Ok(Box::new(self.exec_stream(id, argv, tty).await?))
    }

    async fn attach(&self, id: &str) -> Result<Box<dyn AttachSession>> {
        Ok(Box::new(BuiltinRuntime::attach(self, id).await?))
    }

    async fn resize(&self, id: &str, rows: u16, cols: u16) -> Result<()> {
        BuiltinRuntime::resize(self, id, rows, cols).await
    }

    async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<Box<dyn DuplexStream>> {
        Ok(Box::new(
            BuiltinRuntime::port_forward(self, sandbox_id, port).await?,
        ))
    }

    async fn pull_image(
        &self,
        reference: &str,
        creds: &Credentials,
        progress: ProgressFn<'_>,
    ) -> Result<String> {
        crate::pull::pull(self.images(), reference, self.registries(), creds, progress).await
    }

    async fn import_image(&self, archive: PathBuf) -> Result<Vec<String>> {
        let store = self.images().clone();
        tokio::task::spawn_blocking(move || store.import(&archive, None))
            .await
            .map_err(|e| Error::InvalidState(format!("image import task failed: {e}")))?
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let mut by_id: std::collections::BTreeMap<String, ImageInfo> = Default::default();
        for e in self.images().list()? {
            let info = by_id
                .entry(e.manifest_digest.clone())
                .or_insert_with(|| ImageInfo {
                    size: self.image_size(&e.manifest_digest),
                    id: e.manifest_digest.clone(),
                    names: Vec::new(),
                    pinned: false,
                });
            info.names.push(e.name);
        }
        Ok(by_id.into_values().collect())
    }

    async fn image_status(&self, reference: &str) -> Result<Option<ImageInfo>> {
        let image = match self.images().resolve(reference) {
            Ok(i) => i,
            Err(Error::ImageNotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Runtime::list_images(self)
            .await?
            .into_iter()
            .find(|i| i.id == image.manifest_digest))
    }

    async fn remove_image(&self, reference: &str) -> Result<bool> {
        BuiltinRuntime::remove_image(self, reference).await
    }
}
