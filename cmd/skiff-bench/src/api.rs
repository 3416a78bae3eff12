//! `skiff-bench api`: starts the real `skiff server --disable-agent` in a temporary data dir and
//! drives it over HTTPS (admin client certificate): create/get/list/update latency at fixed
//! write rates from 16 clients, a list of 10,000 ConfigMaps, 100 concurrent watchers, and RSS.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// Flags of `skiff-bench api`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The skiff binary (default: `skiff` next to this program).
    #[arg(long)]
    skiff: Option<PathBuf>,
    /// Seconds each write-rate phase runs.
    #[arg(long, default_value_t = 10)]
    phase_secs: u64,
    /// Concurrent clients in the write-rate phases.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Objects for the big list / RSS phase.
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Concurrent watchers.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
}

/// Runs the benchmark and prints Markdown.
pub fn run(args: Args) -> anyhow::Result<()> {
    two_worker_runtime()?.block_on(run_async(args))
}

/// The client side of the server benchmarks: two worker threads, like the machine's two cores.
pub(crate) fn two_worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

pub(crate) struct ServerProc {
    child: Child,
    _dir: tempfile::TempDir,
    tls: Arc<rustls::ClientConfig>,
    addr: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProc {
    /// The admin kubeconfig the server wrote.
    pub(crate) fn kubeconfig(&self) -> PathBuf {
        self._dir.path().join("kubeconfig.yaml")
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (VmRSS, RssAnon, RssFile) in KiB.
    pub(crate) fn rss_split(&self) -> anyhow::Result<(u64, u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in /proc/PID/status"))
        };
        Ok((field("VmRSS:")?, field("RssAnon:")?, field("RssFile:")?))
    }

    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/PID/status")
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client { sender })
    }
}

fn skiff_path(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.skiff {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("skiff"))
}

/// Starts `skiff server --disable-agent` on loopback with `extra` flags.
pub(crate) fn start_server(bin: &Path, extra: &[&str]) -> anyhow::Result<ServerProc> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(bin)
        .args([
            "server",
            "--disable-agent",
            "--https-listen-port",
            "0",
            "--bind-address",
            "127.0.0.1",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.path())
        .env("SKIFF_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(url) = line.split_whitespace().find(|w| w.starts_with("https://")) else {
        let _ = child.kill();
        bail!("skiff server printed no URL: {line:?}");
    };
    let addr = url
        .trim_end_matches(';')
        .trim_start_matches("https://")
        .to_string();
    let tls_dir = dir.path().join("server").join("tls");
    let read = |f: &str| {
        std::fs::read_to_string(tls_dir.join(f))
            .with_context(|| format!("reading {}", tls_dir.join(f).display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in skiff_pki::pem_certs_der(&read("ca.crt")?) {
        roots.add(der.into())?;
    }
    let certs = skiff_pki::pem_certs_der(&read("admin.crt")?)
        .into_iter()
        .map(Into::into)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
        skiff_pki::pem_key_der(&read("admin.key")?)
            .context("admin key")?
            .into(),
    );
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)?;
    Ok(ServerProc {
        child,
        _dir: dir,
        tls: Arc::new(tls),
        addr,
    })
}

struct Client {
    sender: SendRequest<Full<Bytes>>,
}

impl Client {
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let body = body
            .map(|b| Bytes::from(serde_json::to_vec(b).unwrap_or_default()))
            .unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(Full::new(body))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((code, bytes))
    }

    async fn expect(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        want: u16,
    ) -> anyhow::Result<Bytes> {
        let (code, bytes) = self.call(method, path, body).await?;
        if code != want {
            bail!(
                "{method} {path}: {code} (wanted {want}): {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(bytes)
    }
}

fn cm(name: &str, extra: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"bench": "api"}},
           "data": {"payload": "x".repeat(200), "extra": extra}})
}

fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)].as_secs_f64() * 1000.0
}

async fn namespace(c: &mut Client, name: &str) -> anyhow::Result<()> {
    c.expect(
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})),
        201,
    )
    .await?;
    Ok(())
}

#[derive(Default)]
struct Lat {
    create: Vec<Duration>,
    get: Vec<Duration>,
    list: Vec<Duration>,
    update: Vec<Duration>,
    errors: usize,
}

/// One write-rate phase: `clients` clients, each cycle = create, get, update, list (limit 100),
/// paced so that creates + updates total `rate` per second.
async fn rate_phase(
    srv: &ServerProc,
    rate: u64,
    secs: u64,
    clients: usize,
) -> anyhow::Result<(Lat, f64)> {
    let ns = format!("bench-rate-{rate}");
    namespace(&mut srv.client().await?, &ns).await?;
    // Each cycle has 2 writes; per-client cycle interval:
    let cycles_per_sec = rate as f64 / 2.0;
    let interval = Duration::from_secs_f64(clients as f64 / cycles_per_sec);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut c = srv.client().await?;
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Lat::default();
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + interval.mul_f64(i as f64 / clients as f64),
                interval,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut n = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                n += 1;
                let name = format!("c{i}-{n}");
                let base = format!("/api/v1/namespaces/{ns}/configmaps");
                let t = Instant::now();
                let created = match c.expect("POST", &base, Some(&cm(&name, "")), 201).await {
                    Ok(b) => b,
                    Err(_) => {
                        lat.errors += 1;
                        continue;
                    }
                };
                lat.create.push(t.elapsed());
                let t = Instant::now();
                if c.expect("GET", &format!("{base}/{name}"), None, 200)
                    .await
                    .is_err()
                {
                    lat.errors += 1;
                }
                lat.get.push(t.elapsed());
                let mut obj: Value = serde_json::from_slice(&created).unwrap_or(Value::Null);
                obj["data"]["extra"] = json!("updated");
                let t = Instant::now();
                if c.expect("PUT", &format!("{base}/{name}"), Some(&obj), 200)
                    .await
                    .is_err()
                {
                    lat.errors += 1;
                }
                lat.update.push(t.elapsed());
                let t = Instant::now();
                if c.expect("GET", &format!("{base}?limit=100"), None, 200)
                    .await
                    .is_err()
                {
                    lat.errors += 1;
                }
                lat.list.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Lat::default();
    for t in tasks {
        let l = t.await?;
        all.create.extend(l.create);
        all.get.extend(l.get);
        all.list.extend(l.list);
        all.update.extend(l.update);
        all.errors += l.errors;
    }
    let achieved = (all.create.len() + all.update.len()) as f64 / started.elapsed().as_secs_f64();
    Ok((all, achieved))
}

async fn run_async(args: Args) -> anyhow::Result<()> {
    let bin = skiff_path(&args)?;
    let t0 = Instant::now();
    let srv = start_server(&bin, &[])?;
    let ready = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let early = srv.rss_split()?;
    // The server hands its start-up code pages back 10 s after ready; the idle figure is taken
    // once the idle working set has settled.
    tokio::time::sleep(Duration::from_secs(57)).await;
    let idle = srv.rss_split()?;
    println!(
        "skiff server ready in {:.0} ms; RSS 3 s after ready {:.1} MiB (anon {:.1}, file {:.1}); \
         idle RSS 60 s after ready {:.1} MiB (anon {:.1}, file {:.1})",
        ready.as_secs_f64() * 1000.0,
        early.0 as f64 / 1024.0,
        early.1 as f64 / 1024.0,
        early.2 as f64 / 1024.0,
        idle.0 as f64 / 1024.0,
        idle.1 as f64 / 1024.0,
        idle.2 as f64 / 1024.0,
    );

    println!();
    println!("| writes/s (target) | achieved | op | p50 (ms) | p99 (ms) | n |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for rate in [100u64, 500] {
        let (mut lat, achieved) = rate_phase(&srv, rate, args.phase_secs, args.clients).await?;
        for (op, v) in [
            ("create", &mut lat.create),
            ("get", &mut lat.get),
            ("update", &mut lat.update),
            ("list (limit 100)", &mut lat.list),
        ] {
            let n = v.len();
            println!(
                "| {rate} | {achieved:.0} | {op} | {:.2} | {:.2} | {n} |",
                pct(v, 0.5),
                pct(v, 0.99)
            );
        }
        if lat.errors > 0 {
            println!("| {rate} | | errors | | | {} |", lat.errors);
        }
    }

    // 10,000 ConfigMaps, created by 16 clients as fast as they go, then listed whole.
    let ns = "bench-list";
    namespace(&mut srv.client().await?, ns).await?;
    let t = Instant::now();
    let per = args.objects.div_ceil(args.clients);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let mut c = srv.client().await?;
        tasks.push(tokio::spawn(async move {
            for n in 0..per {
                let name = format!("o{i}-{n}");
                c.expect(
                    "POST",
                    &format!("/api/v1/namespaces/{ns}/configmaps"),
                    Some(&cm(&name, "")),
                    201,
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let fill = t.elapsed();
    let total = per * args.clients;
    println!();
    println!(
        "filled {total} ConfigMaps in {:.1} s ({:.0} creates/s from {} clients)",
        fill.as_secs_f64(),
        total as f64 / fill.as_secs_f64(),
        args.clients
    );
    let mut c = srv.client().await?;
    let mut lists = Vec::new();
    let mut bytes = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let b = c
            .expect(
                "GET",
                &format!("/api/v1/namespaces/{ns}/configmaps"),
                None,
                200,
            )
            .await?;
        lists.push(t.elapsed());
        bytes = b.len();
        let v: Value = serde_json::from_slice(&b)?;
        // Count ours only: the namespace also holds the `kube-root-ca.crt` ConfigMap.
        let items = v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["metadata"]["labels"]["bench"] == "api")
                    .count()
            })
            .unwrap_or(0);
        if items != total {
            bail!("list returned {items} items, wanted {total}");
        }
    }
    println!(
        "list of {total} ConfigMaps ({:.1} MiB JSON): p50 {:.0} ms, max {:.0} ms (5 runs)",
        bytes as f64 / 1048576.0,
        pct(&mut lists, 0.5),
        pct(&mut lists, 1.0)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let full_rss = srv.rss_kib()?;
    println!(
        "RSS with {} objects in the store: {:.1} MiB",
        total,
        full_rss as f64 / 1024.0
    );

    // Watchers.
    let wns = "bench-watch";
    namespace(&mut srv.client().await?, wns).await?;
    let mut c = srv.client().await?;
    let list: Value = serde_json::from_slice(
        &c.expect(
            "GET",
            &format!("/api/v1/namespaces/{wns}/configmaps"),
            None,
            200,
        )
        .await?,
    )?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let events = 200usize;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.watchers);
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let mut w = srv.client().await?;
        let rv = rv.clone();
        let ready_tx = ready_tx.clone();
        watchers.push(tokio::spawn(async move {
            let req = http::Request::builder()
                .uri(format!(
                    "/api/v1/namespaces/{wns}/configmaps?watch=1&resourceVersion={rv}"
                ))
                .header("host", "127.0.0.1")
                .header("accept", "application/json")
                .body(Full::new(Bytes::new()))?;
            w.sender.ready().await?;
            let resp = w.sender.send_request(req).await?;
            if resp.status() != 200 {
                bail!("watch: {}", resp.status());
            }
            let _ = ready_tx.send(()).await;
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            let mut lats = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while lats.len() < events {
                let frame = tokio::time::timeout_at(deadline, body.frame()).await;
                let Ok(Some(Ok(frame))) = frame else { break };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let got = now_micros();
                    let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    if ev["type"] == "ADDED"
                        && let Some(sent) = ev["object"]["data"]["extra"]
                            .as_str()
                            .and_then(|s| s.parse::<u128>().ok())
                    {
                        lats.push(Duration::from_micros(
                            u64::try_from(got.saturating_sub(sent)).unwrap_or(0),
                        ));
                    }
                }
            }
            anyhow::Ok(lats)
        }));
    }
    drop(ready_tx);
    for _ in 0..args.watchers {
        ready_rx.recv().await.context("a watcher failed to start")?;
    }
    let rss_watch = srv.rss_kib()?;
    let t = Instant::now();
    for n in 0..events {
        c.expect(
            "POST",
            &format!("/api/v1/namespaces/{wns}/configmaps"),
            Some(&cm(&format!("w{n}"), &now_micros().to_string())),
            201,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let write_time = t.elapsed();
    let mut all = Vec::new();
    let mut complete = 0;
    for w in watchers {
        let l = w.await??;
        if l.len() == events {
            complete += 1;
        }
        all.extend(l);
    }
    println!(
        "{} watchers x {events} events (written in {:.1} s): {complete}/{} watchers got every event; \
         delivery latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; RSS with the watchers open {:.1} MiB",
        args.watchers,
        write_time.as_secs_f64(),
        args.watchers,
        pct(&mut all, 0.5),
        pct(&mut all, 0.99),
        pct(&mut all, 1.0),
        rss_watch as f64 / 1024.0
    );
    let end_rss = srv.rss_kib()?;
    println!("RSS at the end: {:.1} MiB", end_rss as f64 / 1024.0);
    Ok(())
}
