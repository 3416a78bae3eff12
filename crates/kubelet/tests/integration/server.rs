//! The kubelet HTTPS server against the real built-in runtime and the busybox image: TLS client
//! authentication, `/pods`, logs, exec and attach over WebSocket (v5, v4) and SPDY, port-forward
//! over SPDY (raw and tunnelled in WebSocket), stats and resource metrics — driven by clients
//! written here the way kubectl speaks (our SPDY codec, tungstenite).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use skiff_kubelet::server::spdy;
use skiff_kubelet::server::{ContainerRef, PodLookup, PodRef, ServerConfig};
use skiff_runtime::{
    BuiltinRuntime, ContainerConfig, ImageStore, Runtime, RuntimeConfig, SandboxConfig,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const IMAGE: &str = "skiff.local/busybox:stable";
const T: Duration = Duration::from_secs(20);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (namespaces, cgroups, overlay mounts): run it as root, as CI does"
    );
}

fn busybox_tar() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/images/busybox.tar");
    assert!(
        p.exists(),
        "{} is missing: run `make images` (or images/build.sh build/images) first",
        p.display()
    );
    p
}

#[derive(Default)]
struct TestPods(Mutex<Vec<PodRef>>);

impl PodLookup for TestPods {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodRef> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|p| {
                p.pod.metadata.namespace.as_deref() == Some(namespace)
                    && p.pod.metadata.name.as_deref() == Some(name)
            })
            .cloned()
    }
    fn pods(&self) -> Vec<PodRef> {
        self.0.lock().unwrap().clone()
    }
}

struct Env {
    rt: BuiltinRuntime,
    dir: tempfile::TempDir,
    pods: Arc<TestPods>,
    addr: std::net::SocketAddr,
    pki: skiff_pki::ServerPki,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn unique(prefix: &str) -> String {
    let mut b = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    format!("{prefix}-{}", hex::encode(b))
}

impl Env {
    async fn start() -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("skiff-kubelet-")
            .tempdir_in("/tmp")
            .unwrap();
        let images = ImageStore::open(dir.path().join("images")).unwrap();
        images.import(&busybox_tar(), None).unwrap();
        let cgroup_parent = unique("skiff-kltest");
        let rt = BuiltinRuntime::new(RuntimeConfig {
            state_dir: dir.path().join("rt"),
            images,
            shim_command: vec![env!("CARGO_BIN_EXE_skiff-kubelet-test-shim").into()],
            cgroup_parent,
        })
        .unwrap();
        let pki = skiff_pki::ensure_server_pki(&dir.path().join("pki"), &[]).unwrap();
        let pods = Arc::new(TestPods::default());
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            serving_cert_pem: pki.kubelet_serving_cert_pem.clone(),
            serving_key_pem: pki.kubelet_serving_key_pem.clone(),
            client_ca_pem: pki.ca_cert_pem.clone(),
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let runtime: Arc<dyn Runtime> = Arc::new(rt.clone());
        let lookup: Arc<dyn PodLookup> = pods.clone();
        tokio::spawn(async move {
            skiff_kubelet::server::serve(
                cfg,
                runtime,
                lookup,
                move |a| {
                    let _ = ready_tx.send(a);
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await
            .unwrap();
        });
        let addr = ready_rx.await.unwrap();
        Self {
            rt,
            dir,
            pods,
            addr,
            pki,
            stop: Some(stop),
        }
    }

    /// A pod `default/<name>` with one sandbox and the given containers (name, shell script).
    async fn pod(&self, name: &str, containers: &[(&str, &str)]) -> PodRef {
        let sb = Runtime::run_sandbox(
            &self.rt,
            SandboxConfig {
                name: name.into(),
                hostname: name.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut refs = Vec::new();
        for (cname, script) in containers {
            // "<stdin>" before the script: the container keeps stdin open for attach.
            let (stdin, script) = match script.strip_prefix("<stdin>") {
                Some(rest) => (true, rest),
                None => (false, *script),
            };
            let id = Runtime::create_container(
                &self.rt,
                Some(&sb),
                ContainerConfig {
                    name: cname.to_string(),
                    image: IMAGE.into(),
                    command: vec!["sh".into(), "-c".into(), script.to_string()],
                    stdin,
                    ..Default::default()
                },
                self.dir
                    .path()
                    .join("logs")
                    .join(format!("{name}-{cname}.log")),
            )
            .await
            .unwrap();
            Runtime::start_container(&self.rt, &id).await.unwrap();
            refs.push(ContainerRef {
                name: cname.to_string(),
                id: Some(id),
                previous_id: None,
            });
        }
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: containers
                    .iter()
                    .map(|(n, _)| Container {
                        name: n.to_string(),
                        image: Some(IMAGE.into()),
                        ..Default::default()
                    })
                    .collect(),
                node_name: Some("test-node".into()),
                ..Default::default()
            }),
            status: None,
        };
        let p = PodRef {
            pod: Arc::new(pod),
            sandbox_id: Some(sb),
            containers: refs,
        };
        self.pods.0.lock().unwrap().push(p.clone());
        p
    }

    fn tls_config(&self, client_cert: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for der in skiff_pki::pem_certs_der(&self.pki.ca_cert_pem) {
            roots.add(CertificateDer::from(der)).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = if client_cert {
            let certs = skiff_pki::pem_certs_der(&self.pki.kubelet_client_cert_pem)
                .into_iter()
                .map(CertificateDer::from)
                .collect();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                skiff_pki::pem_key_der(&self.pki.kubelet_client_key_pem).unwrap(),
            ));
            b.with_client_auth_cert(certs, key).unwrap()
        } else {
            b.with_no_client_auth()
        };
        Arc::new(cfg)
    }

    async fn connect(&self, client_cert: bool) -> TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(self.tls_config(client_cert))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// A GET; returns status and the body stream.
    async fn get_stream(&self, path: &str, client_cert: bool) -> (u16, axum::body::BodyDataStream) {
        let tls = self.connect(client_cert).await;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", "localhost")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let code = resp.status().as_u16();
        (
            code,
            axum::body::Body::new(resp.into_body()).into_data_stream(),
        )
    }

    async fn get(&self, path: &str) -> (u16, String) {
        self.get_as(path, true).await
    }

    async fn get_as(&self, path: &str, client_cert: bool) -> (u16, String) {
        let (code, mut body) = self.get_stream(path, client_cert).await;
        let mut out = Vec::new();
        while let Some(c) = tokio::time::timeout(T, body.next()).await.unwrap() {
            out.extend_from_slice(&c.unwrap());
        }
        (code, String::from_utf8_lossy(&out).into_owned())
    }

    /// Opens a WebSocket on `path` offering `protocols`.
    async fn websocket(
        &self,
        path: &str,
        protocols: &str,
    ) -> (
        tokio_tungstenite::WebSocketStream<TlsStream<tokio::net::TcpStream>>,
        Option<String>,
    ) {
        let tls = self.connect(true).await;
        let mut req = format!("wss://localhost{path}")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
        let (ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
        let proto = resp
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string());
        (ws, proto)
    }

    /// A raw SPDY/3.1 upgrade as kubectl sends it; returns the session once upgraded.
    async fn spdy(&self, path: &str, protocol: &str) -> spdy::Session {
        let mut tls = self.connect(true).await;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "x-stream-protocol-version: {}",
                protocol.to_ascii_lowercase()
            )),
            "{head}"
        );
        spdy::Session::new(tls, false).unwrap()
    }

    async fn teardown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        for sb in self.rt.list_sandboxes().unwrap() {
            self.rt.remove_sandbox(&sb.id).await.unwrap();
        }
        for c in self.rt.list().await.unwrap() {
            self.rt.remove(&c.id).await.unwrap();
        }
        self.rt.remove_cgroup_parent().unwrap();
        self.rt.release_pins_mount();
        let left = skiff_runtime::sandbox::mounts_under(self.dir.path());
        assert!(left.is_empty(), "mounts left behind: {left:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Best effort when a test failed before teardown: kill shims and containers, unmount,
        // remove the cgroups.
        let needle = self.dir.path().display().to_string();
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("rt/containers")) {
            for e in rd.flatten() {
                if let Ok(st) = skiff_runtime::shim::read_state(&e.path())
                    && let Some(pid) = st.pid
                {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    if cmd.contains(&needle)
                        && let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>()
                        && pid != std::process::id() as i32
                    {
                        // SAFETY: kill has no memory preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut mounts = skiff_runtime::sandbox::mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: c is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = self.rt.remove_cgroup_parent();
    }
}

/// Reads WebSocket channel messages until the server closes; returns the bytes per channel.
async fn ws_collect<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> [Vec<u8>; 4] {
    let mut out: [Vec<u8>; 4] = Default::default();
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("ws timed out");
        match m {
            Some(Ok(Message::Binary(b))) => {
                if let Some((&ch, data)) = b.split_first()
                    && (ch as usize) < 4
                {
                    out[ch as usize].extend_from_slice(data);
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return out,
            _ => {}
        }
    }
}

async fn wait_for_log(env: &Env, path: &str, needle: &str) -> String {
    for _ in 0..100 {
        let (code, body) = env.get(path).await;
        if code == 200 && body.contains(needle) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{needle:?} never appeared in {path}");
}

async fn read_all(r: &mut spdy::StreamReader) -> Vec<u8> {
    let mut v = Vec::new();
    while let Some(b) = tokio::time::timeout(T, r.recv())
        .await
        .expect("spdy read timed out")
    {
        v.extend_from_slice(&b);
    }
    v
}

fn hdr(pairs: &[(&str, &str)]) -> spdy::Headers {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_pods_auth_and_errors() {
    let env = Env::start().await;
    env.pod("web", &[("main", "sleep 3600")]).await;

    // /healthz without a client certificate; everything else needs one
    assert_eq!(env.get_as("/healthz", false).await, (200, "ok".into()));
    let (code, body) = env.get_as("/pods", false).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = env.get("/pods").await;
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["items"][0]["metadata"]["name"], "web");

    // kube-style errors
    let (code, body) = env.get("/containerLogs/default/nope/main").await;
    assert_eq!(code, 404, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["kind"], "Status");
    assert!(st["message"].as_str().unwrap().contains("nope"), "{body}");
    let (code, body) = env.get("/containerLogs/default/web/other").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("container other is not valid for pod web"),
        "{body}"
    );
    let (code, body) = env
        .get("/containerLogs/default/web/main?previous=true")
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("previous terminated container"), "{body}");
    let (code, body) = env.get("/containerLogs/default/web/main?tailLines=x").await;
    assert_eq!(code, 400, "{body}");

    // stats and resource metrics of the running container
    let (code, body) = env.get("/stats/summary").await;
    assert_eq!(code, 200, "{body}");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["node"]["nodeName"], "test-node");
    assert!(s["node"]["memory"]["workingSetBytes"].as_u64().unwrap() > 0);
    let pod = &s["pods"][0];
    assert_eq!(pod["podRef"]["name"], "web");
    assert_eq!(pod["containers"][0]["name"], "main");
    assert!(
        pod["containers"][0]["memory"]["workingSetBytes"]
            .as_u64()
            .unwrap()
            > 0,
        "{body}"
    );
    assert!(
        pod["containers"][0]["cpu"]["usageCoreNanoSeconds"].is_u64(),
        "{body}"
    );
    let (code, body) = env.get("/metrics/resource").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("container_cpu_usage_seconds_total{container=\"main\",namespace=\"default\",pod=\"web\"}"),
        "{body}"
    );
    assert!(body.contains("\nnode_memory_working_set_bytes "), "{body}");
    assert!(
        body.contains("pod_memory_working_set_bytes{namespace=\"default\",pod=\"web\"}"),
        "{body}"
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_timestamps_since_and_follow() {
    let env = Env::start().await;
    env.pod(
        "logger",
        &[(
            "main",
            "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2; sleep 2; echo late; sleep 1; exit 0",
        )],
    )
    .await;
    let base = "/containerLogs/default/logger/main";
    let all = wait_for_log(&env, base, "oops").await;
    assert_eq!(all, "line1\nline2\nline3\nline4\nline5\noops\n");
    let (_, tail) = env.get(&format!("{base}?tailLines=2")).await;
    assert_eq!(tail, "line5\noops\n");
    let (_, ts) = env
        .get(&format!("{base}?tailLines=1&timestamps=true"))
        .await;
    let (t, rest) = ts.split_once(' ').unwrap();
    assert_eq!(rest, "oops\n");
    assert!(
        t.ends_with('Z')
            && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .is_ok(),
        "{ts}"
    );
    let (_, limited) = env.get(&format!("{base}?limitBytes=8")).await;
    assert_eq!(limited, "line1\nli");
    let (_, since) = env.get(&format!("{base}?sinceSeconds=3600")).await;
    assert_eq!(since, all);

    // follow: the existing lines now, "late" when it is written, the end when the container exits
    let (code, mut body) = env
        .get_stream(&format!("{base}?follow=true&tailLines=1"), true)
        .await;
    assert_eq!(code, 200);
    let mut got = Vec::new();
    let started = std::time::Instant::now();
    while let Some(c) = tokio::time::timeout(T, body.next())
        .await
        .expect("follow hung after the container exited")
    {
        got.extend_from_slice(&c.unwrap());
    }
    assert_eq!(String::from_utf8_lossy(&got), "oops\nlate\n");
    assert!(started.elapsed() < Duration::from_secs(15));

    // previous: the log of the terminated instance the pod manager remembers
    let sb = env
        .pods
        .pod("default", "logger")
        .unwrap()
        .sandbox_id
        .unwrap();
    let prev = Runtime::create_container(
        &env.rt,
        Some(&sb),
        ContainerConfig {
            name: "main".into(),
            image: IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo from-previous; exit 1".into(),
            ],
            ..Default::default()
        },
        env.dir.path().join("logs").join("logger-main-prev.log"),
    )
    .await
    .unwrap();
    Runtime::start_container(&env.rt, &prev).await.unwrap();
    for _ in 0..100 {
        if Runtime::container_status(&env.rt, &prev)
            .await
            .unwrap()
            .state
            == skiff_runtime::ContainerState::Exited
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.pods.0.lock().unwrap()[0].containers[0].previous_id = Some(prev);
    let (code, body) = env.get(&format!("{base}?previous=true")).await;
    assert_eq!((code, body.as_str()), (200, "from-previous\n"));
    // follow on an exited container ends at once
    let (code, body) = env.get(&format!("{base}?previous=true&follow=true")).await;
    assert_eq!((code, body.as_str()), (200, "from-previous\n"));
    // waiting for the next instance: the last one's log is the current log
    env.pods.0.lock().unwrap()[0].containers[0].id = None;
    let (code, body) = env.get(base).await;
    assert_eq!((code, body.as_str()), (200, "from-previous\n"));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_websocket_v5_v4_and_attach() {
    let env = Env::start().await;
    env.pod(
        "ex",
        &[("main", "while true; do echo tick; sleep 0.3; done")],
    )
    .await;

    // v5: stdin through cat, closed with the v5 close frame
    let (mut ws, proto) = env
        .websocket(
            "/exec/default/ex/main?command=cat&input=1&output=1",
            "v5.channel.k8s.io, v4.channel.k8s.io",
        )
        .await;
    assert_eq!(proto.as_deref(), Some("v5.channel.k8s.io"));
    ws.send(Message::binary(b"\x00hello over v5\n".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
    let out = ws_collect(&mut ws).await;
    assert_eq!(String::from_utf8_lossy(&out[1]), "hello over v5\n");
    let st: serde_json::Value = serde_json::from_slice(&out[3]).unwrap();
    assert_eq!(st["status"], "Success");

    // v4: stdout, stderr and a non-zero exit code
    let (mut ws, proto) = env
        .websocket(
            "/exec/default/ex/uid-ex/main?command=sh&command=-c&command=echo%20out%3B%20echo%20err%20%3E%262%3B%20exit%203&output=1&error=1",
            "v4.channel.k8s.io",
        )
        .await;
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    let out = ws_collect(&mut ws).await;
    assert_eq!(String::from_utf8_lossy(&out[1]), "out\n");
    assert_eq!(String::from_utf8_lossy(&out[2]), "err\n");
    let st: serde_json::Value = serde_json::from_slice(&out[3]).unwrap();
    assert_eq!(st["status"], "Failure");
    assert_eq!(st["reason"], "NonZeroExitCode");
    assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(st["details"]["causes"][0]["message"], "3");

    // v5 with a TTY: the resize reaches the terminal
    let (mut ws, _) = env
        .websocket(
            "/exec/default/ex/main?command=sh&command=-c&command=test%20-t%200%20%26%26%20echo%20is-a-tty%3B%20read%20x%3B%20stty%20size&input=1&output=1&tty=1",
            "v5.channel.k8s.io",
        )
        .await;
    // the size first, as kubectl sends it right after the upgrade
    let mut msg = vec![4u8];
    msg.extend_from_slice(br#"{"Width":123,"Height":45}"#);
    ws.send(Message::binary(msg)).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("is-a-tty") {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) if b.first() == Some(&1) => {
                seen.extend_from_slice(&b[1..])
            }
            Some(Ok(_)) => {}
            other => panic!("tty exec ended early: {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.send(Message::binary(b"\x00go\n".to_vec()))
        .await
        .unwrap();
    let out = ws_collect(&mut ws).await;
    let text = String::from_utf8_lossy(&out[1]).into_owned();
    assert!(text.contains("45 123"), "{text:?}");

    // a wrong uid is not this pod
    let (code, _) = env
        .get("/exec/default/ex/other-uid/main?command=true&output=1")
        .await;
    assert_eq!(code, 404);

    // attach: the container's own output
    let (mut ws, _) = env
        .websocket("/attach/default/ex/main?output=1", "v5.channel.k8s.io")
        .await;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("tick") {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) if b.first() == Some(&1) => {
                seen.extend_from_slice(&b[1..])
            }
            Some(Ok(_)) => {}
            other => panic!("attach ended early: {other:?}"),
        }
    }
    ws.close(None).await.unwrap();
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_spdy_as_kubectl_1_29() {
    let env = Env::start().await;
    env.pod("sp", &[("main", "sleep 3600")]).await;

    // stdin -> cat -> stdout, status Success on the error stream
    let s = env
        .spdy(
            "/exec/default/sp/main?command=cat&input=1&output=1&error=1",
            "v4.channel.k8s.io",
        )
        .await;
    let mut err = s.open(hdr(&[("streamtype", "error")])).await.unwrap();
    err.writer.close().await.unwrap();
    let mut stdin = s.open(hdr(&[("streamtype", "stdin")])).await.unwrap();
    let mut stdout = s.open(hdr(&[("streamtype", "stdout")])).await.unwrap();
    let mut stderr = s.open(hdr(&[("streamtype", "stderr")])).await.unwrap();
    // The server's half of stdin stays open while the client may still write: client-go closes
    // its stdin the moment it sees that half end, and drops what it had not sent yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stdin.reader.recv())
            .await
            .is_err(),
        "the server ended its half of the stdin stream before the client sent anything"
    );
    stdin.writer.write(b"through spdy\n").await.unwrap();
    stdin.writer.write(&vec![b'x'; 200_000]).await.unwrap();
    stdin.writer.close().await.unwrap();
    let out = read_all(&mut stdout.reader).await;
    assert_eq!(out.len(), 13 + 200_000);
    assert!(out.starts_with(b"through spdy\n"));
    assert!(read_all(&mut stderr.reader).await.is_empty());
    let st: serde_json::Value = serde_json::from_slice(&read_all(&mut err.reader).await).unwrap();
    assert_eq!(st["status"], "Success");
    drop(s);

    // a failing command: the exit code in the status
    let s = env
        .spdy(
            "/exec/default/sp/main?command=sh&command=-c&command=echo%20bye%3B%20exit%207&output=1",
            "v4.channel.k8s.io",
        )
        .await;
    let mut err = s.open(hdr(&[("streamtype", "error")])).await.unwrap();
    let mut stdout = s.open(hdr(&[("streamtype", "stdout")])).await.unwrap();
    assert_eq!(read_all(&mut stdout.reader).await, b"bye\n");
    let st: serde_json::Value = serde_json::from_slice(&read_all(&mut err.reader).await).unwrap();
    assert_eq!(st["reason"], "NonZeroExitCode");
    assert_eq!(st["details"]["causes"][0]["message"], "7");
    drop(s);

    // v2 (pre-JSON): the error stream carries text only on failure
    let s = env
        .spdy(
            "/exec/default/sp/main?command=hostname&output=1",
            "v2.channel.k8s.io",
        )
        .await;
    let mut err = s.open(hdr(&[("streamtype", "error")])).await.unwrap();
    let mut stdout = s.open(hdr(&[("streamtype", "stdout")])).await.unwrap();
    assert_eq!(read_all(&mut stdout.reader).await, b"sp\n");
    assert!(read_all(&mut err.reader).await.is_empty());
    env.teardown().await;
}

async fn http_through(mut data: spdy::Stream) -> String {
    data.writer
        .write(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
        .await
        .unwrap();
    String::from_utf8_lossy(&read_all(&mut data.reader).await).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_spdy_and_websocket() {
    let env = Env::start().await;
    env.pod(
        "pf",
        &[(
            "web",
            "mkdir -p /tmp/www && echo hello-from-the-pod > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
        )],
    )
    .await;
    // wait for httpd: the SPDY form reports connection errors on the error stream
    let mut ok = false;
    for i in 0..50 {
        let s = env
            .spdy("/portForward/default/pf", "portforward.k8s.io")
            .await;
        let id = i.to_string();
        let mut err = s
            .open(hdr(&[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", &id),
            ]))
            .await
            .unwrap();
        err.writer.close().await.unwrap();
        let data = s
            .open(hdr(&[
                ("streamtype", "data"),
                ("port", "8080"),
                ("requestid", &id),
            ]))
            .await
            .unwrap();
        let page = http_through(data).await;
        let e = read_all(&mut err.reader).await;
        if page.contains("hello-from-the-pod") {
            assert!(
                page.starts_with("HTTP/1.") && page.contains(" 200 OK"),
                "{page}"
            );
            assert!(e.is_empty(), "{}", String::from_utf8_lossy(&e));
            ok = true;
            break;
        }
        assert!(page.is_empty(), "{page}");
        assert!(
            String::from_utf8_lossy(&e).contains("8080"),
            "{}",
            String::from_utf8_lossy(&e)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "port-forward over SPDY never reached httpd");

    // two requests on one connection, as kubectl does for two local connections
    let s = env
        .spdy("/portForward/default/pf/uid-pf", "portforward.k8s.io")
        .await;
    let mut pages = Vec::new();
    for id in ["1", "2"] {
        let mut err = s
            .open(hdr(&[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", id),
            ]))
            .await
            .unwrap();
        err.writer.close().await.unwrap();
        let data = s
            .open(hdr(&[
                ("streamtype", "data"),
                ("port", "8080"),
                ("requestid", id),
            ]))
            .await
            .unwrap();
        pages.push(tokio::spawn(http_through(data)));
    }
    for p in pages {
        assert!(p.await.unwrap().contains("hello-from-the-pod"));
    }
    drop(s);

    // SPDY tunnelled in WebSocket binary messages (kubectl >= 1.31)
    let (ws, proto) = env
        .websocket("/portForward/default/pf", "SPDY/3.1+portforward.k8s.io")
        .await;
    assert_eq!(proto.as_deref(), Some("SPDY/3.1+portforward.k8s.io"));
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut sink, mut source) = ws.split();
    let (mut trd, mut twr) = tokio::io::split(theirs);
    tokio::spawn(async move {
        while let Some(Ok(Message::Binary(b))) = source.next().await {
            if twr.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = trd.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            if sink
                .send(Message::binary(Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let s = spdy::Session::new(ours, false).unwrap();
    let mut err = s
        .open(hdr(&[
            ("streamtype", "error"),
            ("port", "8080"),
            ("requestid", "0"),
        ]))
        .await
        .unwrap();
    err.writer.close().await.unwrap();
    let data = s
        .open(hdr(&[
            ("streamtype", "data"),
            ("port", "8080"),
            ("requestid", "0"),
        ]))
        .await
        .unwrap();
    assert!(http_through(data).await.contains("hello-from-the-pod"));
    drop(s);

    // the WebSocket channel form: port header first on each channel, then the data
    let (mut ws, proto) = env
        .websocket("/portForward/default/pf?port=8080", "portforward.k8s.io")
        .await;
    assert_eq!(proto.as_deref(), Some("portforward.k8s.io"));
    let mut req = vec![0u8];
    req.extend_from_slice(b"GET /index.html HTTP/1.0\r\n\r\n");
    ws.send(Message::binary(req)).await.unwrap();
    let mut data = Vec::new();
    let mut port_frames = 0;
    while !String::from_utf8_lossy(&data).contains("hello-from-the-pod") {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) => {
                if b.len() == 3 && b[1..] == 8080u16.to_le_bytes() && port_frames < 2 {
                    port_frames += 1;
                } else if b[0] == 0 {
                    data.extend_from_slice(&b[1..]);
                } else {
                    panic!("error channel: {}", String::from_utf8_lossy(&b[1..]));
                }
            }
            Some(Ok(_)) => {}
            other => panic!("websocket port-forward ended: {other:?}"),
        }
    }
    assert_eq!(port_frames, 2);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_over_spdy_with_stdin_and_base64_exec() {
    let env = Env::start().await;
    env.pod(
        "at",
        &[(
            "main",
            "<stdin>while read x; do echo got-$x; done; sleep 3600",
        )],
    )
    .await;
    let s = env
        .spdy(
            "/attach/default/at/main?input=1&output=1&error=1",
            "v4.channel.k8s.io",
        )
        .await;
    let mut err = s.open(hdr(&[("streamtype", "error")])).await.unwrap();
    err.writer.close().await.unwrap();
    let mut stdin = s.open(hdr(&[("streamtype", "stdin")])).await.unwrap();
    let mut stdout = s.open(hdr(&[("streamtype", "stdout")])).await.unwrap();
    let _stderr = s.open(hdr(&[("streamtype", "stderr")])).await.unwrap();
    stdin.writer.write(b"hello\n").await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("got-hello") {
        let b = tokio::time::timeout(T, stdout.reader.recv())
            .await
            .expect("attach output timed out")
            .expect("attach stdout ended early");
        seen.extend_from_slice(&b);
    }
    drop(s);

    // the base64 text protocol of old clients
    let (mut ws, proto) = env
        .websocket(
            "/exec/default/at/main?command=echo&command=b64&output=1",
            "base64.channel.k8s.io",
        )
        .await;
    assert_eq!(proto.as_deref(), Some("base64.channel.k8s.io"));
    let mut out = String::new();
    loop {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                let (ch, data) = t.split_at(1);
                if ch == "1" {
                    let raw =
                        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data)
                            .unwrap();
                    out.push_str(&String::from_utf8_lossy(&raw));
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    assert_eq!(out, "b64\n");
    env.teardown().await;
}

// ------------------------------------------------------------------ real kubectl

/// A stand-in for the API server as kubectl sees it: discovery, `GET pod`, and a raw proxy of
/// pods/exec|attach|portforward|log to the kubelet paths (what the real API server does).
async fn fake_apiserver(env: &Env) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pods = env.pods.clone();
    let kubelet = env.addr;
    let tls = env.tls_config(true);
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let pods = pods.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _ = fake_api_conn(conn, pods, kubelet, tls).await;
            });
        }
    });
    addr
}

async fn fake_api_conn(
    mut conn: tokio::net::TcpStream,
    pods: Arc<TestPods>,
    kubelet: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut b).await? == 0 {
            return Ok(());
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let respond = |code: u16, body: String| {
        format!(
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let json_resp = match seg.as_slice() {
        ["api"] => Some(respond(200, serde_json::json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}).to_string())),
        ["apis"] => Some(respond(200, serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}).to_string())),
        ["api", "v1"] => Some(respond(200, serde_json::json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": ["get", "list"], "shortNames": ["po"]},
            {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions", "verbs": ["create", "get"]},
            {"name": "pods/attach", "singularName": "", "namespaced": true, "kind": "PodAttachOptions", "verbs": ["create", "get"]},
            {"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
            {"name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"]},
        ]}).to_string())),
        ["api", "v1", "namespaces", ns, "pods", name] => Some(match pods.pod(ns, name) {
            Some(p) => {
                let mut v = serde_json::to_value(p.pod.as_ref()).unwrap();
                v["kind"] = "Pod".into();
                v["apiVersion"] = "v1".into();
                v["status"] = serde_json::json!({"phase": "Running"});
                respond(200, v.to_string())
            }
            None => respond(404, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("pods \"{name}\" not found")}).to_string()),
        }),
        _ => None,
    };
    if let Some(r) = json_resp {
        conn.write_all(r.as_bytes()).await?;
        return Ok(());
    }
    let ["api", "v1", "namespaces", ns, "pods", name, sub] = seg.as_slice() else {
        conn.write_all(respond(404, "{}".into()).as_bytes()).await?;
        return Ok(());
    };
    let mut container = None;
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.strip_prefix("container=") {
            Some(c) => container = Some(c.to_string()),
            None => rest.push(kv),
        }
    }
    let container = container.unwrap_or_else(|| {
        pods.pod(ns, name)
            .and_then(|p| p.containers.first().map(|c| c.name.clone()))
            .unwrap_or_default()
    });
    let q = rest.join("&");
    for h in &headers {
        if let Some(v) = h
            .strip_prefix("Upgrade: ")
            .or_else(|| h.strip_prefix("upgrade: "))
        {
            UPGRADES.lock().unwrap().push(format!("{sub} {v}"));
        }
    }
    let new_path = match *sub {
        "exec" => format!("/exec/{ns}/{name}/{container}?{q}"),
        "attach" => format!("/attach/{ns}/{name}/{container}?{q}"),
        "log" => format!("/containerLogs/{ns}/{name}/{container}?{q}"),
        "portforward" => format!("/portForward/{ns}/{name}?{q}"),
        _ => {
            conn.write_all(respond(404, "{}".into()).as_bytes()).await?;
            return Ok(());
        }
    };
    let tcp = tokio::net::TcpStream::connect(kubelet).await?;
    let mut up = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut req = format!("{method} {new_path} HTTP/1.1\r\nHost: localhost\r\n");
    for h in headers {
        if !h.to_ascii_lowercase().starts_with("host:") {
            req.push_str(h);
            req.push_str("\r\n");
        }
    }
    req.push_str("\r\n");
    up.write_all(req.as_bytes()).await?;
    tokio::io::copy_bidirectional(&mut conn, &mut up).await?;
    Ok(())
}

/// `<subresource> <Upgrade header>` of every proxied request, to check which protocols ran.
static UPGRADES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn kubectl(api: std::net::SocketAddr) -> tokio::process::Command {
    kubectl_with(api, true)
}

/// kubectl; `websockets: false` makes it speak SPDY/3.1 as kubectl 1.27-1.29 do.
fn kubectl_with(api: std::net::SocketAddr, websockets: bool) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("kubectl");
    let ws = if websockets { "true" } else { "false" };
    c.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", ws)
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", ws)
        .env("KUBECONFIG", "/nonexistent-skiff-kubeconfig")
        .arg(format!("--server=http://{api}"))
        .kill_on_drop(true);
    c
}

async fn kubectl_ok(api: std::net::SocketAddr, args: &[&str], stdin: Option<&[u8]>) -> String {
    kubectl_ok_with(api, true, args, stdin).await
}

async fn kubectl_ok_with(
    api: std::net::SocketAddr,
    websockets: bool,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> String {
    let mut c = kubectl_with(api, websockets);
    c.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c
        .spawn()
        .expect("kubectl must be installed (it is in the CI image)");
    if let Some(data) = stdin {
        let mut i = child.stdin.take().unwrap();
        i.write_all(data).await.unwrap();
        drop(i);
    }
    let out = tokio::time::timeout(T, child.wait_with_output())
        .await
        .expect("kubectl hung")
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kubectl_exec_logs_and_port_forward() {
    let env = Env::start().await;
    env.pod(
        "kc",
        &[(
            "web",
            "echo web-started; mkdir -p /tmp/www && echo hello-kubectl > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
        )],
    )
    .await;
    let api = fake_apiserver(&env).await;

    // exec over WebSocket v5 (kubectl >= 1.30), with and without stdin
    assert_eq!(
        kubectl_ok(api, &["exec", "kc", "--", "hostname"], None).await,
        "kc\n"
    );
    assert_eq!(
        kubectl_ok(
            api,
            &["exec", "-i", "kc", "-c", "web", "--", "cat"],
            Some(b"piped through kubectl\n")
        )
        .await,
        "piped through kubectl\n"
    );
    // a non-zero exit code reaches kubectl
    let out = kubectl(api)
        .args(["exec", "kc", "--", "sh", "-c", "exit 4"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // logs
    wait_for_log(&env, "/containerLogs/default/kc/web", "web-started").await;
    assert_eq!(
        kubectl_ok(api, &["logs", "kc"], None).await,
        "web-started\n"
    );
    let ts = kubectl_ok(api, &["logs", "kc", "--tail=1", "--timestamps"], None).await;
    assert!(ts.ends_with("Z web-started\n"), "{ts:?}");

    // kubectl cp both ways (tar through exec)
    let local = env.dir.path().join("cp-in.txt");
    std::fs::write(&local, "copied into the pod\n").unwrap();
    kubectl_ok(
        api,
        &["cp", local.to_str().unwrap(), "kc:/tmp/cp-in.txt"],
        None,
    )
    .await;
    assert_eq!(
        kubectl_ok(api, &["exec", "kc", "--", "cat", "/tmp/cp-in.txt"], None).await,
        "copied into the pod\n"
    );
    let back = env.dir.path().join("cp-back.txt");
    kubectl_ok(
        api,
        &["cp", "kc:/tmp/www/index.html", back.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "hello-kubectl\n");

    // kubectl attach: the container's output until it exits
    env.pod(
        "ka",
        &[(
            "main",
            "sleep 2; for i in 1 2 3; do echo attached-$i; sleep 0.2; done",
        )],
    )
    .await;
    let out = kubectl_ok(api, &["attach", "ka"], None).await;
    assert!(out.contains("attached-3"), "{out:?}");

    // the same over SPDY/3.1, as kubectl 1.27-1.29 speak it
    assert_eq!(
        kubectl_ok_with(
            api,
            false,
            &["exec", "-i", "kc", "--", "cat"],
            Some(b"spdy from kubectl\n")
        )
        .await,
        "spdy from kubectl\n"
    );
    let out = kubectl_with(api, false)
        .args(["exec", "kc", "--", "sh", "-c", "echo e >&2; exit 5"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("e\n"));

    // exec -it under a pseudo-terminal (script): the terminal size reaches the container. (The
    // `sleep 1`: the runtime can set an exec's size only once its shim runs, so a process that
    // asks at once may still see 0x0; see the report.)
    for websockets in [true, false] {
        let ws = if websockets { "true" } else { "false" };
        let cmd = format!(
            "stty cols 100 rows 40; KUBECTL_REMOTE_COMMAND_WEBSOCKETS={ws} KUBECONFIG=/nonexistent-skiff-kubeconfig kubectl --server=http://{api} exec -it kc -- sh -c 'sleep 1; stty size'"
        );
        let out = tokio::time::timeout(
            T,
            tokio::process::Command::new("script")
                .args(["-qec", &cmd, "/dev/null"])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("kubectl exec -it hung")
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("40 100"),
            "websockets={ws}: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // port-forward: SPDY tunnelled in WebSocket (kubectl >= 1.31), then raw SPDY
    for websockets in [true, false] {
        kubectl_port_forward(api, websockets).await;
    }
    let seen = UPGRADES.lock().unwrap().clone();
    for want in [
        "exec websocket",
        "exec SPDY/3.1",
        "portforward websocket",
        "portforward SPDY/3.1",
    ] {
        assert!(
            seen.iter().any(|s| s.eq_ignore_ascii_case(want)),
            "{want} not used: {seen:?}"
        );
    }
    env.teardown().await;
}

async fn kubectl_port_forward(api: std::net::SocketAddr, websockets: bool) {
    // port-forward (SPDY tunnelled in WebSocket on kubectl >= 1.31)
    let mut pf = kubectl_with(api, websockets);
    pf.args(["port-forward", "pod/kc", ":8080"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = pf.spawn().unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        T,
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
    )
    .await
    .expect("kubectl port-forward printed nothing")
    .unwrap();
    // "Forwarding from 127.0.0.1:PORT -> 8080"
    let port: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected port-forward output: {line:?}"));
    let mut page = String::new();
    for _ in 0..50 {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        page.clear();
        let _ = tokio::time::timeout(T, c.read_to_string(&mut page)).await;
        if page.contains("hello-kubectl") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(page.contains("hello-kubectl"), "{page:?}");
    child.kill().await.unwrap();
}
