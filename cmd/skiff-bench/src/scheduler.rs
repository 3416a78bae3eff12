//! `skiff-bench scheduler`: scheduling throughput at scale, in the spirit of kube-scheduler's
//! scheduler_perf. Starts the real `skiff server --disable-agent` in a temp data dir, registers N
//! hollow nodes (Node objects with renewed Leases; no fake kubelet, so only scheduling is measured),
//! then creates M pods from concurrent clients and watches each one until it carries
//! `spec.nodeName`. Prints throughput (pods/s from the first create to the last bind, and over the
//! middle 80 % of binds), create→bound latency p50/p99 (client-side create start to the bind seen
//! on a watch), the create rate the clients reached, a 100-replica Deployment's create→all bound,
//! and the server's RSS (sampled, and its high-water mark).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::api::{ServerProc, start_server};

/// Flags of `skiff-bench scheduler`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The skiff binary (default: `skiff` next to this program).
    #[arg(long)]
    skiff: Option<PathBuf>,
    /// Hollow nodes to register.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Pods to create and schedule.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Concurrent creating clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Replicas of the Deployment phase (0 skips it).
    #[arg(long, default_value_t = 100)]
    replicas: usize,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// Runs the benchmark and prints Markdown.
pub fn run(args: Args) -> anyhow::Result<()> {
    crate::api::two_worker_runtime()?.block_on(run_async(args))
}

fn kib_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks / if hz > 0 { hz as f64 } else { 100.0 })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Samples the server's RSS every 200 ms; returns the peak seen when stopped.
struct RssSampler {
    peak: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(Mutex::new(0u64));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Some(v) = kib_field(pid, "VmRSS:")
                    && let Ok(mut m) = p.lock()
                {
                    *m = (*m).max(v);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        RssSampler { peak, task }
    }

    fn peak_kib(&self) -> u64 {
        self.peak.lock().map(|g| *g).unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the benchmark reads of a pod: its name, resourceVersion and node. Watch events and
/// create responses are decoded into this instead of a full `Pod`: the clients share the 2 cores
/// with the server, and decoding every ~2 KiB pod (managedFields, token volume, defaults) they
/// never look at took CPU from the server being measured. The server's work is unchanged.
#[derive(Clone, Debug, Default, serde::Deserialize)]
struct SlimPod {
    #[serde(deserialize_with = "slim_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: SlimSpec,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimSpec {
    #[serde(default)]
    node_name: Option<String>,
}

/// Only the metadata the watcher needs (it resumes from resourceVersions).
fn slim_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        resource_version: Option<String>,
        uid: Option<String>,
    }
    let m = <Meta as serde::Deserialize>::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        uid: m.uid,
        ..Default::default()
    })
}

impl kube::Resource for SlimPod {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Watches pods of one namespace and records when each was first seen with a node.
struct BindWatch {
    bound: Arc<Mutex<HashMap<String, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BindWatch {
    fn start(client: kube::Client, ns: &str) -> BindWatch {
        let bound: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let b = bound.clone();
        let api: Api<SlimPod> = Api::namespaced(client, ns);
        let task = tokio::spawn(async move {
            let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let pods = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
                    _ => continue,
                };
                let now = Instant::now();
                for p in pods {
                    if p.spec.node_name.is_some()
                        && let Some(n) = p.metadata.name
                        && let Ok(mut m) = b.lock()
                    {
                        m.entry(n).or_insert(now);
                    }
                }
            }
        });
        BindWatch { bound, task }
    }

    fn count(&self) -> usize {
        self.bound.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn snapshot(&self) -> HashMap<String, Instant> {
        self.bound.lock().map(|m| m.clone()).unwrap_or_default()
    }

    async fn wait_for(&self, n: usize, timeout: Duration, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() > deadline {
                bail!("timed out: {} of {n} {what} bound", self.count());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for BindWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The JSON body of a benchmark pod.
fn pod(name: &str) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "sched-bench"}},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
    }))?)
}

async fn namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    // ServiceAccount admission refuses pods until the namespace's `default` ServiceAccount
    // exists (403, as kube-apiserver does); the controller creates it right after the namespace.
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), name);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sas.get_opt("default").await?.is_none() {
        if Instant::now() > deadline {
            bail!("namespace {name}: no default ServiceAccount after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn run_async(args: Args) -> anyhow::Result<()> {
    let bin = match &args.skiff {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("skiff"),
    };
    // A cluster CIDR with room for a /24 per node (the default /16 holds 256), so node IPAM
    // gives every hollow node its podCIDR as it would in a real cluster of this size.
    let srv: ServerProc = start_server(&bin, &["--cluster-cidr", "10.64.0.0/10"])?;
    let pid = srv.pid();
    let client = skiff_bench::hollow::client_from_kubeconfig(&srv.kubeconfig()).await?;
    let rss = RssSampler::start(pid);
    let timeout = Duration::from_secs(args.timeout_secs);

    let t = Instant::now();
    let cfg = skiff_bench::hollow::HollowConfig {
        prefix: "hollow".into(),
        count: args.nodes,
        kubelet: false,
        ..Default::default()
    };
    let _nodes = skiff_bench::hollow::HollowNodes::start(client.clone(), cfg).await?;
    let reg = t.elapsed();
    eprintln!(
        "{} hollow nodes registered in {:.1} s",
        args.nodes,
        reg.as_secs_f64()
    );
    // Let the scheduler's node informer take in every node before pods arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_nodes = kib_field(pid, "VmRSS:").unwrap_or(0);

    namespace(&client, "sched-bench").await?;
    let watch = BindWatch::start(client.clone(), "sched-bench");
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let cpu0 = (cpu_secs(pid), cpu_secs(std::process::id()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (client, created) = (client.clone(), created.clone());
        let pods = kube::core::Request::new(<SlimPod as kube::Resource>::url_path(
            &(),
            Some("sched-bench"),
        ));
        let (clients, total) = (args.clients, args.pods);
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while i < total {
                let name = format!("p-{i}");
                let req = pods.create(&PostParams::default(), pod(&name)?)?;
                let at = Instant::now();
                client
                    .request::<SlimPod>(req)
                    .await
                    .with_context(|| format!("creating pod {name}"))?;
                if let Ok(mut m) = created.lock() {
                    m.insert(name, at);
                }
                i += clients;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a creating client")??;
    }
    let create_secs = start.elapsed().as_secs_f64();
    watch.wait_for(args.pods, timeout, "pods").await?;
    let cpu1 = (cpu_secs(pid), cpu_secs(std::process::id()));
    let bound = watch.snapshot();
    let created = created.lock().map(|m| m.clone()).unwrap_or_default();
    let mut binds: Vec<Instant> = bound.values().copied().collect();
    binds.sort();
    let last = binds.last().copied().unwrap_or(start);
    let total_secs = (last - start).as_secs_f64();
    let (lo, hi) = (binds.len() / 10, binds.len() * 9 / 10);
    let mid_rate = if hi > lo {
        (hi - lo) as f64 / (binds[hi - 1] - binds[lo]).as_secs_f64().max(1e-9)
    } else {
        f64::NAN
    };
    let mut lat: Vec<Duration> = created
        .iter()
        .filter_map(|(n, c)| bound.get(n).map(|b| b.saturating_duration_since(*c)))
        .collect();
    lat.sort();
    let rss_pods = kib_field(pid, "VmRSS:").unwrap_or(0);
    drop(watch);

    let mut deploy_ms = None;
    if args.replicas > 0 {
        namespace(&client, "deploy-bench").await?;
        let watch = BindWatch::start(client.clone(), "deploy-bench");
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"replicas": args.replicas, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox",
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}}}
        }))?;
        let t = Instant::now();
        Api::<Deployment>::namespaced(client.clone(), "deploy-bench")
            .create(&PostParams::default(), &d)
            .await
            .context("creating the Deployment")?;
        watch
            .wait_for(args.replicas, timeout, "Deployment pods")
            .await?;
        deploy_ms = Some(ms(t.elapsed()));
    }
    let peak = rss.peak_kib().max(kib_field(pid, "VmRSS:").unwrap_or(0));
    let hwm = kib_field(pid, "VmHWM:").unwrap_or(0);

    println!(
        "## Scheduler: {} hollow nodes, {} pods, {} creating clients\n",
        args.nodes, args.pods, args.clients
    );
    println!("| measure | value |\n| --- | --- |");
    println!(
        "| nodes registered (with leases) | {:.1} s |",
        reg.as_secs_f64()
    );
    println!(
        "| pods created by the clients | {:.1} s ({:.0} creates/s) |",
        create_secs,
        args.pods as f64 / create_secs
    );
    println!(
        "| **scheduling throughput, first create → last bind** | **{:.0} pods/s** ({:.2} s) |",
        args.pods as f64 / total_secs,
        total_secs
    );
    println!("| throughput over the middle 80 % of binds | {mid_rate:.0} pods/s |");
    if let ((Some(s0), Some(c0)), (Some(s1), Some(c1))) = (cpu0, cpu1) {
        println!(
            "| CPU while pods were created and bound: server / this client | {:.1} s ({:.2} ms per pod) / {:.1} s |",
            s1 - s0,
            (s1 - s0) * 1000.0 / args.pods as f64,
            c1 - c0
        );
    }
    println!(
        "| create→bound latency p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default())
    );
    if let Some(d) = deploy_ms {
        println!(
            "| {}-replica Deployment, create → all pods bound | {d:.0} ms |",
            args.replicas
        );
    }
    println!(
        "| server RSS: after nodes / after pods / sampled peak / VmHWM | {:.1} / {:.1} / {:.1} / {:.1} MiB |",
        rss_nodes as f64 / 1024.0,
        rss_pods as f64 / 1024.0,
        peak as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    Ok(())
}
