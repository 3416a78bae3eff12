//! Deployment controller: finds or creates the ReplicaSet of the current pod template (named by
//! its pod-template-hash), rolls from old ReplicaSets to it (RollingUpdate with maxSurge /
//! maxUnavailable, or Recreate), numbers revisions, prunes history, honours pause, and writes the
//! status and the Available / Progressing conditions that `kubectl rollout status` reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::events::NORMAL;
use crate::queue::Queue;
use crate::util::{controller_ref, deleting, key, selector_matches, split_key};
use crate::{ControllerError, Ctx};

/// The Event source of this controller (as kube-controller-manager names it).
const COMPONENT: &str = "deployment-controller";

/// Annotation holding the revision number on Deployments and their ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Label that makes each ReplicaSet's pods distinct.
pub const HASH_LABEL: &str = "pod-template-hash";
const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

/// Replica counts written to ReplicaSets and not yet seen in the cache, per Deployment.
type Pending = Arc<Mutex<HashMap<String, (Vec<(String, i32)>, Instant)>>>;

/// Runs the controller until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let queue = Queue::default();
    let all = {
        let d = ctx.deployments.clone();
        move || d.store.state().iter().map(|x| key(&x.metadata)).collect()
    };
    crate::informer::feed(
        &ctx.deployments,
        queue.clone(),
        |d: &Deployment| vec![key(&d.metadata)],
        all.clone(),
    );
    let c2 = ctx.clone();
    crate::informer::feed(
        &ctx.replicasets,
        queue.clone(),
        move |rs: &ReplicaSet| deployments_of_rs(&c2, rs),
        all.clone(),
    );
    let c3 = ctx.clone();
    crate::informer::feed(
        &ctx.pods,
        queue.clone(),
        move |p: &Pod| {
            // Only Recreate waits on pods; an old pod going away may unblock it.
            let Some(r) = controller_ref(&p.metadata) else {
                return vec![];
            };
            let ns = p.metadata.namespace.as_deref().unwrap_or("");
            if r.kind != "ReplicaSet" || !deleting(&p.metadata) && crate::util::is_active(p) {
                return vec![];
            }
            c3.replicasets
                .get(ns, &r.name)
                .map(|rs| deployments_of_rs(&c3, &rs))
                .unwrap_or_default()
        },
        all,
    );
    for d in ctx.deployments.store.state() {
        queue.add(key(&d.metadata));
    }
    let pending: Pending = Arc::default();
    queue
        .work("deployment", |k| sync(ctx.clone(), pending.clone(), k))
        .await;
}

fn deployments_of_rs(ctx: &Ctx, rs: &ReplicaSet) -> Vec<String> {
    let ns = rs.metadata.namespace.as_deref().unwrap_or("");
    if let Some(r) = controller_ref(&rs.metadata) {
        return if r.kind == "Deployment" {
            vec![format!("{ns}/{}", r.name)]
        } else {
            vec![]
        };
    }
    let labels = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone());
    ctx.deployments
        .in_namespace(ns)
        .iter()
        .filter(|d| {
            d.spec
                .as_ref()
                .is_some_and(|s| selector_matches(&s.selector, labels.as_ref()))
        })
        .map(|d| key(&d.metadata))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// fnv-1a 32 of `data`.
fn fnv32a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The pod-template-hash of a template (and the collision count), in the vowel-free alphabet
/// Kubernetes uses for generated names.
pub fn template_hash(t: &PodTemplateSpec, collision: i32) -> String {
    let mut data = serde_json::to_vec(t).unwrap_or_default();
    if collision > 0 {
        data.extend_from_slice(collision.to_string().as_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let digits = fnv32a(&data).to_string();
    digits
        .bytes()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()] as char)
        .collect()
}

/// The template without the hash label, for comparisons.
fn strip_hash(t: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = t.clone();
    if let Some(m) = t.metadata.as_mut() {
        if let Some(l) = m.labels.as_mut() {
            l.remove(HASH_LABEL);
            if l.is_empty() {
                m.labels = None;
            }
        }
        if m == &ObjectMeta::default() {
            t.metadata = None;
        }
    }
    t
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status
        .as_ref()
        .map(|s| {
            (
                s.replicas,
                s.ready_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0),
            )
        })
        .unwrap_or((0, 0, 0))
}

pub(crate) fn resolve(v: Option<&IntOrString>, total: i32, round_up: bool, default: &str) -> i32 {
    match v {
        Some(IntOrString::Int(i)) => *i,
        Some(IntOrString::String(s)) => pct(s, total, round_up),
        None => pct(default, total, round_up),
    }
}

fn pct(s: &str, total: i32, round_up: bool) -> i32 {
    let Some(n) = s.strip_suffix('%').and_then(|n| n.parse::<i64>().ok()) else {
        return s.parse().unwrap_or(0);
    };
    let prod = n * i64::from(total);
    let v = if round_up {
        (prod + 99) / 100
    } else {
        prod / 100
    };
    i32::try_from(v).unwrap_or(0)
}

/// (maxSurge, maxUnavailable) for the deployment.
fn surge_unavailable(d: &Deployment, desired: i32) -> (i32, i32) {
    let strat = d.spec.as_ref().and_then(|s| s.strategy.as_ref());
    if strat.and_then(|s| s.type_.as_deref()) == Some("Recreate") {
        return (0, 0);
    }
    let ru = strat.and_then(|s| s.rolling_update.as_ref());
    let surge = resolve(ru.and_then(|r| r.max_surge.as_ref()), desired, true, "25%");
    let mut unavail = resolve(
        ru.and_then(|r| r.max_unavailable.as_ref()),
        desired,
        false,
        "25%",
    );
    if surge == 0 && unavail == 0 {
        unavail = 1;
    }
    (surge, unavail.min(desired))
}

struct Sync<'a> {
    ctx: &'a Ctx,
    d: &'a Deployment,
    ns: &'a str,
    rs_api: Api<ReplicaSet>,
    written: Vec<(String, i32)>,
}

impl Sync<'_> {
    async fn scale(&mut self, rs: &ReplicaSet, n: i32) -> Result<(), ControllerError> {
        if spec_replicas(rs) == n {
            return Ok(());
        }
        let name = rs.metadata.name.clone().unwrap_or_default();
        let patch = json!({
            "metadata": {"annotations": {"deployment.kubernetes.io/desired-replicas": n.to_string()}},
            "spec": {"replicas": n},
        });
        self.rs_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        let from = spec_replicas(rs);
        let op = if from < n { "up" } else { "down" };
        self.ctx.events.component(COMPONENT).event(
            self.d,
            NORMAL,
            "ScalingReplicaSet",
            format!("Scaled {op} replica set {name} from {from} to {n}"),
        );
        self.written.push((name, n));
        Ok(())
    }

    /// Whether pods of `olds` are still present (Recreate waits for them).
    fn old_pods_exist(&self, olds: &[Arc<ReplicaSet>]) -> bool {
        let uids: Vec<&str> = olds
            .iter()
            .filter_map(|r| r.metadata.uid.as_deref())
            .collect();
        self.ctx.pods.in_namespace(self.ns).iter().any(|p| {
            controller_ref(&p.metadata).is_some_and(|r| uids.contains(&r.uid.as_str()))
                && !matches!(crate::util::phase(p), "Succeeded" | "Failed")
        })
    }
}

async fn sync(
    ctx: Arc<Ctx>,
    pending: Pending,
    k: String,
) -> Result<Option<Duration>, ControllerError> {
    let (ns, name) = split_key(&k);
    let Some(d) = ctx.deployments.get(ns, name) else {
        lock(&pending).remove(&k);
        return Ok(None);
    };
    let Some(spec) = d.spec.as_ref() else {
        return Ok(None);
    };
    if deleting(&d.metadata) {
        return Ok(None);
    }
    // Wait until our last ReplicaSet writes are visible in the cache.
    {
        let mut p = lock(&pending);
        if let Some((writes, at)) = p.get(&k) {
            let seen = writes.iter().all(|(n, r)| {
                ctx.replicasets
                    .get(ns, n)
                    .is_none_or(|rs| spec_replicas(&rs) == *r)
            });
            if !seen && at.elapsed() < Duration::from_secs(10) {
                return Ok(Some(Duration::from_millis(100)));
            }
            p.remove(&k);
        }
    }
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let rs_api = Api::<ReplicaSet>::namespaced(ctx.client.clone(), ns);
    let owner = crate::util::owner_ref("apps/v1", "Deployment", &d.metadata);

    // Claim ReplicaSets.
    let mut rss: Vec<Arc<ReplicaSet>> = Vec::new();
    for rs in ctx.replicasets.in_namespace(ns) {
        let labels = rs.metadata.labels.clone();
        let matches = selector_matches(&spec.selector, labels.as_ref());
        match controller_ref(&rs.metadata) {
            Some(r) if r.uid == uid => {
                if matches {
                    rss.push(rs);
                } else {
                    let refs: Vec<_> = rs
                        .metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .filter(|r| r.uid != uid)
                        .cloned()
                        .collect();
                    let _ = rs_api
                        .patch(
                            rs.metadata.name.as_deref().unwrap_or(""),
                            &PatchParams::default(),
                            &Patch::Merge(json!({"metadata": {"ownerReferences": refs}})),
                        )
                        .await;
                }
            }
            Some(_) => {}
            None if matches && !deleting(&rs.metadata) => {
                let mut refs = rs.metadata.owner_references.clone().unwrap_or_default();
                refs.push(owner.clone());
                rs_api
                    .patch(
                        rs.metadata.name.as_deref().unwrap_or(""),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"ownerReferences": refs,
                            "resourceVersion": rs.metadata.resource_version}})),
                    )
                    .await?;
                rss.push(rs);
            }
            None => {}
        }
    }
    rss.sort_by_key(|r| {
        (
            r.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(0),
            r.metadata.name.clone(),
        )
    });

    let template = spec.template.clone();
    let desired = spec.replicas.unwrap_or(1).max(0);
    let paused = spec.paused.unwrap_or(false);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let mut new_rs = rss
        .iter()
        .find(|r| {
            r.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| strip_hash(t) == strip_hash(&template))
        })
        .cloned();
    let mut olds: Vec<Arc<ReplicaSet>> = rss
        .iter()
        .filter(|r| {
            new_rs
                .as_ref()
                .is_none_or(|n| n.metadata.uid != r.metadata.uid)
        })
        .cloned()
        .collect();
    let max_old_rev = olds.iter().map(|r| revision(r)).max().unwrap_or(0);
    let mut s = Sync {
        ctx: &ctx,
        d: &d,
        ns,
        rs_api: rs_api.clone(),
        written: Vec::new(),
    };
    let mut collision = d
        .status
        .as_ref()
        .and_then(|s| s.collision_count)
        .unwrap_or(0);
    let mut created_new = false;
    let (surge, unavail) = surge_unavailable(&d, desired);

    // Revision bookkeeping for an existing new ReplicaSet (rollback makes an old one new).
    if let Some(n) = &new_rs
        && !paused
    {
        let want_rev = if revision(n) <= max_old_rev {
            max_old_rev + 1
        } else {
            revision(n)
        };
        let cause = d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CHANGE_CAUSE));
        let rs_cause = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CHANGE_CAUSE));
        if want_rev != revision(n) || (cause.is_some() && cause != rs_cause) {
            let mut ann = serde_json::Map::new();
            ann.insert(REVISION.into(), json!(want_rev.to_string()));
            if let Some(c) = cause {
                ann.insert(CHANGE_CAUSE.into(), json!(c));
            }
            let updated = rs_api
                .patch(
                    n.metadata.name.as_deref().unwrap_or(""),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": ann}})),
                )
                .await?;
            new_rs = Some(Arc::new(updated));
        }
    }

    if !paused {
        if recreate {
            let mut scaled = false;
            for o in &olds {
                if spec_replicas(o) > 0 {
                    s.scale(o, 0).await?;
                    scaled = true;
                }
            }
            if !scaled && !s.old_pods_exist(&olds) {
                match &new_rs {
                    None => {
                        let (rs, c) =
                            create_new_rs(&ctx, &d, &owner, desired, max_old_rev, collision)
                                .await?;
                        collision = c;
                        created_new = true;
                        new_rs = Some(rs);
                    }
                    Some(n) => s.scale(n, desired).await?,
                }
            }
        } else {
            // Scale up the new ReplicaSet within maxSurge.
            let old_total: i32 = olds.iter().map(|r| spec_replicas(r)).sum();
            match &new_rs {
                None => {
                    let start = (desired + surge - old_total).clamp(0, desired);
                    let (rs, c) =
                        create_new_rs(&ctx, &d, &owner, start, max_old_rev, collision).await?;
                    collision = c;
                    created_new = true;
                    new_rs = Some(rs);
                }
                Some(n) => {
                    let cur = spec_replicas(n);
                    if old_total == 0 || cur > desired {
                        s.scale(n, desired).await?;
                    } else {
                        let total = old_total + cur;
                        let room = desired + surge - total;
                        if room > 0 {
                            s.scale(n, cur + room.min(desired - cur)).await?;
                        }
                    }
                }
            }
            // Scale down old ReplicaSets within maxUnavailable.
            if let Some(n) = new_rs.clone() {
                scale_down_olds(&mut s, &n, &mut olds, desired, unavail).await?;
            }
        }
    } else if let Some(n) = &new_rs {
        // Paused: only follow replica changes when nothing is rolling.
        let old_total: i32 = olds.iter().map(|r| spec_replicas(r)).sum();
        if old_total == 0 {
            s.scale(n, desired).await?;
        }
    }
    let written = std::mem::take(&mut s.written);
    if !written.is_empty() {
        lock(&pending).insert(k.clone(), (written, Instant::now()));
    }

    // Prune history.
    let limit = usize::try_from(spec.revision_history_limit.unwrap_or(10).max(0)).unwrap_or(10);
    let mut dead: Vec<&Arc<ReplicaSet>> = olds
        .iter()
        .filter(|r| spec_replicas(r) == 0 && status_of(r).0 == 0 && !deleting(&r.metadata))
        .collect();
    if dead.len() > limit {
        dead.sort_by_key(|r| revision(r));
        for r in &dead[..dead.len() - limit] {
            let _ = rs_api
                .delete(
                    r.metadata.name.as_deref().unwrap_or(""),
                    &DeleteParams::background(),
                )
                .await;
        }
    }

    // Revision annotation on the Deployment.
    if let Some(n) = &new_rs {
        let rev = revision(n).to_string();
        let cur = d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISION));
        if cur != Some(&rev) && revision(n) > 0 {
            Api::<Deployment>::namespaced(ctx.client.clone(), ns)
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {REVISION: rev}}})),
                )
                .await?;
        }
    }

    update_status(
        &ctx,
        &d,
        new_rs.as_deref(),
        &rss,
        collision,
        created_new,
        unavail,
    )
    .await
}

async fn scale_down_olds(
    s: &mut Sync<'_>,
    new_rs: &ReplicaSet,
    olds: &mut [Arc<ReplicaSet>],
    desired: i32,
    unavail: i32,
) -> Result<(), ControllerError> {
    let old_total: i32 = olds.iter().map(|r| spec_replicas(r)).sum();
    if old_total == 0 {
        return Ok(());
    }
    let new_spec = s
        .written
        .iter()
        .find(|(n, _)| Some(n) == new_rs.metadata.name.as_ref())
        .map(|(_, r)| *r)
        .unwrap_or_else(|| spec_replicas(new_rs));
    let all = old_total + new_spec;
    let min_available = desired - unavail;
    let new_unavailable = new_spec - status_of(new_rs).2;
    let mut budget = all - min_available - new_unavailable;
    if budget <= 0 {
        return Ok(());
    }
    // First the old replicas that are not available anyway.
    for o in olds.iter() {
        if budget <= 0 {
            break;
        }
        let unhealthy = spec_replicas(o) - status_of(o).2;
        if unhealthy > 0 {
            let n = unhealthy.min(budget);
            s.scale(o, spec_replicas(o) - n).await?;
            budget -= n;
        }
    }
    // Then available ones, oldest first, keeping minAvailable.
    let mut available: i32 = olds.iter().map(|r| status_of(r).2).sum::<i32>() + status_of(new_rs).2;
    let mut scaled: HashMap<String, i32> = s.written.iter().cloned().collect();
    for o in olds.iter() {
        let name = o.metadata.name.clone().unwrap_or_default();
        let cur = scaled
            .get(&name)
            .copied()
            .unwrap_or_else(|| spec_replicas(o));
        let can = (available - min_available).min(cur);
        if can <= 0 {
            break;
        }
        s.scale(o, cur - can).await?;
        scaled.insert(name, cur - can);
        available -= can;
    }
    Ok(())
}

async fn create_new_rs(
    ctx: &Ctx,
    d: &Deployment,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    replicas: i32,
    max_old_rev: i64,
    mut collision: i32,
) -> Result<(Arc<ReplicaSet>, i32), ControllerError> {
    let ns = d.metadata.namespace.as_deref().unwrap_or("");
    let dname = d.metadata.name.as_deref().unwrap_or("");
    let spec = d
        .spec
        .as_ref()
        .ok_or_else(|| ControllerError::Invalid(format!("deployment {ns}/{dname} has no spec")))?;
    let api = Api::<ReplicaSet>::namespaced(ctx.client.clone(), ns);
    for _ in 0..5 {
        let hash = template_hash(&spec.template, collision);
        let mut template = spec.template.clone();
        let tm = template.metadata.get_or_insert_with(Default::default);
        tm.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut ann: BTreeMap<String, String> = BTreeMap::new();
        ann.insert(REVISION.into(), (max_old_rev + 1).to_string());
        ann.insert(
            "deployment.kubernetes.io/desired-replicas".into(),
            spec.replicas.unwrap_or(1).to_string(),
        );
        if let Some(c) = d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CHANGE_CAUSE))
        {
            ann.insert(CHANGE_CAUSE.into(), c.clone());
        }
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(format!("{dname}-{hash}")),
                namespace: Some(ns.into()),
                labels: tm.labels.clone(),
                annotations: Some(ann),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(replicas),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(template),
            }),
            status: None,
        };
        match api.create(&PostParams::default(), &rs).await {
            Ok(r) => {
                if replicas > 0 {
                    ctx.events.component(COMPONENT).event(
                        d,
                        NORMAL,
                        "ScalingReplicaSet",
                        format!(
                            "Scaled up replica set {} from 0 to {replicas}",
                            r.metadata.name.as_deref().unwrap_or("")
                        ),
                    );
                }
                return Ok((Arc::new(r), collision));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = api.get(&format!("{dname}-{hash}")).await?;
                let same = existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| strip_hash(t) == strip_hash(&spec.template));
                let ours = controller_ref(&existing.metadata)
                    .is_some_and(|r| Some(&r.uid) == d.metadata.uid.as_ref());
                if same && ours {
                    return Ok((Arc::new(existing), collision));
                }
                collision += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ControllerError::Invalid(format!(
        "deployment {ns}/{dname}: replica set names keep colliding"
    )))
}

fn cond<'a>(d: &'a Deployment, t: &str) -> Option<&'a DeploymentCondition> {
    d.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
}

fn new_cond(
    old: Option<&DeploymentCondition>,
    t: &str,
    status: &str,
    reason: &str,
    message: String,
    now: &Time,
    touch: bool,
) -> DeploymentCondition {
    let same_status = old.is_some_and(|o| o.status == status);
    let unchanged = same_status && old.is_some_and(|o| o.reason.as_deref() == Some(reason));
    DeploymentCondition {
        type_: t.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: if same_status {
            old.and_then(|o| o.last_transition_time.clone())
                .or(Some(now.clone()))
        } else {
            Some(now.clone())
        },
        last_update_time: if unchanged && !touch {
            old.and_then(|o| o.last_update_time.clone())
                .or(Some(now.clone()))
        } else {
            Some(now.clone())
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn update_status(
    ctx: &Ctx,
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    rss: &[Arc<ReplicaSet>],
    collision: i32,
    created_new: bool,
    unavail: i32,
) -> Result<Option<Duration>, ControllerError> {
    let ns = d.metadata.namespace.as_deref().unwrap_or("");
    let name = d.metadata.name.as_deref().unwrap_or("");
    let spec = d.spec.as_ref();
    let desired = spec.and_then(|s| s.replicas).unwrap_or(1).max(0);
    let paused = spec.and_then(|s| s.paused).unwrap_or(false);
    let mut all: Vec<&ReplicaSet> = rss.iter().map(|r| r.as_ref()).collect();
    if let Some(n) = new_rs
        && !all.iter().any(|r| r.metadata.uid == n.metadata.uid)
    {
        all.push(n);
    }
    let replicas: i32 = all.iter().map(|r| status_of(r).0).sum();
    let ready: i32 = all.iter().map(|r| status_of(r).1).sum();
    let available: i32 = all.iter().map(|r| status_of(r).2).sum();
    let spec_total: i32 = all.iter().map(|r| spec_replicas(r)).sum();
    let updated = new_rs.map(|n| status_of(n).0).unwrap_or(0);
    let new_name = new_rs
        .and_then(|n| n.metadata.name.clone())
        .unwrap_or_default();
    let now = Time(Timestamp::now());

    let avail_cond = if available >= desired - unavail {
        new_cond(
            cond(d, "Available"),
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            &now,
            false,
        )
    } else {
        new_cond(
            cond(d, "Available"),
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            &now,
            false,
        )
    };
    let old_p = cond(d, "Progressing");
    let old_status = d.status.clone().unwrap_or_default();
    let complete = updated == desired
        && replicas == desired
        && available == desired
        && new_rs.is_some_and(|n| spec_replicas(n) == desired);
    let progressed = old_status.updated_replicas.unwrap_or(0) != updated
        || old_status.ready_replicas.unwrap_or(0) != ready
        || old_status.available_replicas.unwrap_or(0) != available
        || old_status.replicas.unwrap_or(0) != replicas;
    let deadline = spec.and_then(|s| s.progress_deadline_seconds);
    let mut requeue = None;
    let prog = if paused {
        new_cond(
            old_p,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".into(),
            &now,
            false,
        )
    } else if old_p.and_then(|c| c.reason.as_deref()) == Some("DeploymentPaused") {
        new_cond(
            old_p,
            "Progressing",
            "Unknown",
            "DeploymentResumed",
            "Deployment is resumed".into(),
            &now,
            true,
        )
    } else if complete {
        new_cond(
            old_p,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            &now,
            false,
        )
    } else if created_new {
        new_cond(
            old_p,
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            format!("Created new replica set \"{new_name}\""),
            &now,
            true,
        )
    } else if progressed || old_p.is_none() {
        new_cond(
            old_p,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{new_name}\" is progressing."),
            &now,
            true,
        )
    } else {
        let last = old_p
            .and_then(|c| c.last_update_time.as_ref())
            .map(|t| t.0.as_second())
            .unwrap_or_else(|| now.0.as_second());
        match deadline {
            Some(dl)
                if now.0.as_second() - last >= i64::from(dl)
                    && old_p.is_some_and(|c| c.status == "True") =>
            {
                new_cond(
                    old_p,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                    &now,
                    true,
                )
            }
            Some(dl) => {
                if old_p.is_some_and(|c| c.status == "True") {
                    let left = (i64::from(dl) - (now.0.as_second() - last)).max(1);
                    requeue = Some(Duration::from_secs(left as u64));
                }
                old_p.cloned().unwrap_or_else(|| {
                    new_cond(
                        None,
                        "Progressing",
                        "True",
                        "ReplicaSetUpdated",
                        String::new(),
                        &now,
                        true,
                    )
                })
            }
            None => old_p.cloned().unwrap_or_else(|| {
                new_cond(
                    None,
                    "Progressing",
                    "True",
                    "ReplicaSetUpdated",
                    String::new(),
                    &now,
                    true,
                )
            }),
        }
    };
    if !complete
        && !paused
        && requeue.is_none()
        && prog.status == "True"
        && let Some(dl) = deadline
    {
        requeue = Some(Duration::from_secs(u64::try_from(dl.max(1)).unwrap_or(1)));
    }
    let status = json!({
        "observedGeneration": d.metadata.generation.unwrap_or(0),
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (spec_total.max(desired) - available).max(0),
        "collisionCount": if collision > 0 { json!(collision) } else { serde_json::Value::Null },
        "conditions": [avail_cond, prog],
    });
    let cur = serde_json::to_value(d.status.clone().unwrap_or_default()).unwrap_or_default();
    let same = [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
    ]
    .iter()
    .all(|f| cur.get(*f).and_then(|v| v.as_i64()).unwrap_or(0) == status[*f].as_i64().unwrap_or(0))
        && cur.get("conditions").map(strip_times) == Some(strip_times(&status["conditions"]));
    if !same {
        match Api::<Deployment>::namespaced(ctx.client.clone(), ns)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(requeue)
}

/// Conditions without their timestamps, for change detection.
fn strip_times(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    if let Some(a) = v.as_array_mut() {
        for c in a {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastUpdateTime");
                o.remove("lastTransitionTime");
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_as_upstream() {
        assert_eq!(pct("25%", 3, true), 1);
        assert_eq!(pct("25%", 3, false), 0);
        assert_eq!(pct("50%", 5, true), 3);
        assert_eq!(pct("2", 5, true), 2);
    }

    #[test]
    fn hash_is_stable_and_name_safe() {
        let t = PodTemplateSpec::default();
        let h = template_hash(&t, 0);
        assert_eq!(h, template_hash(&t, 0));
        assert_ne!(h, template_hash(&t, 1));
        assert!(
            h.bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        );
    }
}
