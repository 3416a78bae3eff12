//! Node lifecycle: watches node Leases (and Ready heartbeats); a node not heard from within the
//! grace period becomes `Ready=Unknown`. Nodes get the `node.kubernetes.io/unreachable` or
//! `not-ready` NoExecute taint, their pods are marked not Ready, and pods are evicted when
//! they do not tolerate a NoExecute taint or their `tolerationSeconds` run out. Pressure
//! conditions (MemoryPressure, DiskPressure, PIDPressure) and NetworkUnavailable give the node
//! the matching NoSchedule taint while they are True (TaintNodesByCondition).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::{ControllerError, Ctx};

/// Taint of nodes whose kubelet stopped reporting.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// Taint of nodes that report `Ready=False`.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

struct Health {
    probe: (Option<String>, Option<String>),
    seen: Instant,
}

/// Runs the node lifecycle controller until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let mut health: HashMap<String, Health> = HashMap::new();
    let mut tick = tokio::time::interval(ctx.config.node_monitor_period);
    // A node change (a pressure condition turning True) is acted on at once, so that the
    // NoSchedule taint lands before a controller replaces refused pods onto the node again.
    let mut changes = ctx.nodes.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = changes.recv() => {
                match r {
                    Ok(node) => {
                        if let Err(e) = condition_taints(&ctx, &node).await {
                            tracing::info!(error = %e, "node condition taints not updated; retrying");
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep(ctx.config.node_monitor_period).await;
                        changes = ctx.nodes.subscribe();
                    }
                }
                continue;
            }
        }
        if let Err(e) = pass(&ctx, &mut health).await {
            tracing::info!(error = %e, "node lifecycle pass failed; retrying");
        }
    }
}

/// Node conditions whose `True` status taints the node NoSchedule (TaintNodesByCondition).
const CONDITION_TAINTS: [(&str, &str); 4] = [
    ("MemoryPressure", "node.kubernetes.io/memory-pressure"),
    ("DiskPressure", "node.kubernetes.io/disk-pressure"),
    ("PIDPressure", "node.kubernetes.io/pid-pressure"),
    (
        "NetworkUnavailable",
        "node.kubernetes.io/network-unavailable",
    ),
];

/// The node's taints with the condition NoSchedule taints made to match its conditions.
fn with_condition_taints(node: &Node, taints: &[Taint]) -> Vec<Taint> {
    let mut next: Vec<Taint> = taints
        .iter()
        .filter(|t| {
            !(t.effect == "NoSchedule" && CONDITION_TAINTS.iter().any(|(_, k)| t.key == *k))
        })
        .cloned()
        .collect();
    for (cond, key) in CONDITION_TAINTS {
        if condition_true(node, cond) {
            let existing = taints
                .iter()
                .find(|t| t.key == key && t.effect == "NoSchedule");
            next.push(existing.cloned().unwrap_or_else(|| Taint {
                key: key.into(),
                effect: "NoSchedule".into(),
                time_added: None,
                value: None,
            }));
        }
    }
    next
}

/// Brings one changed node's condition taints up to date (between full passes).
async fn condition_taints(ctx: &Ctx, node: &Node) -> Result<(), ControllerError> {
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let next = with_condition_taints(node, &taints);
    if next == taints {
        return Ok(());
    }
    let name = node.metadata.name.clone().unwrap_or_default();
    tracing::info!(node = %name, "updating node condition taints");
    let patch = json!({"metadata": {"resourceVersion": node.metadata.resource_version},
        "spec": {"taints": next}});
    match Api::<Node>::all(ctx.client.clone())
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn condition_true(n: &Node, type_: &str) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

fn ready_status(n: &Node) -> Option<&NodeCondition> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

async fn pass(ctx: &Ctx, health: &mut HashMap<String, Health>) -> Result<(), ControllerError> {
    let nodes = ctx.nodes.store.state();
    health.retain(|n, _| nodes.iter().any(|x| x.metadata.name.as_deref() == Some(n)));
    let api = Api::<Node>::all(ctx.client.clone());
    let now = Timestamp::now();
    let mut tainted: HashMap<String, Vec<Taint>> = HashMap::new();
    let mut unknown: Vec<String> = Vec::new();
    for node in &nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let lease = ctx.leases.get("kube-node-lease", &name).and_then(|l| {
            l.spec
                .as_ref()?
                .renew_time
                .as_ref()
                .map(|t| t.0.to_string())
        });
        let beat = ready_status(node)
            .and_then(|c| c.last_heartbeat_time.as_ref())
            .map(|t| t.0.to_string());
        let probe = (lease, beat);
        let h = health.entry(name.clone()).or_insert_with(|| Health {
            probe: probe.clone(),
            seen: Instant::now(),
        });
        if h.probe != probe {
            h.probe = probe;
            h.seen = Instant::now();
        }
        let mut ready = ready_status(node).map(|c| c.status.clone());
        let mut rv = node.metadata.resource_version.clone();
        if h.seen.elapsed() > ctx.config.node_monitor_grace && ready.as_deref() != Some("Unknown") {
            tracing::warn!(node = %name, "node stopped posting status; marking Ready=Unknown");
            rv = mark_unknown(&api, node, now).await?.or(rv);
            ready = Some("Unknown".into());
        }
        let want = match ready.as_deref() {
            Some("Unknown") => Some(UNREACHABLE),
            Some("False") => Some(NOT_READY),
            _ => None,
        };
        if ready.as_deref() == Some("Unknown") {
            unknown.push(name.clone());
        }
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        // TaintNodesByCondition: a pressure condition keeps new pods off the node.
        let mut next: Vec<Taint> = with_condition_taints(node, &taints)
            .into_iter()
            .filter(|t| !(t.effect == "NoExecute" && (t.key == UNREACHABLE || t.key == NOT_READY)))
            .collect();
        if let Some(k) = want {
            let existing = taints
                .iter()
                .find(|t| t.key == k && t.effect == "NoExecute");
            next.push(existing.cloned().unwrap_or_else(|| Taint {
                key: k.into(),
                effect: "NoExecute".into(),
                time_added: Some(Time(now)),
                value: None,
            }));
        }
        if next != taints {
            tracing::info!(node = %name, taint = ?want, "updating node condition taints");
            let patch = json!({"metadata": {"resourceVersion": rv},
                "spec": {"taints": next}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let no_exec: Vec<Taint> = next
            .into_iter()
            .filter(|t| t.effect == "NoExecute")
            .collect();
        if !no_exec.is_empty() {
            tainted.insert(name, no_exec);
        }
    }
    if tainted.is_empty() && unknown.is_empty() {
        return Ok(());
    }
    for pod in ctx.pods.store.state() {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(crate::util::phase(&pod), "Succeeded" | "Failed")
        {
            continue;
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or("");
        let pname = pod.metadata.name.as_deref().unwrap_or("");
        let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns);
        if unknown.iter().any(|u| u == node) && crate::util::is_ready(&pod) {
            mark_pod_not_ready(&pods, &pod, now).await;
        }
        let Some(taints) = tainted.get(node) else {
            continue;
        };
        let tolerations = pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default();
        if eviction_due(taints, &tolerations, now) {
            tracing::info!(
                namespace = ns,
                pod = pname,
                node,
                "evicting pod from tainted node"
            );
            match pods.delete(pname, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Whether a toleration tolerates a taint.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(e) = t.effect.as_deref().filter(|e| !e.is_empty())
        && e != taint.effect
    {
        return false;
    }
    let key = t.key.as_deref().unwrap_or("");
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        _ => {
            key == taint.key
                && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

/// Whether a pod on a node with these NoExecute taints must go now.
pub fn eviction_due(taints: &[Taint], tolerations: &[Toleration], now: Timestamp) -> bool {
    for taint in taints {
        let matching: Vec<&Toleration> =
            tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        if matching.is_empty() {
            return true;
        }
        // The shortest tolerationSeconds wins; a toleration without one tolerates forever.
        if matching.iter().any(|t| t.toleration_seconds.is_none()) {
            continue;
        }
        let secs = matching
            .iter()
            .filter_map(|t| t.toleration_seconds)
            .min()
            .unwrap_or(0)
            .max(0);
        let added = taint.time_added.as_ref().map(|t| t.0).unwrap_or(now);
        if now.as_second() - added.as_second() >= secs {
            return true;
        }
    }
    false
}

/// Marks every condition Unknown; returns the node's new resourceVersion.
async fn mark_unknown(
    api: &Api<Node>,
    node: &Node,
    now: Timestamp,
) -> Result<Option<String>, ControllerError> {
    let name = node.metadata.name.as_deref().unwrap_or("");
    let mut conds = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    if !conds.iter().any(|c| c.type_ == "Ready") {
        conds.push(NodeCondition {
            type_: "Ready".into(),
            reason: Some("NodeStatusNeverUpdated".into()),
            ..Default::default()
        });
    }
    for c in conds.iter_mut() {
        if c.status != "Unknown" {
            c.last_transition_time = Some(Time(now));
        }
        c.status = "Unknown".into();
        if c.reason.as_deref() != Some("NodeStatusNeverUpdated") {
            c.reason = Some("NodeStatusUnknown".into());
        }
        c.message = Some("Kubelet stopped posting node status.".into());
    }
    match api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conds}})),
        )
        .await
    {
        Ok(n) => Ok(n.metadata.resource_version),
        Err(kube::Error::Api(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn mark_pod_not_ready(api: &Api<Pod>, pod: &Pod, now: Timestamp) {
    let mut conds = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    for c in conds.iter_mut().filter(|c| c.type_ == "Ready") {
        c.status = "False".into();
        c.last_transition_time = Some(Time(now));
    }
    let name = pod.metadata.name.as_deref().unwrap_or("");
    if let Err(e) = api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conds}})),
        )
        .await
    {
        tracing::debug!(pod = name, error = %e, "marking pod not ready failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(secs_ago: i64) -> Taint {
        Taint {
            key: UNREACHABLE.into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(
                Timestamp::from_second(Timestamp::now().as_second() - secs_ago).unwrap(),
            )),
            value: None,
        }
    }

    fn tol(secs: Option<i64>) -> Toleration {
        Toleration {
            key: Some(UNREACHABLE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: secs,
            value: None,
        }
    }

    #[test]
    fn toleration_seconds() {
        let now = Timestamp::now();
        assert!(eviction_due(&[taint(0)], &[], now));
        assert!(!eviction_due(&[taint(2)], &[tol(Some(5))], now));
        assert!(eviction_due(&[taint(6)], &[tol(Some(5))], now));
        assert!(!eviction_due(&[taint(600)], &[tol(None)], now));
    }
}
