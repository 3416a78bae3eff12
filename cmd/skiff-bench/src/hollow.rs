//! Hollow nodes (in the spirit of kubemark): Node objects with capacity and renewed Leases, and
//! a fake kubelet that marks pods bound to them Running and Ready with a pod IP, finishes pods
//! labelled `skiff.dev/hollow-exit=<code>` (0 → Succeeded, else Failed) and removes pods being
//! deleted. No containers run. Used by `skiff-bench hollow-nodes`, the scheduler benchmark and
//! the end-to-end tests.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::Semaphore;

/// Label that makes a hollow node finish a pod with this exit code instead of running it.
pub const EXIT_LABEL: &str = "skiff.dev/hollow-exit";
/// Label every hollow node carries.
pub const HOLLOW_LABEL: &str = "skiff.dev/hollow";

/// What the hollow nodes look like.
#[derive(Debug, Clone)]
pub struct HollowConfig {
    /// Node names are `<prefix>-<i>`.
    pub prefix: String,
    /// How many nodes.
    pub count: usize,
    /// Capacity: cpu.
    pub cpu: String,
    /// Capacity: memory.
    pub memory: String,
    /// Capacity: pods.
    pub pods: String,
    /// Lease renewal interval.
    pub renew: Duration,
    /// Run the fake kubelet (mark bound pods Running). The scheduler benchmark turns it off to
    /// measure scheduling alone, as kube-scheduler's scheduler_perf does.
    pub kubelet: bool,
}

impl Default for HollowConfig {
    fn default() -> Self {
        HollowConfig {
            prefix: "hollow".into(),
            count: 3,
            cpu: "4".into(),
            memory: "16Gi".into(),
            pods: "110".into(),
            renew: Duration::from_secs(10),
            kubelet: true,
        }
    }
}

struct Shared {
    nodes: HashMap<String, usize>,
    stopped: Mutex<HashSet<String>>,
    cidrs: Mutex<HashMap<String, String>>,
    next_ip: Mutex<HashMap<String, u32>>,
}

/// Running hollow nodes; dropping them stops everything (leases then expire).
pub struct HollowNodes {
    /// The node names.
    pub names: Vec<String>,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for HollowNodes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &std::path::Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    kube::Client::try_from(config).context("building the API client")
}

fn ready_status(now: &str) -> serde_json::Value {
    json!([
        {"type": "Ready", "status": "True", "reason": "KubeletReady",
         "message": "hollow kubelet is posting ready status",
         "lastHeartbeatTime": now, "lastTransitionTime": now},
        {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
         "lastHeartbeatTime": now, "lastTransitionTime": now},
        {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure",
         "lastHeartbeatTime": now, "lastTransitionTime": now},
        {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID",
         "lastHeartbeatTime": now, "lastTransitionTime": now},
    ])
}

impl HollowNodes {
    /// Registers the nodes and starts their leases and fake kubelet.
    pub async fn start(client: kube::Client, cfg: HollowConfig) -> anyhow::Result<HollowNodes> {
        let names: Vec<String> = (0..cfg.count)
            .map(|i| format!("{}-{i}", cfg.prefix))
            .collect();
        let nodes_api = Api::<Node>::all(client.clone());
        let sem = Arc::new(Semaphore::new(32));
        let mut regs = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let (api, cfg, name, sem) = (nodes_api.clone(), cfg.clone(), name.clone(), sem.clone());
            regs.push(tokio::spawn(async move {
                let _p = sem.acquire().await;
                register(&api, &cfg, &name, i).await
            }));
        }
        for r in regs {
            r.await.context("registering a hollow node")??;
        }
        let shared = Arc::new(Shared {
            nodes: names
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, n)| (n, i))
                .collect(),
            stopped: Mutex::default(),
            cidrs: Mutex::default(),
            next_ip: Mutex::default(),
        });
        let mut tasks = vec![
            tokio::spawn(leases(
                client.clone(),
                shared.clone(),
                names.clone(),
                cfg.renew,
            )),
            tokio::spawn(watch_nodes(
                client.clone(),
                shared.clone(),
                cfg.prefix.clone(),
            )),
        ];
        if cfg.kubelet {
            tasks.push(tokio::spawn(kubelet(client, shared.clone())));
        }
        Ok(HollowNodes {
            names,
            shared,
            tasks,
        })
    }

    /// Stops one node: no more lease renewals or pod updates, as if it lost power.
    pub fn stop_node(&self, name: &str) {
        lock(&self.shared.stopped).insert(name.to_string());
    }
}

async fn register(api: &Api<Node>, cfg: &HollowConfig, name: &str, i: usize) -> anyhow::Result<()> {
    let now = Timestamp::now().to_string();
    let ip =
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + u32::try_from(i).unwrap_or(0) + 1);
    let status = json!({
        "capacity": {"cpu": cfg.cpu, "memory": cfg.memory, "pods": cfg.pods},
        "allocatable": {"cpu": cfg.cpu, "memory": cfg.memory, "pods": cfg.pods},
        "conditions": ready_status(&now),
        "addresses": [{"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}],
        "nodeInfo": {"kubeletVersion": "v1.35.0-hollow", "kubeProxyVersion": "", "operatingSystem": "linux",
            "architecture": "amd64", "containerRuntimeVersion": "hollow://0", "osImage": "hollow",
            "kernelVersion": "", "machineID": name, "systemUUID": name, "bootID": name},
    });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", HOLLOW_LABEL: "true"}},
        "spec": {},
        "status": status.clone(),
    }))?;
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).with_context(|| format!("creating node {name}")),
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .with_context(|| format!("writing the status of node {name}"))?;
    Ok(())
}

async fn leases(client: kube::Client, shared: Arc<Shared>, names: Vec<String>, every: Duration) {
    let api = Api::<Lease>::namespaced(client, "kube-node-lease");
    let sem = Arc::new(Semaphore::new(32));
    loop {
        let mut jobs = Vec::new();
        for name in &names {
            if lock(&shared.stopped).contains(name) {
                continue;
            }
            let (api, name, sem) = (api.clone(), name.clone(), sem.clone());
            jobs.push(tokio::spawn(async move {
                let _p = sem.acquire().await;
                if let Err(e) = renew(&api, &name).await {
                    tracing::warn!(node = %name, error = %e, "lease renewal failed");
                }
            }));
        }
        for j in jobs {
            let _ = j.await;
        }
        tokio::time::sleep(every).await;
    }
}

async fn renew(api: &Api<Lease>, name: &str) -> Result<(), kube::Error> {
    let patch = json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_now()}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "kube-node-lease",
                    "ownerReferences": []},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
            }))
            .map_err(kube::Error::SerdeError)?;
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Learns pod CIDRs and re-asserts Ready when the node lifecycle controller marked a live node.
async fn watch_nodes(client: kube::Client, shared: Arc<Shared>, _prefix: String) {
    let api = Api::<Node>::all(client);
    let cfg = watcher::Config::default().labels(&format!("{HOLLOW_LABEL}=true"));
    let stream = watcher::watcher(api.clone(), cfg)
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        let Ok(node) = ev else { continue };
        let name = node.metadata.name.clone().unwrap_or_default();
        if !shared.nodes.contains_key(&name) {
            continue;
        }
        if let Some(c) = node.spec.as_ref().and_then(|s| s.pod_cidr.clone()) {
            lock(&shared.cidrs).insert(name.clone(), c);
        }
        if lock(&shared.stopped).contains(&name) {
            continue;
        }
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status == "True")
            .unwrap_or(false);
        if !ready {
            let now = Timestamp::now().to_string();
            let _ = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"conditions": ready_status(&now)}})),
                )
                .await;
        }
    }
}

fn pod_ip(shared: &Shared, node: &str) -> String {
    let idx = shared.nodes.get(node).copied().unwrap_or(0);
    let n = {
        let mut m = lock(&shared.next_ip);
        let e = m.entry(node.to_string()).or_insert(1);
        *e = *e % 250 + 1;
        *e + 1
    };
    let base = lock(&shared.cidrs)
        .get(node)
        .and_then(|c| c.split_once('/'))
        .and_then(|(ip, _)| ip.parse::<Ipv4Addr>().ok())
        .unwrap_or_else(|| {
            Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 200, 0, 0))
                    + (u32::try_from(idx).unwrap_or(0) % 256) * 256,
            )
        });
    Ipv4Addr::from(u32::from(base) + n).to_string()
}

async fn kubelet(client: kube::Client, shared: Arc<Shared>) {
    let api = Api::<Pod>::all(client.clone());
    let stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let sem = Arc::new(Semaphore::new(64));
    let handled: Arc<Mutex<HashSet<String>>> = Arc::default();
    while let Some(ev) = stream.next().await {
        let Ok(pod) = ev else { continue };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if !shared.nodes.contains_key(&node) || lock(&shared.stopped).contains(&node) {
            continue;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let tag = if deleting {
            format!("{uid}/del")
        } else {
            uid.clone()
        };
        if !(deleting || phase.is_empty() || phase == "Pending") {
            continue;
        }
        if !lock(&handled).insert(tag.clone()) {
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        let (shared, sem, handled) = (shared.clone(), sem.clone(), handled.clone());
        tokio::spawn(async move {
            let _p = sem.acquire().await;
            let r = if deleting {
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                pods.delete(&name, &dp).await.map(|_| ())
            } else {
                let status = pod_status(&shared, &node, &pod);
                pods.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await
                .map(|_| ())
            };
            match r {
                Ok(()) | Err(kube::Error::Api(_)) => {}
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "hollow kubelet update failed");
                    lock(&handled).remove(&tag);
                }
            }
        });
    }
}

fn pod_status(shared: &Shared, node: &str, pod: &Pod) -> serde_json::Value {
    let now = Timestamp::now().to_string();
    let exit: Option<i32> = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(EXIT_LABEL))
        .and_then(|v| v.parse().ok());
    let host_ip = format!(
        "10.250.0.{}",
        shared.nodes.get(node).copied().unwrap_or(0) % 250 + 1
    );
    let ip = pod_ip(shared, node);
    let containers: Vec<serde_json::Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let state = match exit {
                Some(code) => json!({"terminated": {"exitCode": code,
                    "reason": if code == 0 { "Completed" } else { "Error" },
                    "startedAt": now, "finishedAt": now}}),
                None => json!({"running": {"startedAt": now}}),
            };
            json!({"name": c.name, "image": c.image, "imageID": "", "ready": exit.is_none(),
                "started": exit.is_none(), "restartCount": 0, "state": state})
        })
        .collect();
    let (phase, ready) = match exit {
        None => ("Running", "True"),
        Some(0) => ("Succeeded", "False"),
        Some(_) => ("Failed", "False"),
    };
    json!({
        "phase": phase,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
            {"type": "Ready", "status": ready, "lastTransitionTime": now},
        ],
        "containerStatuses": containers,
    })
}
