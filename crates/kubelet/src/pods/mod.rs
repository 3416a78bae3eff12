//! The pod manager: watches the pods bound to this node, runs one worker per pod, cleans up
//! sandboxes of pods that are gone (also those deleted while the kubelet was down), and answers
//! the kubelet server's [`PodLookup`] questions.

pub mod cni_plugins;
pub mod env;
pub mod events;
pub mod probe;
pub mod pullsecrets;
pub mod spec;
pub mod volumes;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;
use skiff_net::Network;
use skiff_runtime::Runtime;
use tokio::sync::watch;

use crate::config::{KubeletConfig, KubeletError, api_err, rt_err};
use crate::server::{PodLookup, PodRef};
use worker::{Flow, Worker};

/// What every worker shares.
pub struct Shared {
    /// API client.
    pub client: kube::Client,
    /// Configuration.
    pub cfg: Arc<KubeletConfig>,
    /// Container runtime.
    pub runtime: Arc<dyn Runtime>,
    /// Pod network (None until the pod CIDR is known, or for host-network only nodes).
    pub network: Option<Arc<Network>>,
    /// External CNI plugins (`--cni-conf-dir`): pods are attached by them instead of by
    /// `network`, which then only keeps the bridge, its gateway address and the service route.
    pub cni: Option<Arc<skiff_net::cni::CniExecutor>>,
    /// The node's InternalIP.
    pub node_ip: Ipv4Addr,
    /// Pods as the kubelet server sees them.
    pub registry: Arc<RwLock<HashMap<(String, String), PodRef>>>,
    /// Node pressure conditions (pod admission reads them).
    pub pressure: crate::eviction::SharedPressure,
    /// Pods the eviction manager asked to go, by uid.
    pub evictions: crate::eviction::EvictionRequests,
    /// Where pod events are queued.
    pub events: events::Recorder,
}

/// The [`PodLookup`] the kubelet server uses.
#[derive(Clone, Default)]
pub struct Registry(pub Arc<RwLock<HashMap<(String, String), PodRef>>>);

impl PodLookup for Registry {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodRef> {
        self.0
            .read()
            .ok()?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    fn pods(&self) -> Vec<PodRef> {
        self.0
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

struct Handle {
    tx: watch::Sender<Arc<Pod>>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs one pod's worker until the pod is gone or the kubelet stops.
async fn run_worker(
    sh: Arc<Shared>,
    mut rx: watch::Receiver<Arc<Pod>>,
    mut stop: watch::Receiver<bool>,
    adopt: bool,
) {
    let first = rx.borrow_and_update().clone();
    let mut w = Worker::new(sh.clone(), &first);
    if !adopt {
        w.nothing_to_adopt();
    }
    let key = format!(
        "{}/{}",
        first.metadata.namespace.as_deref().unwrap_or(""),
        first.metadata.name.as_deref().unwrap_or("")
    );
    let mut pod = first;
    loop {
        match w.sync(&pod).await {
            Ok(Flow::Done) => return,
            Ok(Flow::Continue) => {}
            Err(e) => tracing::warn!(pod = %key, error = %e, "pod sync failed"),
        }
        if w.take_resync() {
            pod = rx.borrow_and_update().clone();
            continue;
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The pod object is gone: kill what is left, no grace.
                    tracing::info!(pod = %key, "pod deleted; removing its sandbox");
                    w.cleanup().await;
                    return;
                }
                pod = rx.borrow_and_update().clone();
            }
            _ = tokio::time::sleep(sh.cfg.sync_interval) => {
                // The object may have changed without waking us (see `needs_sync`).
                pod = rx.borrow_and_update().clone();
            }
            _ = stop.changed() => return,
        }
    }
}

/// Whether a pod's worker must sync for the change from `old` to `new`: a change of its spec
/// or metadata (deletion, labels and annotations for the downward API), but not of its
/// resourceVersion or managed fields, nor of its status; except that a pod with readiness gates
/// syncs when its conditions change, since its Ready condition depends on conditions others
/// write (as the kubelet's `NeedToReconcilePodReadiness`).
fn needs_sync(old: &Pod, new: &Pod) -> bool {
    if old.spec != new.spec {
        return true;
    }
    let strip = |p: &Pod| {
        let mut m = p.metadata.clone();
        m.resource_version = None;
        m.managed_fields = None;
        m
    };
    if strip(old) != strip(new) {
        return true;
    }
    let gated = new
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| !g.is_empty());
    let conditions = |p: &Pod| p.status.as_ref().and_then(|s| s.conditions.clone());
    gated && conditions(old) != conditions(new)
}

/// Watches this node's pods and runs their workers.
pub struct PodManager {
    sh: Arc<Shared>,
    workers: HashMap<String, Handle>,
    stop: watch::Receiver<bool>,
    /// Uids of pods whose sandboxes were on the node when the kubelet started: only their
    /// workers look for something to re-adopt (a listing of every sandbox per new pod would
    /// make starting n pods cost n² reads).
    adoptable: HashSet<String>,
}

impl PodManager {
    /// A manager over `shared`; workers end (leaving pods running) when `stop` fires.
    pub fn new(sh: Arc<Shared>, stop: watch::Receiver<bool>) -> PodManager {
        PodManager {
            sh,
            workers: HashMap::new(),
            stop,
            adoptable: HashSet::new(),
        }
    }

    fn dispatch(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let pod = Arc::new(pod);
        if let Some(h) = self.workers.get(&uid)
            && !h.task.is_finished()
        {
            // Like the kubelet's pod config (a status-only change is a "reconcile", not an
            // update for the pod's worker), a change the worker would not act on does not wake
            // it. Most are the worker's own status writes coming back. The worker still reads
            // the newest object at its next sync.
            h.tx.send_if_modified(|cur| {
                let wake = needs_sync(cur, &pod);
                *cur = pod;
                wake
            });
            return;
        }
        let adopt = self.adoptable.remove(&uid);
        let (tx, rx) = watch::channel(pod);
        let task = tokio::spawn(run_worker(self.sh.clone(), rx, self.stop.clone(), adopt));
        self.workers.insert(uid, Handle { tx, task });
    }

    fn gone(&mut self, uid: &str) {
        // Dropping the sender tells the worker the object is gone.
        self.workers.remove(uid);
    }

    /// Removes sandboxes and pod dirs whose pods no longer exist; returns the pod uids whose
    /// sandboxes stay (for their workers to re-adopt).
    pub async fn cleanup_orphans(
        &self,
        live: &HashSet<String>,
    ) -> Result<HashSet<String>, KubeletError> {
        let sbs = self
            .sh
            .runtime
            .list_sandboxes()
            .await
            .map_err(rt_err("listing sandboxes"))?;
        let mut kept = HashSet::new();
        for sb in sbs {
            if live.contains(&sb.name) {
                kept.insert(sb.name);
            } else {
                tracing::info!(sandbox = %sb.id, pod_uid = %sb.name, "removing sandbox of a pod that no longer exists");
                worker::remove_sandbox(&self.sh, &sb.id).await;
            }
        }
        let pods_dir = self.sh.cfg.root_dir.join("pods");
        if let Ok(rd) = std::fs::read_dir(&pods_dir) {
            for e in rd.flatten() {
                let uid = e.file_name().to_string_lossy().into_owned();
                if !live.contains(&uid) {
                    volumes::unmount_all(&e.path());
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let logs = self.sh.cfg.root_dir.join("logs");
        if let Ok(rd) = std::fs::read_dir(&logs) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.rsplit('_').next().is_some_and(|u| !live.contains(u)) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(kept)
    }

    /// Lists, cleans up, then watches until stopped.
    pub async fn run(mut self) -> Result<(), KubeletError> {
        let api: Api<Pod> = Api::all(self.sh.client.clone());
        let selector = format!("spec.nodeName={}", self.sh.cfg.node_name);
        let initial = api
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(api_err("listing pods of this node"))?;
        let live: HashSet<String> = initial
            .items
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        self.adoptable = self.cleanup_orphans(&live).await?;
        for p in initial.items {
            self.dispatch(p);
        }
        let stream = watcher(api, watcher::Config::default().fields(&selector));
        futures::pin_mut!(stream);
        let mut stop = self.stop.clone();
        let mut init_seen: Option<HashSet<String>> = None;
        loop {
            let ev = tokio::select! {
                _ = stop.changed() => break,
                ev = stream.next() => ev,
            };
            let Some(ev) = ev else { break };
            match ev {
                Ok(watcher::Event::Apply(p)) => self.dispatch(p),
                Ok(watcher::Event::Delete(p)) => {
                    if let Some(uid) = &p.metadata.uid {
                        self.gone(uid);
                    }
                }
                Ok(watcher::Event::Init) => init_seen = Some(HashSet::new()),
                Ok(watcher::Event::InitApply(p)) => {
                    if let (Some(s), Some(uid)) = (init_seen.as_mut(), p.metadata.uid.clone()) {
                        s.insert(uid);
                    }
                    self.dispatch(p);
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = init_seen.take() {
                        let gone: Vec<String> = self
                            .workers
                            .keys()
                            .filter(|u| !seen.contains(*u))
                            .cloned()
                            .collect();
                        for u in gone {
                            self.gone(&u);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        // Workers end on the stop signal; their pods keep running.
        for (_, h) in self.workers.drain() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), h.task).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::needs_sync;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("test pod")
    }

    #[test]
    fn a_status_only_change_does_not_wake_the_worker_but_spec_metadata_and_gated_conditions_do() {
        let base = serde_json::json!({
            "metadata": {"name": "p", "uid": "u", "resourceVersion": "1", "labels": {"a": "1"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Pending"},
        });
        let old = pod(base.clone());
        let mut v = base.clone();
        v["metadata"]["resourceVersion"] = "2".into();
        v["status"] = serde_json::json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        assert!(
            !needs_sync(&old, &pod(v.clone())),
            "own status write echoed back"
        );

        let mut d = v.clone();
        d["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        assert!(needs_sync(&old, &pod(d)), "deletion");
        let mut l = v.clone();
        l["metadata"]["labels"]["a"] = "2".into();
        assert!(needs_sync(&old, &pod(l)), "label (downward API)");
        let mut s = v.clone();
        s["spec"]["activeDeadlineSeconds"] = 5.into();
        assert!(needs_sync(&old, &pod(s)), "spec");

        let mut g = base.clone();
        g["spec"]["readinessGates"] = serde_json::json!([{"conditionType": "x/ready"}]);
        let gold = pod(g.clone());
        g["status"]["conditions"] = serde_json::json!([{"type": "x/ready", "status": "True"}]);
        assert!(
            needs_sync(&gold, &pod(g)),
            "readiness gate condition written by a controller"
        );
    }
}
