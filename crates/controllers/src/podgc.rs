//! PodGC, as kube-controller-manager's pod garbage collector: every `podgc_period` it
//! force-deletes pods bound to nodes that no longer exist (after a quarantine and a live check,
//! first marking them Failed with a `DisruptionTarget` condition), terminating pods that were
//! never scheduled, terminating pods on not-ready nodes tainted `out-of-service`, and the oldest
//! terminated (Succeeded/Failed) pods beyond `terminated_pod_gc_threshold`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::{ControllerError, Ctx};

/// Taint that marks a node as shut down for good (its pods may be force-deleted).
pub const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";

/// Runs PodGC until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    // Node name → when this controller first saw pods bound to it while it was absent.
    let mut missing: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(ctx.config.podgc_period);
    loop {
        tick.tick().await;
        if let Err(e) = pass(&ctx, &mut missing).await {
            tracing::info!(error = %e, "pod gc pass failed; retrying");
        }
    }
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn out_of_service(n: &Node) -> bool {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == OUT_OF_SERVICE))
}

/// Which terminated pods to delete: the oldest (by creation time, then name) beyond `threshold`.
pub fn over_threshold(terminated: &mut Vec<Arc<Pod>>, threshold: usize) -> Vec<Arc<Pod>> {
    if threshold == 0 || terminated.len() <= threshold {
        return Vec::new();
    }
    terminated.sort_by(|a, b| {
        let ka = (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            a.metadata.name.clone(),
        );
        let kb = (
            b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            b.metadata.name.clone(),
        );
        ka.cmp(&kb)
    });
    let n = terminated.len() - threshold;
    terminated.drain(..n).collect()
}

async fn force_delete(ctx: &Ctx, p: &Pod, why: &'static str) -> Result<(), ControllerError> {
    let ns = p.metadata.namespace.as_deref().unwrap_or("default");
    let name = p.metadata.name.as_deref().unwrap_or("");
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut dp = DeleteParams::default().grace_period(0);
    if let Some(uid) = &p.metadata.uid {
        dp = dp.preconditions(kube::api::Preconditions {
            uid: Some(uid.clone()),
            resource_version: None,
        });
    }
    match api.delete(name, &dp).await {
        Ok(_) => {
            tracing::info!(
                namespace = ns,
                pod = name,
                reason = why,
                "pod gc force-deleted pod"
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Marks a pod of a vanished node Failed with the `DisruptionTarget` condition (as PodGC does
/// before deleting, so that Jobs count the failure as a disruption).
async fn mark_failed(ctx: &Ctx, p: &Pod) -> Result<(), ControllerError> {
    if matches!(phase(p), "Succeeded" | "Failed") {
        return Ok(());
    }
    let ns = p.metadata.namespace.as_deref().unwrap_or("default");
    let name = p.metadata.name.as_deref().unwrap_or("");
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = json!({"status": {"phase": "Failed", "conditions": [{
        "type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
        "message": "PodGC: node no longer exists", "lastTransitionTime": now}]}});
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn pass(ctx: &Ctx, missing: &mut HashMap<String, Instant>) -> Result<(), ControllerError> {
    let pods = ctx.pods.store.state();
    let nodes: HashMap<String, Arc<Node>> = ctx
        .nodes
        .store
        .state()
        .into_iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, n)))
        .collect();

    // Terminated pods over the threshold.
    let mut terminated: Vec<Arc<Pod>> = pods
        .iter()
        .filter(|p| matches!(phase(p), "Succeeded" | "Failed"))
        .cloned()
        .collect();
    for p in over_threshold(&mut terminated, ctx.config.terminated_pod_gc_threshold) {
        force_delete(ctx, &p, "TerminatedPodsOverThreshold").await?;
    }

    // Orphans: pods bound to nodes that do not exist, after a quarantine and a live check.
    let mut absent: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in &pods {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.as_deref())
            && !n.is_empty()
            && !nodes.contains_key(n)
        {
            absent.entry(n.to_string()).or_default().push(p.clone());
        }
    }
    missing.retain(|n, _| absent.contains_key(n));
    let node_api: Api<Node> = Api::all(ctx.client.clone());
    for (node, orphans) in absent {
        let since = *missing.entry(node.clone()).or_insert_with(Instant::now);
        if since.elapsed() < ctx.config.podgc_quarantine {
            continue;
        }
        match node_api.get_opt(&node).await? {
            Some(_) => continue,
            None => {
                for p in orphans {
                    tracing::info!(node = %node, pod = p.metadata.name.as_deref().unwrap_or(""),
                        "pod is bound to a node that no longer exists");
                    mark_failed(ctx, &p).await?;
                    force_delete(ctx, &p, "NodeGone").await?;
                }
            }
        }
    }

    for p in &pods {
        if p.metadata.deletion_timestamp.is_none() {
            continue;
        }
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("");
        if node.is_empty() {
            // Terminating and never scheduled: no kubelet will ever finish it.
            force_delete(ctx, p, "UnscheduledTerminating").await?;
        } else if let Some(n) = nodes.get(node)
            && out_of_service(n)
            && !node_ready(n)
        {
            force_delete(ctx, p, "OutOfServiceNode").await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(name: &str, secs: i64) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_default(),
        ));
        Arc::new(p)
    }

    #[test]
    fn oldest_terminated_pods_go_first() {
        let mut v = vec![pod("c", 30), pod("a", 10), pod("b", 20), pod("d", 40)];
        let gone = over_threshold(&mut v, 2);
        let names: Vec<_> = gone
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(over_threshold(&mut v, 2).is_empty());
        assert!(
            over_threshold(&mut v, 0).is_empty(),
            "0 disables the threshold"
        );
    }
}
