//! End-to-end test harness: builds and starts the real `skiff` binary with a temporary data dir
//! and a free port, and runs the machine's real kubectl binaries against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The target directory and profile directory the test binary was built into.
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // <target>/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// The hard eviction thresholds node tests run with (see `launch`): disk pressure only when the
/// disk is really full.
pub const TEST_EVICTION_HARD: &str = "eviction-hard=nodefs.available<1%,imagefs.available<1%";

/// Builds `skiff` (a no-op when fresh) and returns its path.
pub fn skiff_binary() -> PathBuf {
    let profile_dir = target_profile_dir();
    let target = profile_dir.parent().expect("target dir").to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "skiff", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build -p skiff");
    assert!(status.success(), "cargo build -p skiff failed");
    let bin = profile_dir.join("skiff");
    assert!(bin.exists(), "{} missing after cargo build", bin.display());
    bin
}

/// A running `skiff server`, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    /// Temporary data dir (removed on drop).
    pub dir: tempfile::TempDir,
    /// Path of the admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Server URL.
    pub url: String,
    /// Runs the node half: `skiff killall` cleans the host when the server is dropped.
    pub agent: bool,
}

impl Server {
    /// Starts a server with `--https-listen-port 0` and waits for its ready line.
    pub fn start() -> Server {
        Self::start_in(tempfile::tempdir().expect("tempdir"))
    }

    /// Starts a server on an existing data dir.
    pub fn start_in(dir: tempfile::TempDir) -> Server {
        Self::start_with(dir, &[])
    }

    /// Starts a server on an existing data dir with extra flags.
    pub fn start_with(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        Self::launch(dir, &["--disable-agent"], extra, false)
    }

    /// Starts a server WITH the node half (runtime, kubelet on a free port, pod network on
    /// `cni0` with pod CIDR 10.42.0.0/24) on an existing data dir. Dropping it stops the server
    /// and runs `skiff killall --data-dir`, so no container, bridge, veth, nftables table or
    /// mount is left on the host (also when the test fails). Tests using it are named `node_*`.
    pub fn start_with_agent(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        Self::start_with_agent_on(dir, "127.0.0.1", extra)
    }

    /// [`Server::start_with_agent`] with the node's InternalIP `node_ip` (`--node-ip`).
    pub fn start_with_agent_on(dir: tempfile::TempDir, node_ip: &str, extra: &[&str]) -> Server {
        let node = [
            "--kubelet-port",
            "0",
            "--node-name",
            "skiff-e2e",
            "--node-ip",
            node_ip,
            "--pod-cidr",
            "10.42.0.0/24",
        ];
        Self::launch(dir, &node, extra, true)
    }

    fn launch(dir: tempfile::TempDir, fixed: &[&str], extra: &[&str], agent: bool) -> Server {
        let bin = skiff_binary();
        let mut child = Command::new(bin)
            .args([
                "server",
                "--https-listen-port",
                "0",
                "--bind-address",
                "127.0.0.1",
            ])
            .args(fixed)
            // This build machine's disk is over the kubelet's image GC threshold (85% used by
            // its measure, which counts blocks reserved from us): keep test images. And a build
            // machine with build outputs on it can get under the default 5% free, where the
            // kubelet would evict the tests' pods: node tests are not about disk pressure
            // (node_eviction sets its own thresholds on a tmpfs, after these).
            .args(if agent {
                &[
                    "--kubelet-arg",
                    "image-gc-high-threshold=100",
                    "--kubelet-arg",
                    TEST_EVICTION_HARD,
                ][..]
            } else {
                &[][..]
            })
            .args(extra)
            .arg("--data-dir")
            .arg(dir.path())
            .env("SKIFF_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting skiff server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child: Some(child),
            kubeconfig: PathBuf::new(),
            url: String::new(),
            dir,
            agent,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("skiff server printed no ready line within 120 s");
        assert!(line.contains("ready"), "unexpected first line: {line}");
        let kc = line
            .rsplit("kubeconfig: ")
            .next()
            .expect("kubeconfig path in ready line");
        server.kubeconfig = PathBuf::from(kc.trim());
        server.url = line
            .split_whitespace()
            .find(|w| w.starts_with("https://"))
            .map(|w| w.trim_end_matches(';').to_string())
            .unwrap_or_default();
        assert_eq!(server.kubeconfig, server.dir.path().join("kubeconfig.yaml"));
        server
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        panic!("skiff server did not stop within 10 s of SIGTERM");
    }

    /// Stops the server and hands back its data dir.
    pub fn into_dir(mut self) -> tempfile::TempDir {
        if self.child.is_some() {
            self.stop();
        }
        // The data dir lives on (a restart): its pods must keep running.
        self.agent = false;
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.agent {
            let st = Command::new(skiff_binary())
                .arg("killall")
                .arg("--data-dir")
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .status();
            if !st.is_ok_and(|s| s.success()) {
                eprintln!(
                    "skiff killall --data-dir {} failed",
                    self.dir.path().display()
                );
            }
        }
    }
}

/// A response read by [`Server::raw`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status code.
    pub code: u16,
    /// Response headers, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// Body (chunked transfer decoded).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Server {
    /// Sends one HTTP/1.1 request over TLS with the admin client certificate (from the data dir's
    /// PKI), for inputs kubectl cannot send. Blocking; `Connection: close`.
    pub fn raw(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> RawResponse {
        use std::io::{Read, Write};
        let tls = self.dir.path().join("server").join("tls");
        let read = |f: &str| {
            std::fs::read_to_string(tls.join(f))
                .unwrap_or_else(|e| panic!("reading {}: {e}", tls.join(f).display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for der in skiff_pki::pem_certs_der(&read("ca.crt")) {
            roots.add(der.into()).expect("cluster CA");
        }
        let certs = skiff_pki::pem_certs_der(&read("admin.crt"))
            .into_iter()
            .map(Into::into)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            skiff_pki::pem_key_der(&read("admin.key"))
                .expect("admin key")
                .into(),
        );
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .expect("admin client cert");
        let hostport = self.url.trim_start_matches("https://").to_string();
        let host = hostport
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_default();
        let name = rustls::pki_types::ServerName::try_from(host).expect("server name");
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("tls");
        let tcp = std::net::TcpStream::connect(&hostport).expect("connecting to the server");
        tcp.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {hostport}\r\naccept: application/json\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
        if !content_type.is_empty() {
            head.push_str(&format!("content-type: {content_type}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).expect("writing request");
        s.flush().expect("flushing the request head");
        let mut raw = Vec::new();
        if body.len() > 1024 * 1024 {
            // The server may answer a large body (413) from its Content-Length alone and close;
            // look for that answer before sending the body, which would then be refused.
            s.sock
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 4096];
            if let Ok(n) = s.read(&mut buf)
                && n > 0
            {
                raw.extend_from_slice(&buf[..n]);
            }
            s.sock
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
        }
        if raw.is_empty() {
            let _ = s.write_all(body);
            let _ = s.flush();
        }
        if let Err(e) = s.read_to_end(&mut raw) {
            assert!(
                !raw.is_empty(),
                "reading the response to {method} {path}: {e}"
            );
        }
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| {
                panic!(
                    "no HTTP response head in {:?}",
                    String::from_utf8_lossy(&raw)
                )
            });
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let code = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut rest = raw[split + 4..].to_vec();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        if chunked {
            let mut out = Vec::new();
            let mut pos = 0;
            while let Some(eol) = rest[pos..].windows(2).position(|w| w == b"\r\n") {
                let size_text = String::from_utf8_lossy(&rest[pos..pos + eol]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .unwrap_or(0);
                pos += eol + 2;
                if size == 0 || pos + size > rest.len() {
                    break;
                }
                out.extend_from_slice(&rest[pos..pos + size]);
                pos += size + 2;
            }
            rest = out;
        }
        RawResponse {
            code,
            headers,
            body: rest,
        }
    }
}

/// One kubectl binary.
#[derive(Debug, Clone)]
pub struct Kubectl {
    /// Path of the binary.
    pub bin: PathBuf,
    /// Kubeconfig to use.
    pub kubeconfig: PathBuf,
}

/// Finds `kubectl` on PATH and the versioned `kubectl.<v>` beside its real path.
pub fn kubectl_path(version: Option<&str>) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", "readlink -f \"$(command -v kubectl)\""])
        .output()
        .expect("sh");
    let real = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !real.is_empty(),
        "kubectl is not on PATH: the end-to-end tests need it"
    );
    let real = PathBuf::from(real);
    match version {
        None => real,
        Some(v) => {
            let p = real
                .parent()
                .expect("kubectl dir")
                .join(format!("kubectl.{v}"));
            assert!(
                p.exists(),
                "{} is missing: the end-to-end tests need kubectl {v}",
                p.display()
            );
            p
        }
    }
}

impl Kubectl {
    /// kubectl `version` for `server`.
    pub fn new(version: Option<&str>, server: &Server) -> Self {
        Kubectl {
            bin: kubectl_path(version),
            kubeconfig: server.kubeconfig.clone(),
        }
    }

    /// Runs kubectl with `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, None)
    }

    /// Runs kubectl with `args` and optional stdin.
    pub fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd.env("HOME", self.kubeconfig.parent().expect("dir"));
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning kubectl");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("writing stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// Runs kubectl, asserts success and returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl with stdin, asserts success and returns stdout.
    pub fn ok_stdin(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run_stdin(args, Some(stdin));
        assert!(
            out.status.success(),
            "kubectl {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl, asserts failure and returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "kubectl {} unexpectedly succeeded",
            args.join(" ")
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Starts a long-running kubectl (e.g. `get -w`), streaming stdout lines.
    pub fn spawn_lines(&self, args: &[&str]) -> (ChildGuard, mpsc::Receiver<String>) {
        let mut child = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning kubectl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (ChildGuard(child), rx)
    }
}

/// Kills a child process when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback TCP port (bound and released; good enough for a test-owned etcd).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A throwaway etcd (Debian's etcd-server) on loopback, killed on drop.
pub struct Etcd {
    _child: ChildGuard,
    _dir: tempfile::TempDir,
    /// Client URL.
    pub url: String,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian package etcd-server) is needed by this test");
        let guard = ChildGuard(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                return Etcd {
                    _child: guard,
                    _dir: dir,
                    url,
                };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not listen on {url} within 10 s");
    }
}
