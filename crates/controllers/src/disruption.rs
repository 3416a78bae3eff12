//! PodDisruptionBudget (disruption) controller: for each PDB counts the Ready pods its selector
//! matches, derives how many must stay healthy (minAvailable / maxUnavailable, as an int or a
//! percentage of the owning controllers' desired replicas), and writes `status`
//! (expectedPods, currentHealthy, desiredHealthy, disruptionsAllowed, disruptedPods and the
//! `DisruptionAllowed` condition) when it changed. The eviction subresource reads that status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ReplicationController};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use crate::events::{NORMAL, WARNING};
use crate::informer::{Informer, feed};
use crate::queue::Queue;
use crate::util::{self, controller_ref, deleting, key, split_key};
use crate::{ControllerError, Ctx};

/// How long an eviction recorded in `status.disruptedPods` waits for the pod's deletion to be
/// observed before the pod counts again (upstream: 2 minutes).
pub const DELETION_TIMEOUT: Duration = Duration::from_secs(120);

/// The Event source of this controller (kube-controller-manager's disruption controller
/// records as `controllermanager`).
const COMPONENT: &str = "controllermanager";

/// The condition type.
pub const CONDITION: &str = "DisruptionAllowed";

/// The readers the controller needs.
struct Sources {
    ctx: Arc<Ctx>,
    pdbs: Arc<Informer<PodDisruptionBudget>>,
    rcs: Arc<Informer<ReplicationController>>,
}

/// Runs the disruption controller until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let pdbs = ctx.pdbs.clone();
    let rcs = ctx.rcs.clone();
    let src = Arc::new(Sources { ctx, pdbs, rcs });
    let queue = Queue::default();
    let all = {
        let p = src.pdbs.clone();
        move || {
            p.store
                .state()
                .iter()
                .map(|o| key(&o.metadata))
                .collect::<Vec<_>>()
        }
    };
    feed(
        &src.pdbs,
        queue.clone(),
        |p: &PodDisruptionBudget| vec![key(&p.metadata)],
        all.clone(),
    );
    {
        let s = src.clone();
        feed(
            &src.ctx.pods,
            queue.clone(),
            move |p: &Pod| pdbs_for_pod(&s.pdbs, p),
            all.clone(),
        );
    }
    // A controller's scale change moves expectedPods: queue every PDB of its namespace.
    let by_ns = |p: &Arc<Informer<PodDisruptionBudget>>| {
        let p = p.clone();
        move |ns: &str| {
            p.in_namespace(ns)
                .iter()
                .map(|o| key(&o.metadata))
                .collect::<Vec<_>>()
        }
    };
    {
        let f = by_ns(&src.pdbs);
        feed(
            &src.ctx.replicasets,
            queue.clone(),
            move |o: &k8s_openapi::api::apps::v1::ReplicaSet| {
                f(o.metadata.namespace.as_deref().unwrap_or(""))
            },
            all.clone(),
        );
        let f = by_ns(&src.pdbs);
        feed(
            &src.ctx.deployments,
            queue.clone(),
            move |o: &k8s_openapi::api::apps::v1::Deployment| {
                f(o.metadata.namespace.as_deref().unwrap_or(""))
            },
            all.clone(),
        );
        let f = by_ns(&src.pdbs);
        feed(
            &src.ctx.statefulsets,
            queue.clone(),
            move |o: &k8s_openapi::api::apps::v1::StatefulSet| {
                f(o.metadata.namespace.as_deref().unwrap_or(""))
            },
            all.clone(),
        );
        let f = by_ns(&src.pdbs);
        feed(
            &src.rcs,
            queue.clone(),
            move |o: &ReplicationController| f(o.metadata.namespace.as_deref().unwrap_or("")),
            all.clone(),
        );
    }
    for k in all() {
        queue.add(k);
    }
    queue.work("disruption", |k| sync(src.clone(), k)).await;
}

/// Whether the PDB selects the pod: a missing selector selects nothing, an empty one (`{}`)
/// every pod of the namespace (policy/v1).
pub fn selects(pdb: &PodDisruptionBudget, pod: &Pod) -> bool {
    if pdb.metadata.namespace != pod.metadata.namespace {
        return false;
    }
    match pdb.spec.as_ref().and_then(|s| s.selector.as_ref()) {
        Some(sel) => util::selector_matches(sel, pod.metadata.labels.as_ref()),
        None => false,
    }
}

fn pdbs_for_pod(pdbs: &Informer<PodDisruptionBudget>, pod: &Pod) -> Vec<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("");
    pdbs.in_namespace(ns)
        .iter()
        .filter(|p| selects(p, pod))
        .map(|p| key(&p.metadata))
        .collect()
}

/// `v` of `total`: an int as is, a percentage rounded up (intstr's GetScaledValueFromIntOrPercent
/// with roundUp).
pub fn scaled(v: &IntOrString, total: i32) -> Result<i32, String> {
    match v {
        IntOrString::Int(i) => Ok(*i),
        IntOrString::String(s) => {
            let p: i64 = s
                .strip_suffix('%')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("invalid value for IntOrString: invalid value {s:?}"))?;
            let v = (p * i64::from(total) + 99).div_euclid(100);
            Ok(i32::try_from(v).unwrap_or(i32::MAX))
        }
    }
}

/// The sum of the desired replicas of the controllers of `pods` (each counted once).
/// Pods without a controller are skipped (upstream calls them unmanaged).
fn expected_scale(src: &Sources, ns: &str, pods: &[Arc<Pod>]) -> Result<i32, String> {
    let mut scale: HashMap<String, i32> = HashMap::new();
    for p in pods {
        let Some(r) = controller_ref(&p.metadata) else {
            continue;
        };
        if scale.contains_key(&r.uid) {
            continue;
        }
        let found = match r.kind.as_str() {
            "ReplicaSet" => src
                .ctx
                .replicasets
                .get(ns, &r.name)
                .filter(|rs| rs.metadata.uid.as_deref() == Some(r.uid.as_str()))
                .map(|rs| {
                    let dep = controller_ref(&rs.metadata)
                        .filter(|d| d.kind == "Deployment")
                        .and_then(|d| {
                            src.ctx
                                .deployments
                                .get(ns, &d.name)
                                .filter(|x| x.metadata.uid.as_deref() == Some(d.uid.as_str()))
                        });
                    match dep {
                        Some(d) => (
                            d.metadata.uid.clone().unwrap_or_default(),
                            d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                        ),
                        None => (
                            r.uid.clone(),
                            rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                        ),
                    }
                }),
            "ReplicationController" => src
                .rcs
                .get(ns, &r.name)
                .filter(|o| o.metadata.uid.as_deref() == Some(r.uid.as_str()))
                .map(|o| {
                    (
                        r.uid.clone(),
                        o.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                    )
                }),
            "StatefulSet" => src
                .ctx
                .statefulsets
                .get(ns, &r.name)
                .filter(|o| o.metadata.uid.as_deref() == Some(r.uid.as_str()))
                .map(|o| {
                    (
                        r.uid.clone(),
                        o.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                    )
                }),
            _ => None,
        };
        match found {
            Some((uid, n)) => {
                scale.insert(r.uid.clone(), 0);
                scale.insert(uid, n);
            }
            None => {
                return Err(format!(
                    "found no controllers for pod {:?}",
                    p.metadata.name.as_deref().unwrap_or("")
                ));
            }
        }
    }
    Ok(scale.values().sum())
}

/// (expectedPods, desiredHealthy) of `pdb` over `pods`.
fn expected_and_desired(
    src: &Sources,
    pdb: &PodDisruptionBudget,
    pods: &[Arc<Pod>],
) -> Result<(i32, i32), String> {
    let ns = pdb.metadata.namespace.as_deref().unwrap_or("");
    let spec = pdb.spec.clone().unwrap_or_default();
    if let Some(mu) = &spec.max_unavailable {
        let expected = expected_scale(src, ns, pods)?;
        let max = scaled(mu, expected)?;
        return Ok((expected, (expected - max).max(0)));
    }
    // Neither set: policy/v1 defaulting makes it minAvailable 1.
    let min = spec.min_available.unwrap_or(IntOrString::Int(1));
    match &min {
        IntOrString::Int(i) => Ok((i32::try_from(pods.len()).unwrap_or(i32::MAX), *i)),
        IntOrString::String(_) => {
            let expected = expected_scale(src, ns, pods)?;
            Ok((expected, scaled(&min, expected)?))
        }
    }
}

/// The `DisruptionAllowed` condition, keeping `lastTransitionTime` when the status is unchanged.
fn condition(
    old: Option<&Condition>,
    status: &str,
    reason: &str,
    message: &str,
    generation: i64,
) -> Condition {
    let ltt = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    Condition {
        type_: CONDITION.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time: ltt,
    }
}

async fn sync(src: Arc<Sources>, k: String) -> Result<Option<Duration>, ControllerError> {
    let (ns, name) = split_key(&k);
    let Some(pdb) = src.pdbs.get(ns, name) else {
        return Ok(None);
    };
    if deleting(&pdb.metadata) {
        return Ok(None);
    }
    let pods: Vec<Arc<Pod>> = src
        .ctx
        .pods
        .in_namespace(ns)
        .into_iter()
        .filter(|p| selects(&pdb, p))
        .collect();
    let old = pdb.status.clone().unwrap_or_default();
    let old_cond = old
        .conditions
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION));
    let generation = pdb.metadata.generation.unwrap_or(0);
    let mut status = old.clone();
    let requeue;
    let rec = src.ctx.events.component(COMPONENT);
    if pods.is_empty() {
        rec.event(&*pdb, NORMAL, "NoPods", "No matching pods found");
    }
    match expected_and_desired(&src, &pdb, &pods) {
        Err(msg) => {
            rec.event(
                &*pdb,
                WARNING,
                "CalculateExpectedPodCountFailed",
                format!("Failed to calculate the number of expected pods: {msg}"),
            );
            // Fail safe: no disruption is allowed while the budget cannot be computed.
            tracing::info!(pdb = %k, error = %msg, "disruption budget sync failed");
            status.disruptions_allowed = 0;
            let gen_ = old.observed_generation.unwrap_or(0);
            status.conditions = Some(vec![condition(old_cond, "False", "SyncFailed", &msg, gen_)]);
            requeue = Some(Duration::from_secs(5));
        }
        Ok((expected, desired)) => {
            let now = Timestamp::now();
            let timeout_ms = i64::try_from(DELETION_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
            let mut disrupted = BTreeMap::new();
            let mut next_check: Option<i64> = None;
            for p in &pods {
                let pname = p.metadata.name.clone().unwrap_or_default();
                if deleting(&p.metadata) {
                    continue;
                }
                let Some(t) = old.disrupted_pods.as_ref().and_then(|m| m.get(&pname)) else {
                    continue;
                };
                let left = t.0.as_millisecond() + timeout_ms - now.as_millisecond();
                if left <= 0 {
                    tracing::info!(pdb = %k, pod = %pname, "pod was expected to be deleted but was not; counting it again");
                    rec.event(
                        &**p,
                        WARNING,
                        "NotDeleted",
                        format!("Pod was expected by PDB {ns}/{name} to be deleted but it wasn't"),
                    );
                    continue;
                }
                next_check = Some(next_check.map_or(left, |n| n.min(left)));
                disrupted.insert(pname, t.clone());
            }
            let healthy = pods
                .iter()
                .filter(|p| {
                    !deleting(&p.metadata)
                        && !disrupted.contains_key(p.metadata.name.as_deref().unwrap_or(""))
                        && util::is_ready(p)
                })
                .count();
            let healthy = i32::try_from(healthy).unwrap_or(i32::MAX);
            let allowed = (healthy - desired).max(0);
            status.observed_generation = Some(generation);
            status.expected_pods = expected;
            status.current_healthy = healthy;
            status.desired_healthy = desired;
            status.disruptions_allowed = allowed;
            status.disrupted_pods = if disrupted.is_empty() {
                None
            } else {
                Some(disrupted)
            };
            let c = if allowed > 0 {
                condition(old_cond, "True", "SufficientPods", "", generation)
            } else {
                condition(old_cond, "False", "InsufficientPods", "", generation)
            };
            status.conditions = Some(vec![c]);
            requeue = next_check.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
        }
    }
    if same_status(&old, &status) {
        return Ok(requeue);
    }
    let mut new = (*pdb).clone();
    new.status = Some(status);
    let api: Api<PodDisruptionBudget> = Api::namespaced(src.ctx.client.clone(), ns);
    match api.replace_status(name, &PostParams::default(), &new).await {
        Ok(_) => Ok(requeue),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether two statuses are equal (an empty disruptedPods map equals a missing one).
fn same_status(a: &PodDisruptionBudgetStatus, b: &PodDisruptionBudgetStatus) -> bool {
    let dp = |s: &PodDisruptionBudgetStatus| s.disrupted_pods.clone().unwrap_or_default();
    a.observed_generation == b.observed_generation
        && a.expected_pods == b.expected_pods
        && a.current_healthy == b.current_healthy
        && a.desired_healthy == b.desired_healthy
        && a.disruptions_allowed == b.disruptions_allowed
        && dp(a) == dp(b)
        && a.conditions == b.conditions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_up() {
        assert_eq!(scaled(&IntOrString::String("50%".into()), 3), Ok(2));
        assert_eq!(scaled(&IntOrString::String("34%".into()), 3), Ok(2));
        assert_eq!(scaled(&IntOrString::String("100%".into()), 5), Ok(5));
        assert_eq!(scaled(&IntOrString::Int(2), 5), Ok(2));
        assert!(scaled(&IntOrString::String("x".into()), 5).is_err());
    }
}
