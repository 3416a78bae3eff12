//! StatefulSet controller: pods `<name>-<ordinal>` with stable hostname and subdomain, created
//! in order and one at a time (OrderedReady) or all at once (Parallel), removed in reverse;
//! PVCs `<template>-<name>-<ordinal>` from volumeClaimTemplates, kept on scale-down unless the
//! retention policy says Delete; RollingUpdate in reverse ordinal order down to the partition,
//! or OnDelete; ControllerRevisions; the status `kubectl rollout status sts/x` reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use crate::daemonset::REVISION_HASH;
use crate::events::{NORMAL, WARNING, api_message};
use crate::queue::Queue;
use crate::util::{self, controller_ref, deleting, split_key};
use crate::{ControllerError, Ctx};

/// Label with a StatefulSet pod's name.
pub const POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
/// Label with a StatefulSet pod's ordinal.
pub const POD_INDEX: &str = "apps.kubernetes.io/pod-index";

/// Runs the controller until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let queue = Queue::default();
    let _ = crate::informer::feed_owner(&ctx.statefulsets, &ctx.pods, "StatefulSet", &queue);
    queue.work("statefulset", |k| sync(ctx.clone(), k)).await;
}

/// The ordinal of pod `pod` of set `set` (`<set>-<ordinal>`).
pub fn ordinal(set: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

fn healthy(p: &Pod) -> bool {
    util::phase(p) == "Running" && util::is_ready(p) && !deleting(&p.metadata)
}

fn pod_hash(p: &Pod) -> Option<&str> {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REVISION_HASH))
        .map(String::as_str)
}

/// The template stored in a ControllerRevision.
fn revision_template(cr: &ControllerRevision) -> Option<PodTemplateSpec> {
    let v = cr.data.as_ref()?.0.pointer("/spec/template")?.clone();
    serde_json::from_value(v).ok()
}

fn claim_name(tmpl: &PersistentVolumeClaim, set: &str, ord: i32) -> String {
    format!(
        "{}-{set}-{ord}",
        tmpl.metadata.name.as_deref().unwrap_or("data")
    )
}

/// The pod for `ord` from `template` at revision `hash`.
fn pod_for(sts: &StatefulSet, template: &PodTemplateSpec, ord: i32, hash: &str) -> Pod {
    let set = sts.metadata.name.clone().unwrap_or_default();
    let name = format!("{set}-{ord}");
    let tmeta = template.metadata.clone().unwrap_or_default();
    let mut labels = tmeta.labels.unwrap_or_default();
    labels.insert(REVISION_HASH.into(), hash.into());
    labels.insert(POD_NAME.into(), name.clone());
    labels.insert(POD_INDEX.into(), ord.to_string());
    let mut spec = template.spec.clone().unwrap_or_default();
    spec.hostname = Some(name.clone());
    if let Some(svc) = sts.spec.as_ref().and_then(|s| s.service_name.clone())
        && !svc.is_empty()
    {
        spec.subdomain = Some(svc);
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    for t in sts
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .into_iter()
        .flatten()
    {
        let vname = t.metadata.name.clone().unwrap_or_default();
        volumes.retain(|v| v.name != vname);
        volumes.push(Volume {
            name: vname,
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(t, &set, ord),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    if volumes.is_empty() {
        spec.volumes = None;
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: sts.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: tmeta.annotations,
            owner_references: Some(vec![util::owner_ref(
                "apps/v1",
                "StatefulSet",
                &sts.metadata,
            )]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Creates the PVCs of ordinal `ord` that do not exist yet.
async fn ensure_claims(ctx: &Ctx, sts: &StatefulSet, ord: i32) -> Result<(), ControllerError> {
    let ns = sts.metadata.namespace.as_deref().unwrap_or("");
    let set = sts.metadata.name.clone().unwrap_or_default();
    let Some(spec) = sts.spec.as_ref() else {
        return Ok(());
    };
    let delete_with_set = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|p| p.when_deleted.as_deref())
        == Some("Delete");
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns);
    for t in spec.volume_claim_templates.iter().flatten() {
        let name = claim_name(t, &set, ord);
        if ctx.pvcs.get(ns, &name).is_some() {
            continue;
        }
        let mut labels: BTreeMap<String, String> = t.metadata.labels.clone().unwrap_or_default();
        labels.extend(spec.selector.match_labels.clone().unwrap_or_default());
        let owners = delete_with_set.then(|| {
            vec![OwnerReference {
                controller: Some(true),
                ..util::owner_ref("apps/v1", "StatefulSet", &sts.metadata)
            }]
        });
        let pvc = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(ns.into()),
                labels: Some(labels),
                annotations: t.metadata.annotations.clone(),
                owner_references: owners,
                ..Default::default()
            },
            spec: t.spec.clone(),
            status: None,
        };
        match api.create(&PostParams::default(), &pvc).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn sync(ctx: Arc<Ctx>, k: String) -> Result<Option<Duration>, ControllerError> {
    let (ns, name) = split_key(&k);
    let Some(sts) = ctx.statefulsets.get(ns, name) else {
        return Ok(None);
    };
    let Some(spec) = sts.spec.as_ref() else {
        return Ok(None);
    };
    if deleting(&sts.metadata) {
        return Ok(None);
    }
    let uid = sts.metadata.uid.clone().unwrap_or_default();
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let mut pods: BTreeMap<i32, Arc<Pod>> = BTreeMap::new();
    for p in ctx.pods.in_namespace(ns) {
        if controller_ref(&p.metadata).is_some_and(|r| r.uid == uid)
            && let Some(o) = ordinal(name, p.metadata.name.as_deref().unwrap_or(""))
        {
            pods.insert(o, p);
        }
    }
    // Pods carry the revision name (`<set>-<hash>`), ControllerRevisions the bare hash.
    let prefix = format!("{name}-");
    let in_use: Vec<&str> = pods
        .values()
        .filter_map(|p| pod_hash(p)?.strip_prefix(&prefix))
        .collect();
    let (update_hash, _) = crate::daemonset::ensure_revision(
        &ctx,
        ns,
        "StatefulSet",
        &sts.metadata,
        &spec.template,
        spec.revision_history_limit.unwrap_or(10),
        &in_use,
    )
    .await?;
    let update_rev = format!("{name}-{update_hash}");
    let old = sts.status.clone().unwrap_or_default();
    let mut current_rev = old
        .current_revision
        .clone()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| update_rev.clone());
    let current_template = ctx
        .revisions
        .get(ns, &current_rev)
        .and_then(|r| revision_template(&r))
        .unwrap_or_else(|| spec.template.clone());

    let start = spec
        .ordinals
        .as_ref()
        .and_then(|o| o.start)
        .unwrap_or(0)
        .max(0);
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let end = start + replicas;
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let strategy = spec.update_strategy.as_ref();
    let on_delete = strategy.and_then(|s| s.type_.as_deref()) == Some("OnDelete");
    let partition = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0);
    let when_scaled_delete = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|p| p.when_scaled.as_deref())
        == Some("Delete");

    let rec = ctx.events.component("statefulset-controller");
    let deleted = |p: &Pod| {
        if !deleting(&p.metadata) {
            rec.event(
                &*sts,
                NORMAL,
                "SuccessfulDelete",
                format!(
                    "delete Pod {} in StatefulSet {name} successful",
                    p.metadata.name.as_deref().unwrap_or("")
                ),
            );
        }
    };
    // Failed pods are deleted (and re-created on a later pass).
    for p in pods.values() {
        if util::phase(p) == "Failed" {
            util::delete_pod(&pods_api, p).await?;
            deleted(p);
        }
    }
    // Create missing ordinals, in order.
    let mut blocked = false;
    for ord in start..end {
        match pods.get(&ord) {
            Some(p) => {
                if !parallel && !healthy(p) {
                    blocked = true;
                    break;
                }
            }
            None => {
                ensure_claims(&ctx, &sts, ord).await?;
                // Below the partition a pod keeps the current revision (RollingUpdate).
                let (tmpl, hash) = if !on_delete && ord - start < partition {
                    (&current_template, current_rev.as_str())
                } else {
                    (&spec.template, update_rev.as_str())
                };
                let pod = pod_for(&sts, tmpl, ord, hash);
                let pname = pod.metadata.name.clone().unwrap_or_default();
                match pods_api.create(&PostParams::default(), &pod).await {
                    Ok(_) => rec.event(
                        &*sts,
                        NORMAL,
                        "SuccessfulCreate",
                        format!("create Pod {pname} in StatefulSet {name} successful"),
                    ),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => {
                        let e = ControllerError::from(e);
                        rec.event(
                            &*sts,
                            WARNING,
                            "FailedCreate",
                            format!(
                                "create Pod {pname} in StatefulSet {name} failed error: {}",
                                api_message(&e)
                            ),
                        );
                        return Err(e);
                    }
                }
                if !parallel {
                    blocked = true;
                    break;
                }
            }
        }
    }
    // Remove ordinals beyond the range, highest first.
    let condemned: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|(o, _)| **o < start || **o >= end)
        .rev()
        .map(|(_, p)| p)
        .collect();
    if !blocked || parallel {
        for p in &condemned {
            util::delete_pod(&pods_api, p).await?;
            deleted(p);
            if !parallel {
                break;
            }
        }
    }
    if when_scaled_delete {
        let set_prefix = format!("-{name}-");
        for pvc in ctx.pvcs.in_namespace(ns) {
            let pname = pvc.metadata.name.clone().unwrap_or_default();
            let Some(ord) = spec.volume_claim_templates.iter().flatten().find_map(|t| {
                let p = format!("{}{set_prefix}", t.metadata.name.as_deref().unwrap_or(""));
                pname.strip_prefix(&p)?.parse::<i32>().ok()
            }) else {
                continue;
            };
            if (ord >= end || ord < start) && !pods.contains_key(&ord) && !deleting(&pvc.metadata) {
                let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns);
                match api.delete(&pname, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    // Rolling update: highest ordinal first, one at a time, while everything is healthy.
    let in_range: Vec<(&i32, &Arc<Pod>)> = pods.range(start..end).collect();
    let all_healthy = in_range.len() == usize::try_from(replicas).unwrap_or(0)
        && in_range.iter().all(|(_, p)| healthy(p))
        && condemned.is_empty();
    if !on_delete
        && all_healthy
        && let Some((_, p)) = in_range
            .iter()
            .rev()
            .filter(|(o, _)| **o - start >= partition)
            .find(|(_, p)| pod_hash(p) != Some(update_rev.as_str()))
    {
        util::delete_pod(&pods_api, p).await?;
    }

    // Status.
    let now = Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let mut requeue: Option<Duration> = None;
    let live: Vec<&Arc<Pod>> = pods.values().filter(|p| !deleting(&p.metadata)).collect();
    let ready = live.iter().filter(|p| util::is_ready(p)).count();
    let mut available = 0;
    for p in &live {
        match util::available(p, min_ready, now) {
            Ok(true) => available += 1,
            Ok(false) => {}
            Err(w) => requeue = Some(requeue.map_or(w, |r: Duration| r.min(w))),
        }
    }
    let updated = live
        .iter()
        .filter(|p| pod_hash(p) == Some(update_rev.as_str()))
        .count();
    if updated == usize::try_from(replicas).unwrap_or(0)
        && ready == updated
        && live.len() == updated
    {
        current_rev = update_rev.clone();
    }
    let current = live
        .iter()
        .filter(|p| pod_hash(p) == Some(current_rev.as_str()))
        .count();
    let status = json!({
        "replicas": live.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "currentReplicas": current,
        "updatedReplicas": updated,
        "currentRevision": current_rev,
        "updateRevision": update_rev,
        "observedGeneration": sts.metadata.generation.unwrap_or(0),
        "collisionCount": 0,
    });
    let cur = serde_json::to_value(&old).unwrap_or_default();
    let changed = status
        .as_object()
        .is_some_and(|m| m.iter().any(|(k, v)| cur.get(k).unwrap_or(&json!(0)) != v));
    if changed {
        let api = Api::<StatefulSet>::namespaced(ctx.client.clone(), ns);
        if !util::patch_status(&api, name, status).await? {
            return Ok(None);
        }
    }
    Ok(requeue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals() {
        assert_eq!(ordinal("web", "web-0"), Some(0));
        assert_eq!(ordinal("web", "web-12"), Some(12));
        assert_eq!(ordinal("web", "web-x"), None);
        assert_eq!(ordinal("web", "webby-1"), None);
    }
}
