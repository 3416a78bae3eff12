//! ReplicaSet (and ReplicationController) controller: keeps `spec.replicas` pods that match the selector, adopts orphans
//! and releases pods that stop matching, creates in slow-start batches, deletes the least
//! valuable pods first, and reports replicas / ready / available / observedGeneration.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec, ReplicaSetStatus};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::events::{NORMAL, Recorder, WARNING, api_message};
use crate::informer::Informer;
use crate::queue::Queue;
use crate::util::{self, controller_ref, deleting, is_active, key, selector_matches, split_key};
use crate::{ControllerError, Ctx};

/// Most pods created in one sync (as upstream's burst replicas).
const BURST: usize = 500;
/// How long unobserved creations/deletions hold back the next sync.
const EXPECTATION_TTL: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Expect {
    adds: HashSet<String>,
    dels: HashSet<String>,
    at: Option<Instant>,
}

/// The kind a pass manages: ReplicaSets, or ReplicationControllers seen as ReplicaSets (their
/// map selector becomes `matchLabels`), as upstream runs one controller for both.
#[derive(Clone)]
enum Source {
    ReplicaSets(Arc<Informer<ReplicaSet>>),
    ReplicationControllers(Arc<Informer<ReplicationController>>),
}

impl Source {
    fn kind(&self) -> &'static str {
        match self {
            Source::ReplicaSets(_) => "ReplicaSet",
            Source::ReplicationControllers(_) => "ReplicationController",
        }
    }

    fn api_version(&self) -> &'static str {
        match self {
            Source::ReplicaSets(_) => "apps/v1",
            Source::ReplicationControllers(_) => "v1",
        }
    }

    /// The object `ns/name` as a ReplicaSet.
    fn get(&self, ns: &str, name: &str) -> Option<Arc<ReplicaSet>> {
        match self {
            Source::ReplicaSets(i) => i.get(ns, name),
            Source::ReplicationControllers(i) => i.get(ns, name).map(|rc| Arc::new(rc_as_rs(&rc))),
        }
    }

    /// Every object of namespace `ns` (all namespaces when None) as ReplicaSets.
    fn all(&self, ns: Option<&str>) -> Vec<Arc<ReplicaSet>> {
        let keep = |m: &ObjectMeta| ns.is_none() || m.namespace.as_deref() == ns;
        match self {
            Source::ReplicaSets(i) => i
                .store
                .state()
                .into_iter()
                .filter(|r| keep(&r.metadata))
                .collect(),
            Source::ReplicationControllers(i) => i
                .store
                .state()
                .into_iter()
                .filter(|r| keep(&r.metadata))
                .map(|rc| Arc::new(rc_as_rs(&rc)))
                .collect(),
        }
    }

    /// The Event recorder of this kind (component names as kube-controller-manager's).
    fn recorder(&self, ctx: &Ctx) -> Recorder {
        ctx.events.component(match self {
            Source::ReplicaSets(_) => "replicaset-controller",
            Source::ReplicationControllers(_) => "replication-controller",
        })
    }

    /// The reference Events name for `rs` (a ReplicationController keeps its own kind).
    fn reference(&self, rs: &ReplicaSet) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.api_version().into()),
            kind: Some(self.kind().into()),
            ..crate::events::reference(rs)
        }
    }

    async fn patch_status(
        &self,
        ctx: &Ctx,
        ns: &str,
        name: &str,
        status: serde_json::Value,
    ) -> kube::Result<()> {
        let pp = PatchParams::default();
        let patch = Patch::Merge(json!({"status": status}));
        match self {
            Source::ReplicaSets(_) => {
                Api::<ReplicaSet>::namespaced(ctx.client.clone(), ns)
                    .patch_status(name, &pp, &patch)
                    .await?;
            }
            Source::ReplicationControllers(_) => {
                Api::<ReplicationController>::namespaced(ctx.client.clone(), ns)
                    .patch_status(name, &pp, &patch)
                    .await?;
            }
        }
        Ok(())
    }
}

/// A ReplicationController as the ReplicaSet it is equivalent to. An empty selector means the
/// template's labels (the v1 defaulting rule).
fn rc_as_rs(rc: &ReplicationController) -> ReplicaSet {
    let spec = rc.spec.clone().unwrap_or_default();
    let tmpl_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone());
    let selector = spec.selector.filter(|s| !s.is_empty()).or(tmpl_labels);
    let status = rc.status.as_ref();
    ReplicaSet {
        metadata: rc.metadata.clone(),
        spec: Some(ReplicaSetSpec {
            replicas: spec.replicas,
            min_ready_seconds: spec.min_ready_seconds,
            selector: LabelSelector {
                match_labels: selector,
                match_expressions: None,
            },
            template: spec.template,
        }),
        status: status.map(|s| ReplicaSetStatus {
            replicas: s.replicas,
            fully_labeled_replicas: s.fully_labeled_replicas,
            ready_replicas: s.ready_replicas,
            available_replicas: s.available_replicas,
            observed_generation: s.observed_generation,
            ..Default::default()
        }),
    }
}

/// Runs the ReplicaSet and ReplicationController controllers until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let a = run_kind(ctx.clone(), Source::ReplicaSets(ctx.replicasets.clone()));
    let b = run_kind(ctx.clone(), Source::ReplicationControllers(ctx.rcs.clone()));
    futures::future::join(a, b).await;
}

async fn run_kind(ctx: Arc<Ctx>, src: Source) {
    let queue = Queue::default();
    let keys = {
        let src = src.clone();
        move || {
            src.all(None)
                .iter()
                .map(|r| key(&r.metadata))
                .collect::<Vec<_>>()
        }
    };
    match &src {
        Source::ReplicaSets(i) => {
            crate::informer::feed(
                i,
                queue.clone(),
                |rs: &ReplicaSet| vec![key(&rs.metadata)],
                keys.clone(),
            );
        }
        Source::ReplicationControllers(i) => {
            crate::informer::feed(
                i,
                queue.clone(),
                |rc: &ReplicationController| vec![key(&rc.metadata)],
                keys.clone(),
            );
        }
    }
    let src2 = src.clone();
    crate::informer::feed(
        &ctx.pods,
        queue.clone(),
        move |p: &Pod| owners_of(&src2, p),
        keys.clone(),
    );
    for k in keys() {
        queue.add(k);
    }
    let exp: Arc<Mutex<HashMap<String, Expect>>> = Arc::default();
    let name = if matches!(src, Source::ReplicaSets(_)) {
        "replicaset"
    } else {
        "replicationcontroller"
    };
    queue
        .work(name, |k| sync(ctx.clone(), src.clone(), exp.clone(), k))
        .await;
}

/// The controllers a pod event concerns: its controller, or (for orphans) every controller in
/// its namespace whose selector matches.
fn owners_of(src: &Source, pod: &Pod) -> Vec<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("");
    if let Some(r) = controller_ref(&pod.metadata) {
        if r.kind == src.kind() {
            return vec![format!("{ns}/{}", r.name)];
        }
        return vec![];
    }
    src.all(Some(ns))
        .iter()
        .filter(|rs| {
            let sel = rs
                .spec
                .as_ref()
                .map(|s| s.selector.clone())
                .unwrap_or_default();
            !util::selector_is_empty(&sel) && selector_matches(&sel, pod.metadata.labels.as_ref())
        })
        .map(|rs| key(&rs.metadata))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn sync(
    ctx: Arc<Ctx>,
    src: Source,
    exp: Arc<Mutex<HashMap<String, Expect>>>,
    k: String,
) -> Result<Option<Duration>, ControllerError> {
    let (ns, name) = split_key(&k);
    let Some(rs) = src.get(ns, name) else {
        lock(&exp).remove(&k);
        return Ok(None);
    };
    let Some(spec) = rs.spec.as_ref() else {
        return Ok(None);
    };
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let owner = util::owner_ref(src.api_version(), src.kind(), &rs.metadata);
    let mut owned: Vec<Arc<Pod>> = Vec::new();
    for p in ctx.pods.in_namespace(ns) {
        let matches = !util::selector_is_empty(&spec.selector)
            && selector_matches(&spec.selector, p.metadata.labels.as_ref());
        match controller_ref(&p.metadata) {
            Some(r) if r.uid == uid => {
                if matches || deleting(&rs.metadata) {
                    owned.push(p);
                } else {
                    release(&pods_api, &p.metadata, &uid).await?;
                }
            }
            Some(_) => {}
            None => {
                if matches && !deleting(&p.metadata) && !deleting(&rs.metadata) {
                    adopt(&pods_api, &p.metadata, &owner).await?;
                    owned.push(p);
                }
            }
        }
    }
    let active: Vec<Arc<Pod>> = owned.iter().filter(|p| is_active(p)).cloned().collect();
    let want = usize::try_from(spec.replicas.unwrap_or(1).max(0)).unwrap_or(0);

    // Expectations: do not act again until the last creations/deletions are observed.
    let satisfied = {
        let mut e = lock(&exp);
        let entry = e.entry(k.clone()).or_default();
        let present: HashSet<&str> = owned
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        entry.adds.retain(|n| !present.contains(n.as_str()));
        entry.dels.retain(|n| {
            owned
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(n) && !deleting(&p.metadata))
        });
        let fresh = entry.at.is_some_and(|t| t.elapsed() < EXPECTATION_TTL);
        (entry.adds.is_empty() && entry.dels.is_empty()) || !fresh
    };

    let mut manage_err = None;
    if satisfied && !deleting(&rs.metadata) {
        if active.len() < want {
            let n = (want - active.len()).min(BURST);
            let (created, err) = create_pods(&pods_api, &rs, &owner, n).await;
            let rec = src.recorder(&ctx);
            for pname in &created {
                rec.event_ref(
                    src.reference(&rs),
                    NORMAL,
                    "SuccessfulCreate",
                    format!("Created pod: {pname}"),
                );
            }
            if let Some(e) = &err {
                rec.event_ref(
                    src.reference(&rs),
                    WARNING,
                    "FailedCreate",
                    format!("Error creating: {}", api_message(e)),
                );
            }
            let mut e = lock(&exp);
            let entry = e.entry(k.clone()).or_default();
            entry.adds = created.into_iter().collect();
            entry.dels.clear();
            entry.at = Some(Instant::now());
            manage_err = err;
        } else if active.len() > want {
            let mut victims = active.clone();
            victims.sort_by_key(|p| delete_rank(p));
            victims.truncate(active.len() - want);
            let mut dels = HashSet::new();
            for v in &victims {
                let pname = v.metadata.name.clone().unwrap_or_default();
                let rec = src.recorder(&ctx);
                match pods_api.delete(&pname, &DeleteParams::default()).await {
                    Ok(_) => {
                        rec.event_ref(
                            src.reference(&rs),
                            NORMAL,
                            "SuccessfulDelete",
                            format!("Deleted pod: {pname}"),
                        );
                        dels.insert(pname);
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        let e = ControllerError::from(e);
                        rec.event_ref(
                            src.reference(&rs),
                            WARNING,
                            "FailedDelete",
                            format!("Error deleting: {}", api_message(&e)),
                        );
                        manage_err = Some(e);
                        break;
                    }
                }
            }
            let mut e = lock(&exp);
            let entry = e.entry(k.clone()).or_default();
            entry.adds.clear();
            entry.dels = dels;
            entry.at = Some(Instant::now());
        }
    }

    // Status.
    let now = Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let mut ready = 0;
    let mut avail = 0;
    let mut labeled = 0;
    let mut requeue: Option<Duration> = None;
    for p in &active {
        if util::is_ready(p) {
            ready += 1;
        }
        match util::available(p, min_ready, now) {
            Ok(true) => avail += 1,
            Ok(false) => {}
            Err(wait) => requeue = Some(requeue.map_or(wait, |r| r.min(wait))),
        }
        let l = p.metadata.labels.clone().unwrap_or_default();
        if template_labels.iter().all(|(k, v)| l.get(k) == Some(v)) {
            labeled += 1;
        }
    }
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": labeled,
        "readyReplicas": ready,
        "availableReplicas": avail,
        "observedGeneration": rs.metadata.generation.unwrap_or(0),
    });
    let cur = rs.status.as_ref();
    let same = cur.is_some_and(|s| {
        usize::try_from(s.replicas).ok() == Some(active.len())
            && s.fully_labeled_replicas.unwrap_or(0) == labeled
            && s.ready_replicas.unwrap_or(0) == ready
            && s.available_replicas.unwrap_or(0) == avail
            && s.observed_generation.unwrap_or(0) == rs.metadata.generation.unwrap_or(0)
    });
    if !same {
        match src.patch_status(&ctx, ns, name, status).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(e) = manage_err {
        return Err(e);
    }
    Ok(requeue)
}

/// Lower ranks are deleted first: unscheduled, then pending, then not ready, then the
/// youngest.
fn delete_rank(p: &Pod) -> (u8, u8, u8, std::cmp::Reverse<i64>) {
    let assigned = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let phase = match util::phase(p) {
        "Pending" | "" => 0,
        "Unknown" => 1,
        _ => 2,
    };
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(0);
    (
        u8::from(assigned),
        phase,
        u8::from(util::is_ready(p)),
        std::cmp::Reverse(created),
    )
}

async fn create_pods(
    api: &Api<Pod>,
    rs: &ReplicaSet,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    n: usize,
) -> (Vec<String>, Option<ControllerError>) {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    let pod = Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", rs.metadata.name.as_deref().unwrap_or("pod"))),
            namespace: rs.metadata.namespace.clone(),
            labels: tmeta.labels,
            annotations: tmeta.annotations,
            finalizers: tmeta.finalizers,
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    };
    let pp = PostParams::default();
    let mut created = Vec::new();
    let mut batch = 1;
    let mut left = n;
    while left > 0 {
        let size = batch.min(left);
        let results = futures::future::join_all((0..size).map(|_| api.create(&pp, &pod))).await;
        let mut err = None;
        for r in results {
            match r {
                Ok(p) => created.push(p.metadata.name.unwrap_or_default()),
                Err(e) => err = Some(ControllerError::from(e)),
            }
        }
        if let Some(e) = err {
            return (created, Some(e));
        }
        left -= size;
        batch *= 2;
    }
    (created, None)
}

async fn adopt(
    api: &Api<Pod>,
    meta: &ObjectMeta,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Result<(), ControllerError> {
    let mut refs = meta.owner_references.clone().unwrap_or_default();
    refs.push(owner.clone());
    let patch =
        json!({"metadata": {"ownerReferences": refs, "resourceVersion": meta.resource_version}});
    patch_meta(api, meta, patch).await
}

async fn release(api: &Api<Pod>, meta: &ObjectMeta, uid: &str) -> Result<(), ControllerError> {
    let refs: Vec<_> = meta
        .owner_references
        .iter()
        .flatten()
        .filter(|r| r.uid != uid)
        .cloned()
        .collect();
    let patch =
        json!({"metadata": {"ownerReferences": refs, "resourceVersion": meta.resource_version}});
    patch_meta(api, meta, patch).await
}

async fn patch_meta(
    api: &Api<Pod>,
    meta: &ObjectMeta,
    patch: serde_json::Value,
) -> Result<(), ControllerError> {
    let name = meta.name.as_deref().unwrap_or("");
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
