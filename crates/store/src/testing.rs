//! Test and benchmark support: a throw-away etcd server on loopback (free ports, temporary data
//! dir), killed and removed when dropped — also when the test panics.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

use crate::EtcdTls;

/// Server-side TLS for a test etcd (PEM files): clients must present a certificate signed by
/// `ca_file` (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdServerTls {
    /// The CA that signs client certificates (and, in tests, the server certificate).
    pub ca_file: PathBuf,
    /// The server certificate (must name 127.0.0.1).
    pub cert_file: PathBuf,
    /// The server key.
    pub key_file: PathBuf,
    /// What the fixture itself uses to check that etcd answers.
    pub client: EtcdTls,
}

/// Where Debian's `etcd-server` package installs etcd.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

/// Why a test etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdFixtureError {
    /// The etcd binary is missing.
    #[error("etcd-server not installed: run `make deps` (looked for {})", .0.display())]
    NotInstalled(PathBuf),
    /// Starting or preparing etcd failed.
    #[error("cannot start etcd {path}: {err}", path = .0.display(), err = .1)]
    Io(PathBuf, std::io::Error),
    /// etcd did not become ready.
    #[error("etcd did not become ready: {0}")]
    NotReady(String),
}

/// A running etcd on 127.0.0.1 with its own data dir. Dropping it kills etcd and removes the dir.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    endpoint: String,
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer")
            .field("endpoint", &self.endpoint)
            .field("data_dir", &self.dir.path())
            .finish()
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts `/usr/bin/etcd`.
    pub async fn start() -> Result<EtcdServer, EtcdFixtureError> {
        Self::start_with(Path::new(DEFAULT_ETCD_BIN)).await
    }

    /// Starts the etcd binary at `bin` and waits until it answers.
    pub async fn start_with(bin: &Path) -> Result<EtcdServer, EtcdFixtureError> {
        Self::start_inner(bin, None).await
    }

    /// Starts `/usr/bin/etcd` serving clients over TLS with client-certificate authentication.
    pub async fn start_tls(tls: &EtcdServerTls) -> Result<EtcdServer, EtcdFixtureError> {
        Self::start_inner(Path::new(DEFAULT_ETCD_BIN), Some(tls)).await
    }

    async fn start_inner(
        bin: &Path,
        tls: Option<&EtcdServerTls>,
    ) -> Result<EtcdServer, EtcdFixtureError> {
        if !bin.is_file() {
            return Err(EtcdFixtureError::NotInstalled(bin.to_path_buf()));
        }
        let mut last = String::new();
        // A free port can be taken by someone else before etcd binds it: retry with new ones.
        for _ in 0..3 {
            match Self::try_start(bin, tls).await {
                Ok(s) => return Ok(s),
                Err(EtcdFixtureError::NotReady(e)) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(EtcdFixtureError::NotReady(last))
    }

    async fn try_start(
        bin: &Path,
        tls: Option<&EtcdServerTls>,
    ) -> Result<EtcdServer, EtcdFixtureError> {
        let io = |e| EtcdFixtureError::Io(bin.to_path_buf(), e);
        let dir = tempfile::Builder::new()
            .prefix("skiff-etcd-")
            .tempdir()
            .map_err(io)?;
        let (client_port, peer_port) = (free_port().map_err(io)?, free_port().map_err(io)?);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log_path = dir.path().join("etcd.log");
        let log = File::create(&log_path).map_err(io)?;
        let log2 = log.try_clone().map_err(io)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg("skiff-test")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("skiff-test={peer_url}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .args(tls.map_or_else(Vec::new, |t| {
                vec![
                    "--cert-file".into(),
                    t.cert_file.clone().into_os_string(),
                    "--key-file".into(),
                    t.key_file.clone().into_os_string(),
                    "--trusted-ca-file".into(),
                    t.ca_file.clone().into_os_string(),
                    "--client-cert-auth".into(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it allocates nothing and touches no locks.
        unsafe {
            cmd.pre_exec(|| {
                // If the test process dies without running Drop (SIGKILL), etcd goes too.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(io)?;
        let mut server = EtcdServer {
            child: Some(child),
            dir,
            endpoint: client_url,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = server.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(EtcdFixtureError::NotReady(format!(
                    "etcd exited with {status}: {tail}"
                )));
            }
            if server.answers(tls.map(|t| &t.client)).await {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(EtcdFixtureError::NotReady(format!(
                    "no answer on {} within 30 s (log: {})",
                    server.endpoint,
                    log_path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers(&self, tls: Option<&EtcdTls>) -> bool {
        let mut opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
        if let Some(t) = tls {
            match crate::etcd::tls_options(t) {
                Ok(o) => opts = opts.with_tls(o),
                Err(_) => return false,
            }
        }
        let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_secs(2),
            Client::connect([self.endpoint.as_str()], Some(opts)),
        )
        .await
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), c.get("\0", None)).await,
            Ok(Ok(_))
        )
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The endpoint list to pass to [`crate::connect_etcd`].
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint.clone()]
    }

    /// etcd's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // the TempDir field removes the data dir
    }
}
