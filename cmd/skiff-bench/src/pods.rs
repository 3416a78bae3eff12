//! `skiff-bench pods`: pod start-up on one real node. Starts `skiff server` (with its kubelet) in
//! a temp data dir, imports the busybox test image, creates an N-replica Deployment and watches
//! every pod from ADDED to Running+Ready, then prints per-pod start-up latency (p50/p99), the
//! time until all are Running, and the server's RSS during and after (plus the container shims').

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};

/// Arguments of `skiff-bench pods`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// the skiff binary to start
    #[arg(long)]
    skiff: PathBuf,
    /// the busybox image tarball (from `make images`)
    #[arg(long, default_value = "build/images/busybox.tar")]
    image_tar: PathBuf,
    /// replicas of the Deployment
    #[arg(long, default_value_t = 100)]
    replicas: i32,
    /// give up after this many seconds
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// then, with the Deployment's pods running, create this many single pods one at a time
    /// (the "latency pods" of Kubernetes' density test) and measure each one's start-up; with
    /// the default 100 replicas, 10 fill the node's 110-pod capacity
    #[arg(long, default_value_t = 10)]
    latency_pods: usize,
    /// the pause between two latency pods, in milliseconds
    #[arg(long, default_value_t = 250)]
    latency_interval_ms: u64,
    /// copy the server's log here when the run ends (it lives in the run's temporary data dir)
    #[arg(long)]
    server_log: Option<PathBuf>,
}

/// The server under test; stopped and cleaned up (`skiff killall`) on drop.
struct Server {
    skiff: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let status = Command::new(&self.skiff)
            .arg("killall")
            .arg("--data-dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!(
                "skiff-bench: `skiff killall --data-dir {}` failed; check for leftovers",
                self.dir.path().display()
            );
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A field (in KiB) of `/proc/<pid>/smaps_rollup`, e.g. `Pss`.
fn smaps_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The `skiff shim` processes (one per container) of this data dir: their count, total RSS,
/// total PSS (shared pages divided among their users) and total private dirty memory, in KiB.
fn shims_mem_kib(data_dir: &Path) -> (usize, u64, u64, u64) {
    let pids = shim_pids(data_dir);
    let mut total = 0;
    let mut pss = 0;
    let mut private = 0;
    for &pid in &pids {
        total += rss_kib(pid).unwrap_or(0);
        pss += smaps_kib(pid, "Pss").unwrap_or(0);
        private += smaps_kib(pid, "Private_Dirty").unwrap_or(0);
    }
    (pids.len(), total, pss, private)
}

/// The container shims of the server with data dir `data_dir` (`skiff shim … <data dir> …`).
fn shim_pids(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.display().to_string();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(" shim") && cmd.contains(&needle) {
                out.push(pid);
            }
        }
    }
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The pod spec of every benchmark pod: busybox sleeping, from the imported image.
fn pod_spec() -> serde_json::Value {
    serde_json::json!({
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "sleep",
            "image": "skiff.local/busybox:stable",
            "imagePullPolicy": "Never",
            "command": ["sleep", "3600"],
        }],
    })
}

fn running_and_ready(p: &Pod) -> bool {
    let Some(st) = &p.status else { return false };
    st.phase.as_deref() == Some("Running")
        && st
            .conditions
            .as_ref()
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(args: Args) -> anyhow::Result<()> {
    let skiff = std::fs::canonicalize(&args.skiff)
        .with_context(|| format!("skiff binary {}", args.skiff.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-pods")
        .tempdir()?;
    let out = Command::new(&skiff)
        .args(["images", "import", "--data-dir"])
        .arg(dir.path())
        .arg(&args.image_tar)
        .output()
        .context("running skiff images import")?;
    if !out.status.success() {
        bail!(
            "importing {}: {}",
            args.image_tar.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    let child = Command::new(&skiff)
        .args([
            "server",
            "--https-listen-port",
            "0",
            "--kubelet-port",
            "0",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting skiff server")?;
    let pid = child.id();
    let server = Server {
        skiff: skiff.clone(),
        child: Some(child),
        dir,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(measure(&args, &server, pid));
    if let Some(to) = &args.server_log {
        let from = server.dir.path().join("server.log");
        if let Err(e) = std::fs::copy(&from, to) {
            eprintln!("copying {} to {}: {e}", from.display(), to.display());
        }
    }
    result
}

async fn measure(args: &Args, server: &Server, pid: u32) -> anyhow::Result<()> {
    let kubeconfig = server.dir.path().join("kubeconfig.yaml");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        if kubeconfig.exists() {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            let client = kube::Client::try_from(cfg)?;
            let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
            if let Ok(list) = nodes.list(&ListParams::default()).await
                && list.items.iter().any(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                })
            {
                break client;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no Ready node within 60 s; server log: {}",
                server.dir.path().join("server.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let idle_rss = rss_kib(pid).unwrap_or(0);
    let ns = "default";
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let rv = pods
        .list_metadata(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut stream = pods
        .watch(
            &WatchParams::default().labels("app=bench").timeout(290),
            &rv,
        )
        .await?
        .boxed();
    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bench"},
        "spec": {
            "replicas": args.replicas,
            "selector": {"matchLabels": {"app": "bench"}},
            "template": {
                "metadata": {"labels": {"app": "bench"}},
                "spec": pod_spec(),
            },
        },
    }))?;
    let t0 = Instant::now();
    let mono0 = monotonic_secs();
    let busy0 = cpu_busy_secs();
    deployments.create(&PostParams::default(), &dep).await?;
    let mut peak_rss = idle_rss;
    let mut last_sample = Instant::now();
    let deadline = t0 + Duration::from_secs(args.timeout_secs);
    let latency = until_ready(
        &mut stream,
        args.replicas as usize,
        deadline,
        "pods",
        || {
            if last_sample.elapsed() > Duration::from_millis(200) {
                peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0));
                last_sample = Instant::now();
            }
        },
    )
    .await?;
    let all_running = t0.elapsed();
    let busy = cpu_busy_secs() - busy0;
    // For profiles: `perf record -k CLOCK_MONOTONIC` then `perf report --time <start>,<end>`.
    eprintln!(
        "burst window (CLOCK_MONOTONIC seconds): {mono0:.6},{:.6}",
        monotonic_secs()
    );
    peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0));
    let (shims, shims_rss, shims_pss, shims_private) = shims_mem_kib(server.dir.path());
    let mut lat: Vec<Duration> = latency.values().copied().collect();
    lat.sort();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let steady_rss = rss_kib(pid).unwrap_or(0);
    let mut single = latency_pods(args, &pods).await?;
    single.sort();

    deployments
        .delete("bench", &DeleteParams::background())
        .await?;
    let gone_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = pods
            .list_metadata(&ListParams::default().labels("app in (bench,bench-latency)"))
            .await?
            .items
            .len();
        if left == 0 || Instant::now() > gone_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after_rss = rss_kib(pid).unwrap_or(0);

    println!(
        "| {} replicas on one node | value |\n|---|---|",
        args.replicas
    );
    println!(
        "| create → all Running+Ready (watch) | {} |",
        ms(all_running)
    );
    println!(
        "| per-pod start-up p50 (ADDED → Running+Ready) | {} |",
        ms(pct(&lat, 0.50))
    );
    println!("| per-pod start-up p99 | {} |", ms(pct(&lat, 0.99)));
    println!("| per-pod start-up max | {} |", ms(pct(&lat, 1.0)));
    println!(
        "| CPU busy (all CPUs; run on an idle machine), create → all Running: total / per pod | {:.2} s / {:.1} ms |",
        busy,
        1000.0 * busy / f64::from(args.replicas.max(1))
    );
    println!(
        "| skiff server RSS idle (node Ready, no pods) | {} MiB |",
        idle_rss / 1024
    );
    println!(
        "| skiff server RSS peak during start-up | {} MiB |",
        peak_rss / 1024
    );
    println!(
        "| skiff server RSS with all pods running | {} MiB |",
        steady_rss / 1024
    );
    println!(
        "| skiff server RSS after the Deployment is deleted | {} MiB |",
        after_rss / 1024
    );
    let each = |kib: u64| kib / (shims.max(1) as u64);
    println!(
        "| container shims: count, total RSS | {shims}, {} MiB ({} KiB each) |",
        shims_rss / 1024,
        each(shims_rss)
    );
    println!(
        "| container shims: total PSS, private dirty | {} MiB ({} KiB each), {} MiB ({} KiB each) |",
        shims_pss / 1024,
        each(shims_pss),
        shims_private / 1024,
        each(shims_private)
    );
    if !single.is_empty() {
        println!(
            "| latency pods ({}, one every {} ms, {} running): start-up p50 / p99 / max | {} / {} / {} |",
            single.len(),
            args.latency_interval_ms,
            args.replicas,
            ms(pct(&single, 0.50)),
            ms(pct(&single, 0.99)),
            ms(pct(&single, 1.0))
        );
    }
    Ok(())
}

/// Follows a pod watch until `n` pods are Running+Ready; returns each one's time from its first
/// event (ADDED) to Running+Ready. `tick` runs between events (e.g. to sample RSS).
async fn until_ready(
    stream: &mut futures::stream::BoxStream<'_, kube::Result<WatchEvent<Pod>>>,
    n: usize,
    deadline: Instant,
    what: &str,
    mut tick: impl FnMut(),
) -> anyhow::Result<HashMap<String, Duration>> {
    let mut added: HashMap<String, Instant> = HashMap::new();
    let mut latency: HashMap<String, Duration> = HashMap::new();
    while latency.len() < n {
        tick();
        let ev = match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Err(_) if Instant::now() < deadline => continue,
            Err(_) | Ok(None) => bail!("only {}/{n} {what} Running+Ready", latency.len()),
            Ok(Some(ev)) => ev?,
        };
        let now = Instant::now();
        match ev {
            WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                let name = p.metadata.name.clone().unwrap_or_default();
                let first = *added.entry(name.clone()).or_insert(now);
                if running_and_ready(&p) && !latency.contains_key(&name) {
                    latency.insert(name, now - first);
                }
            }
            WatchEvent::Error(e) => bail!("watch error: {}", e.message),
            _ => {}
        }
    }
    Ok(latency)
}

/// The density test's latency phase: single pods created one at a time at a steady pace while
/// the Deployment's pods run; each one's ADDED → Running+Ready as seen by a watch. The pods are
/// deleted afterwards.
async fn latency_pods(args: &Args, pods: &Api<Pod>) -> anyhow::Result<Vec<Duration>> {
    if args.latency_pods == 0 {
        return Ok(Vec::new());
    }
    let rv = pods
        .list_metadata(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut stream = pods
        .watch(
            &WatchParams::default()
                .labels("app=bench-latency")
                .timeout(290),
            &rv,
        )
        .await?
        .boxed();
    let creator = {
        let pods = pods.clone();
        let (n, pause) = (
            args.latency_pods,
            Duration::from_millis(args.latency_interval_ms),
        );
        tokio::spawn(async move {
            for i in 0..n {
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": format!("bench-latency-{i}"), "labels": {"app": "bench-latency"}},
                    "spec": pod_spec(),
                }))?;
                pods.create(&PostParams::default(), &pod).await?;
                tokio::time::sleep(pause).await;
            }
            anyhow::Ok(())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let latency = until_ready(
        &mut stream,
        args.latency_pods,
        deadline,
        "latency pods (replicas + latency pods must fit the node's 110 pods)",
        || {},
    )
    .await?;
    creator.await??;
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app=bench-latency"),
    )
    .await?;
    Ok(latency.into_values().collect())
}

/// CLOCK_MONOTONIC now, in seconds (the clock `perf record -k CLOCK_MONOTONIC` stamps samples with).
fn monotonic_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// CPU time the machine has spent busy so far (user + system + irq + softirq of all CPUs, from
/// /proc/stat), in seconds. On an otherwise idle machine that is the node's work: the server,
/// the shims, libcontainer's set-up processes (whose CPU no parent's counters see while the
/// container runs) and the kernel threads working for them.
fn cpu_busy_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let field = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    busy as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}
