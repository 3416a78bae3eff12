//! The scheduler: watches pods and nodes through the `kube` client (one watcher per type),
//! queues unbound pods, filters and scores nodes, binds through `pods/binding`, and reports
//! `Scheduled` / `FailedScheduling` events and the `PodScheduled` condition.

pub mod interpod;
pub mod plugins;
pub mod queue;
pub mod resources;
pub mod spread;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use rand::Rng;
use skiff_events::{NORMAL, Recorder, WARNING};
use tokio::sync::{Semaphore, mpsc};

use plugins::{Failure, NodeInfo, PodInfo};
use queue::{Backoff, Queue};

/// The name pods ask for in `spec.schedulerName` (empty means this one too).
pub const DEFAULT_SCHEDULER_NAME: &str = "default-scheduler";

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// `spec.schedulerName` this scheduler serves (pods with an empty name are served too).
    pub scheduler_name: String,
    /// Backoff of the first retry of an unschedulable pod (doubles per attempt).
    pub initial_backoff: Duration,
    /// Upper bound of the backoff.
    pub max_backoff: Duration,
    /// Unschedulable pods are retried after this long even if nothing changed.
    pub unschedulable_flush: Duration,
    /// Binding requests in flight at once.
    pub bind_concurrency: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            scheduler_name: DEFAULT_SCHEDULER_NAME.into(),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            unschedulable_flush: Duration::from_secs(300),
            bind_concurrency: 64,
        }
    }
}

/// Why the scheduler stopped.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A watch task ended, which only happens when the runtime shuts down under us.
    #[error("scheduler: the {resource} watch ended unexpectedly; restart the scheduler")]
    WatchEnded {
        /// The watched resource.
        resource: &'static str,
    },
}

/// What the watch tasks and bind tasks tell the scheduling loop.
enum Msg {
    PodApply(Arc<Pod>),
    PodDelete(String),
    PodInit,
    PodInitDone,
    NodeApply(Arc<Node>),
    NodeDelete(String),
    NodeInit,
    NodeInitDone,
    Bound {
        key: String,
        result: Result<(), String>,
        conflict: bool,
    },
    WatchEnded(&'static str),
}

/// Runs the scheduler until `shutdown` completes.
///
/// `client` may talk to a remote API server or, inside `skiff server`, to the apiserver router
/// itself (a tower service that inserts the scheduler's `Identity`), as the tests do. The
/// caller owns leader election: start this only on the server that holds the scheduler Lease.
pub async fn run(
    client: kube::Client,
    config: SchedulerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SchedulerError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let pods = spawn_watch(
        Api::<Pod>::all(client.clone()),
        tx.clone(),
        "pods",
        |p| Msg::PodApply(Arc::new(slim_pod(p))),
        |p: Pod| Msg::PodDelete(pod_key(&p)),
        || Msg::PodInit,
        || Msg::PodInitDone,
    );
    let nodes = spawn_watch(
        Api::<Node>::all(client.clone()),
        tx.clone(),
        "nodes",
        |n| Msg::NodeApply(Arc::new(slim_node(n))),
        |n: Node| Msg::NodeDelete(n.metadata.name.unwrap_or_default()),
        || Msg::NodeInit,
        || Msg::NodeInitDone,
    );
    let mut sched = Scheduler::new(client, config, tx);
    let result = tokio::select! {
        r = sched.run_loop(rx) => r,
        () = shutdown => Ok(()),
    };
    pods.abort();
    nodes.abort();
    result
}

/// Turns a watch of `api` into messages for the scheduling loop. No reflector cache: the loop
/// keeps the objects it needs itself (a reflector would clone every object into a second map),
/// and relists are handled with the `Init`/`InitDone` messages.
fn spawn_watch<K>(
    api: Api<K>,
    tx: mpsc::UnboundedSender<Msg>,
    resource: &'static str,
    apply: fn(K) -> Msg,
    delete: fn(K) -> Msg,
    init: fn() -> Msg,
    init_done: fn() -> Msg,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            let msg = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => apply(o),
                Ok(watcher::Event::Delete(o)) => delete(o),
                Ok(watcher::Event::Init) => init(),
                Ok(watcher::Event::InitDone) => init_done(),
                Err(e) => {
                    tracing::warn!(resource, error = %e, "scheduler watch failed; retrying");
                    continue;
                }
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
        let _ = tx.send(Msg::WatchEnded(resource));
    })
}

/// What the scheduler keeps of a pod: the fields its plugins, bindings, preemption and events
/// read. Volumes, env, probes, managed fields and the like are dropped: at 10,000 pods they were
/// several KiB a pod of the server's memory (a decoded `Vec<Volume>` alone keeps room for four
/// of the large `Volume` structs).
fn slim_pod(mut p: Pod) -> Pod {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    if let Some(s) = p.spec.as_mut() {
        s.volumes = None;
        s.ephemeral_containers = None;
        for c in s
            .containers
            .iter_mut()
            .chain(s.init_containers.iter_mut().flatten())
        {
            c.env = None;
            c.env_from = None;
            c.volume_mounts = None;
            c.volume_devices = None;
            c.command = None;
            c.args = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
            c.lifecycle = None;
            c.security_context = None;
        }
        s.containers.shrink_to_fit();
    }
    if let Some(st) = p.status.as_mut() {
        st.container_statuses = None;
        st.init_container_statuses = None;
        st.ephemeral_container_statuses = None;
    }
    p
}

/// What the scheduler keeps of a node: its image list (no image-locality score here) and
/// managed fields go.
fn slim_node(mut n: Node) -> Node {
    n.metadata.managed_fields = None;
    if let Some(st) = n.status.as_mut() {
        st.images = None;
    }
    n
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn assigned_node(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

/// A pod counted on a node (bound, or assumed while its binding is in flight).
struct Assigned {
    node: String,
    info: PodInfo,
    assumed: bool,
}

struct Scheduler {
    client: kube::Client,
    config: SchedulerConfig,
    tx: mpsc::UnboundedSender<Msg>,
    queue: Queue,
    nodes: HashMap<String, NodeInfo>,
    /// Names of nodes that exist (NodeInfo entries may also hold pods of unknown nodes).
    node_list: Vec<String>,
    present: HashSet<String>,
    assigned: HashMap<String, Assigned>,
    next_start: usize,
    pods_synced: bool,
    nodes_synced: bool,
    relist_pods: Option<HashSet<String>>,
    relist_nodes: Option<HashSet<String>>,
    binds: Arc<Semaphore>,
    events: Recorder,
}

impl Scheduler {
    fn new(client: kube::Client, config: SchedulerConfig, tx: mpsc::UnboundedSender<Msg>) -> Self {
        let queue = Queue::new(Backoff {
            initial: config.initial_backoff,
            max: config.max_backoff,
        });
        let binds = Arc::new(Semaphore::new(config.bind_concurrency.max(1)));
        Scheduler {
            events: Recorder::new(client.clone(), DEFAULT_SCHEDULER_NAME),
            client,
            config,
            tx,
            queue,
            nodes: HashMap::new(),
            node_list: Vec::new(),
            present: HashSet::new(),
            assigned: HashMap::new(),
            next_start: 0,
            pods_synced: false,
            nodes_synced: false,
            relist_pods: None,
            relist_nodes: None,
            binds,
        }
    }

    async fn run_loop(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
    ) -> Result<(), SchedulerError> {
        let mut last_flush = Instant::now();
        loop {
            // Take in everything that happened before deciding anything.
            while let Ok(msg) = rx.try_recv() {
                self.handle(msg)?;
            }
            let now = Instant::now();
            let next_backoff = self.queue.flush_backoff(now);
            if now.duration_since(last_flush) >= Duration::from_secs(30) {
                self.queue
                    .flush_unschedulable(now, self.config.unschedulable_flush);
                last_flush = now;
            }
            if self.pods_synced && self.nodes_synced && self.queue.has_active() {
                if let Some((key, pod)) = self.queue.pop() {
                    self.schedule_one(key, pod);
                }
                // Yield so watch and bind tasks make progress on a busy runtime.
                tokio::task::yield_now().await;
                continue;
            }
            let sleep = next_backoff
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(30))
                .min(Duration::from_secs(30));
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg)?,
                    None => return Ok(()),
                },
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn handle(&mut self, msg: Msg) -> Result<(), SchedulerError> {
        let now = Instant::now();
        match msg {
            Msg::PodApply(p) => {
                if let Some(set) = self.relist_pods.as_mut() {
                    set.insert(pod_key(&p));
                }
                self.on_pod(p, now);
            }
            Msg::PodDelete(key) => self.on_pod_delete(&key, now),
            Msg::PodInit => self.relist_pods = Some(HashSet::new()),
            Msg::PodInitDone => {
                if let Some(seen) = self.relist_pods.take() {
                    let gone: Vec<String> = self
                        .assigned
                        .iter()
                        .filter(|(k, a)| !a.assumed && !seen.contains(*k))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in gone {
                        self.on_pod_delete(&k, now);
                    }
                }
                self.pods_synced = true;
            }
            Msg::NodeApply(n) => {
                if let Some(set) = self.relist_nodes.as_mut() {
                    set.insert(n.metadata.name.clone().unwrap_or_default());
                }
                self.on_node(n, now);
            }
            Msg::NodeDelete(name) => self.on_node_delete(&name),
            Msg::NodeInit => self.relist_nodes = Some(HashSet::new()),
            Msg::NodeInitDone => {
                if let Some(seen) = self.relist_nodes.take() {
                    let gone: Vec<String> = self
                        .present
                        .iter()
                        .filter(|n| !seen.contains(*n))
                        .cloned()
                        .collect();
                    for n in gone {
                        self.on_node_delete(&n);
                    }
                }
                self.nodes_synced = true;
            }
            Msg::Bound {
                key,
                result,
                conflict,
            } => match result {
                Ok(()) => self.queue.remove(&key),
                Err(e) => {
                    tracing::warn!(pod = %key, error = %e, "binding failed");
                    if let Some(a) = self.assigned.get(&key)
                        && a.assumed
                        && let Some(a) = self.assigned.remove(&key)
                        && let Some(n) = self.nodes.get_mut(&a.node)
                    {
                        n.remove_pod(&a.info);
                    }
                    if conflict {
                        self.queue.remove(&key);
                    } else {
                        self.queue.error(&key, now);
                    }
                }
            },
            Msg::WatchEnded(resource) => return Err(SchedulerError::WatchEnded { resource }),
        }
        Ok(())
    }

    fn responsible(&self, pod: &Pod) -> bool {
        let name = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or("");
        name.is_empty() || name == self.config.scheduler_name
    }

    fn on_pod(&mut self, pod: Arc<Pod>, now: Instant) {
        let key = pod_key(&pod);
        let node = assigned_node(&pod).map(str::to_string);
        let terminal = is_terminal(&pod);
        if node.is_none() && self.assigned.get(&key).is_some_and(|a| a.assumed) {
            // Our binding is in flight; this is an older view of the pod.
            return;
        }
        let old = self.assigned.remove(&key);
        if let Some(old) = &old
            && let Some(n) = self.nodes.get_mut(&old.node)
        {
            n.remove_pod(&old.info);
        }
        match node {
            Some(node) if !terminal => {
                let info = PodInfo::new(pod);
                let entry = self
                    .nodes
                    .entry(node.clone())
                    .or_insert_with(|| NodeInfo::new(Arc::new(placeholder(&node))));
                entry.add_pod(&info);
                self.assigned.insert(
                    key.clone(),
                    Assigned {
                        node,
                        info,
                        assumed: false,
                    },
                );
                self.queue.remove(&key);
            }
            Some(_) => {
                // Terminal pods free their node's resources.
                self.queue.remove(&key);
                if old.is_some() {
                    self.queue.move_unschedulable(now);
                }
            }
            None => {
                let pending = !terminal
                    && pod.metadata.deletion_timestamp.is_none()
                    && self.responsible(&pod);
                if pending {
                    self.queue.add_or_update(&key, pod, now);
                } else {
                    self.queue.remove(&key);
                }
            }
        }
    }

    fn on_pod_delete(&mut self, key: &str, now: Instant) {
        self.queue.remove(key);
        if let Some(a) = self.assigned.remove(key) {
            if let Some(n) = self.nodes.get_mut(&a.node) {
                n.remove_pod(&a.info);
            }
            self.queue.move_unschedulable(now);
        }
    }

    fn on_node(&mut self, node: Arc<Node>, now: Instant) {
        let name = node.metadata.name.clone().unwrap_or_default();
        match self.nodes.get_mut(&name) {
            Some(info) => {
                let changed = info.node.spec != node.spec
                    || info.node.metadata.labels != node.metadata.labels
                    || info.node.status.as_ref().map(|s| &s.allocatable)
                        != node.status.as_ref().map(|s| &s.allocatable);
                info.set_node(node);
                if self.present.insert(name.clone()) {
                    self.node_list.push(name);
                    self.queue.move_unschedulable(now);
                } else if changed {
                    self.queue.move_unschedulable(now);
                }
            }
            None => {
                self.nodes.insert(name.clone(), NodeInfo::new(node));
                self.present.insert(name.clone());
                self.node_list.push(name);
                self.queue.move_unschedulable(now);
            }
        }
    }

    fn on_node_delete(&mut self, name: &str) {
        if self.present.remove(name) {
            self.node_list.retain(|n| n != name);
        }
        if self.nodes.get(name).is_some_and(|n| n.pod_count == 0) {
            self.nodes.remove(name);
        }
    }

    /// How many feasible nodes to look for before scoring (kube-scheduler's adaptive
    /// percentageOfNodesToScore: all nodes below 100, then 50% − n/125 %, at least 5 %, ≥ 100).
    fn feasible_to_find(n: usize) -> usize {
        if n < 100 {
            return n;
        }
        let pct = (50 - (n / 125) as i64).max(5) as usize;
        (n * pct / 100).max(100)
    }

    fn schedule_one(&mut self, key: String, pod: Arc<Pod>) {
        let now = Instant::now();
        let info = PodInfo::new(pod.clone());
        let total = self.node_list.len();
        if total == 0 {
            self.queue.unschedulable(&key, now);
            self.report_unschedulable(&pod, "no nodes available to schedule pods".into());
            return;
        }
        let to_find = Self::feasible_to_find(total);
        // Over every NodeInfo (also those of unknown nodes): no name lookups; a pod with
        // anti-affinity on an unknown node only makes the (exact) check below run.
        let any_anti = self.nodes.values().any(|n| n.anti_affinity_pods > 0);
        let empty = std::collections::BTreeMap::new();
        let inter = interpod::relevant(&pod, any_anti).then(|| {
            interpod::prepare(
                &pod,
                self.node_list
                    .iter()
                    .filter_map(|n| self.nodes.get(n))
                    .map(|n| {
                        (
                            n.labels().unwrap_or(&empty),
                            n.pods.values().map(|p| p.as_ref()).collect(),
                        )
                    }),
            )
        });
        let spread_for = |kind| {
            spread::relevant(&pod, kind).then(|| {
                spread::prepare(
                    &pod,
                    kind,
                    self.node_list
                        .iter()
                        .filter_map(|n| self.nodes.get(n))
                        .map(|n| {
                            (
                                n.node.as_ref(),
                                n.pods.values().map(|p| p.as_ref()).collect(),
                            )
                        }),
                )
            })
        };
        let spread_state = spread_for(spread::Kind::Hard);
        let soft_spread = spread_for(spread::Kind::Soft);
        let mut feasible: Vec<&NodeInfo> = Vec::new();
        let mut failures: Vec<Vec<Failure>> = Vec::new();
        let mut failed_nodes: Vec<&str> = Vec::new();
        let mut processed = 0;
        for i in 0..total {
            let name = &self.node_list[(self.next_start + i) % total];
            processed += 1;
            let Some(n) = self.nodes.get(name) else {
                continue;
            };
            let mut f = plugins::filter(&info, n);
            if f.is_empty()
                && let Some(st) = spread_state.as_ref()
                && let Some(fail) = spread::filter(st, n.labels().unwrap_or(&empty))
            {
                f.push(fail);
            }
            if f.is_empty()
                && let Some(st) = inter.as_ref()
                && let Some(fail) = interpod::filter(st, n.labels().unwrap_or(&empty))
            {
                f.push(fail);
            }
            if f.is_empty() {
                feasible.push(n);
                if feasible.len() >= to_find {
                    break;
                }
            } else {
                failures.push(f);
                failed_nodes.push(name);
            }
        }
        self.next_start = (self.next_start + processed) % total;
        if feasible.is_empty() {
            let never = pod
                .spec
                .as_ref()
                .and_then(|s| s.preemption_policy.as_deref())
                == Some("Never");
            let candidate = if never {
                None
            } else {
                self.find_victims(&info, &failed_nodes, &failures)
            };
            if let Some((node, victims)) = candidate {
                let msg = plugins::fit_error_message(total, &failures, "");
                tracing::info!(pod = %key, node = %node, victims = victims.len(), "preempting");
                self.queue.unschedulable(&key, now);
                self.report_unschedulable(&pod, msg);
                self.spawn_preemption(&pod, node, victims);
                return;
            }
            let pre = plugins::preemption_message(total, &failures, never);
            let msg = plugins::fit_error_message(total, &failures, &pre);
            tracing::debug!(pod = %key, message = %msg, "unschedulable");
            self.queue.unschedulable(&key, now);
            self.report_unschedulable(&pod, msg);
            return;
        }
        let mut scores = plugins::score(&info, &feasible);
        if let Some(st) = soft_spread.as_ref() {
            // PodTopologySpread score (weight 2): fewer matching pods in the domain is better.
            let raw: Vec<Option<i64>> = feasible
                .iter()
                .map(|n| spread::score_raw(st, n.labels().unwrap_or(&empty)))
                .collect();
            let max = raw.iter().flatten().copied().max().unwrap_or(0);
            let min = raw.iter().flatten().copied().min().unwrap_or(0);
            for (s, r) in scores.iter_mut().zip(&raw) {
                let norm = match r {
                    None => 0,
                    Some(_) if max == min => 100,
                    Some(r) => (max - r) * 100 / (max - min),
                };
                *s += 2 * norm;
            }
        }
        let mut best = 0;
        let mut ties = 0u32;
        let mut rng = rand::rng();
        for (i, s) in scores.iter().enumerate() {
            if *s > scores[best] {
                best = i;
                ties = 1;
            } else if *s == scores[best] {
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = i;
                }
            }
        }
        let node = feasible[best]
            .node
            .metadata
            .name
            .clone()
            .unwrap_or_default();
        // Assume: count the pod on the node now, so the next pod sees it.
        if let Some(n) = self.nodes.get_mut(&node) {
            n.add_pod(&info);
        }
        self.assigned.insert(
            key.clone(),
            Assigned {
                node: node.clone(),
                info,
                assumed: true,
            },
        );
        self.spawn_bind(key, pod, node);
    }

    /// Default preemption, simplified: on each node whose failures eviction could fix, remove
    /// every lower-priority pod, check the pod fits, then give back victims (highest priority
    /// first) while it still fits. Picks the node whose victims have the lowest top priority,
    /// then the fewest victims. No candidate while lower-priority pods on the nominated node are
    /// still terminating (an earlier preemption is in progress).
    fn find_victims(
        &self,
        info: &PodInfo,
        failed_nodes: &[&str],
        failures: &[Vec<Failure>],
    ) -> Option<(String, Vec<Arc<Pod>>)> {
        let prio = |p: &Pod| p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
        let mine = prio(&info.pod);
        if let Some(nominated) = info
            .pod
            .status
            .as_ref()
            .and_then(|s| s.nominated_node_name.as_deref())
            && let Some(n) = self.nodes.get(nominated)
            && n.pods
                .values()
                .any(|p| prio(p) < mine && p.metadata.deletion_timestamp.is_some())
        {
            return None;
        }
        let mut best: Option<(i32, usize, String, Vec<Arc<Pod>>)> = None;
        for (name, fs) in failed_nodes.iter().zip(failures) {
            if fs.is_empty() || !fs.iter().all(|f| f.resolvable) {
                continue;
            }
            let Some(node) = self.nodes.get(*name) else {
                continue;
            };
            let mut sim = node.clone();
            let mut victims: Vec<PodInfo> = node
                .pods
                .values()
                .filter(|p| prio(p) < mine && p.metadata.deletion_timestamp.is_none())
                .map(|p| PodInfo::new(p.clone()))
                .collect();
            if victims.is_empty() {
                continue;
            }
            for v in &victims {
                sim.remove_pod(v);
            }
            if !plugins::filter(info, &sim).is_empty() {
                continue;
            }
            victims.sort_by_key(|v| std::cmp::Reverse(prio(&v.pod)));
            let mut chosen = Vec::new();
            for v in victims {
                sim.add_pod(&v);
                if !plugins::filter(info, &sim).is_empty() {
                    sim.remove_pod(&v);
                    chosen.push(v.pod);
                }
            }
            let top = chosen.iter().map(|p| prio(p)).max().unwrap_or(i32::MIN);
            let better = best
                .as_ref()
                .is_none_or(|(t, n, _, _)| (top, chosen.len()) < (*t, *n));
            if better {
                best = Some((top, chosen.len(), (*name).to_string(), chosen));
            }
        }
        best.map(|(_, _, node, victims)| (node, victims))
    }

    fn spawn_preemption(&self, pod: &Arc<Pod>, node: String, victims: Vec<Arc<Pod>>) {
        let client = self.client.clone();
        let events = self.events.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            for v in victims {
                let ns = v.metadata.namespace.clone().unwrap_or_default();
                let name = v.metadata.name.clone().unwrap_or_default();
                let msg = format!("Preempted by pod {uid} on node {node}");
                events.event(&*v, NORMAL, "Preempted", msg);
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                if let Err(e) = api.delete(&name, &Default::default()).await {
                    tracing::warn!(pod = %name, namespace = %ns, error = %e, "could not evict a preemption victim");
                }
            }
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let patch = serde_json::json!({"status": {"nominatedNodeName": node}});
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::warn!(pod = %name, namespace = %ns, error = %e, "could not set nominatedNodeName");
            }
        });
    }

    fn spawn_bind(&self, key: String, pod: Arc<Pod>, node: String) {
        let client = self.client.clone();
        let events = self.events.clone();
        let tx = self.tx.clone();
        let permits = self.binds.clone();
        tokio::spawn(async move {
            let _permit = permits.acquire().await;
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let binding = Binding {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                },
                target: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node.clone()),
                    ..Default::default()
                },
            };
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let res = api
                .create_subresource::<Binding, serde_json::Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await;
            let (result, conflict) = match res {
                Ok(_) => (Ok(()), false),
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    (Err(s.message.clone()), true)
                }
                Err(e) => (Err(e.to_string()), false),
            };
            let ok = result.is_ok();
            drop(_permit);
            let _ = tx.send(Msg::Bound {
                key,
                result,
                conflict,
            });
            if ok {
                tracing::debug!(pod = %name, namespace = %ns, node = %node, "bound");
                let msg = format!("Successfully assigned {ns}/{name} to {node}");
                events.event(&*pod, NORMAL, "Scheduled", msg);
            }
        });
    }

    fn report_unschedulable(&self, pod: &Arc<Pod>, message: String) {
        let client = self.client.clone();
        let pod = pod.clone();
        self.events
            .event(&*pod, WARNING, "FailedScheduling", message.clone());
        tokio::spawn(async move {
            let already = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                            && c.message.as_deref() == Some(message.as_str())
                    })
                });
            if already {
                return;
            }
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let patch = serde_json::json!({"status": {"conditions": [{
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastProbeTime": null,
                "lastTransitionTime": Time(Timestamp::now()),
            }]}});
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
                .await
            {
                tracing::warn!(pod = %name, namespace = %ns, error = %e, "could not write the PodScheduled condition");
            }
        });
    }
}

fn placeholder(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feasible_nodes_to_find_is_adaptive() {
        assert_eq!(Scheduler::feasible_to_find(3), 3);
        assert_eq!(
            Scheduler::feasible_to_find(100),
            100,
            "50% of 100, floor 100"
        );
        assert_eq!(Scheduler::feasible_to_find(1000), 420, "(50 - 8)% of 1000");
        assert_eq!(Scheduler::feasible_to_find(10_000), 500, "5% floor");
    }
}
