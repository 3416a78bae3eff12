//! DaemonSet controller: one pod per eligible node (nodeSelector, required node affinity,
//! taints against the template's and the default DaemonSet tolerations), pinned to its node
//! by a required `metadata.name` node affinity for the scheduler to bind; rolls pods to the
//! current ControllerRevision (RollingUpdate with maxUnavailable/maxSurge, or OnDelete) and
//! reports the status `kubectl rollout status ds/x` reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodTemplateSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::events::{NORMAL, WARNING, api_message};
use crate::queue::Queue;
use crate::util::{self, controller_ref, deleting, split_key};
use crate::{ControllerError, Ctx};

/// Label with the hash of the ControllerRevision a pod was made from.
pub const REVISION_HASH: &str = "controller-revision-hash";
/// Label with the DaemonSet generation a pod was made from.
pub const TEMPLATE_GENERATION: &str = "pod-template-generation";

/// Runs the controller until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let queue = Queue::default();
    let all = crate::informer::feed_owner(&ctx.daemonsets, &ctx.pods, "DaemonSet", &queue);
    let all2 = all.clone();
    crate::informer::feed(&ctx.nodes, queue.clone(), move |_: &Node| all2(), all);
    queue.work("daemonset", |k| sync(ctx.clone(), k)).await;
}

/// The tolerations every DaemonSet pod gets, as kube-controller-manager adds them.
pub fn default_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

fn tolerates(tols: &[Toleration], taint: &Taint) -> bool {
    tols.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let exists = t.operator.as_deref() == Some("Exists");
        let key_ok = match t.key.as_deref() {
            None | Some("") => exists,
            Some(k) => {
                k == taint.key
                    && (exists
                        || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""))
            }
        };
        effect_ok && key_ok
    })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&String>) -> bool {
    let vals = r.values.as_deref().unwrap_or(&[]);
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| vals.contains(v)),
        "NotIn" => value.is_none_or(|v| !vals.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(b)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                vals.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" { v > b } else { v < b }
        }
        _ => false,
    }
}

fn term_matches(t: &NodeSelectorTerm, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.metadata.name.clone().unwrap_or_default();
    let exprs = t.match_expressions.as_deref().unwrap_or(&[]);
    let fields = t.match_fields.as_deref().unwrap_or(&[]);
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(&name)))
}

/// Whether a DaemonSet pod from `template` should run on `node`.
pub fn should_run(template: &PodTemplateSpec, node: &Node) -> bool {
    let Some(spec) = template.spec.as_ref() else {
        return false;
    };
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    if let Some(sel) = &spec.node_selector
        && sel.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return false;
    }
    if let Some(req) = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        && !req
            .node_selector_terms
            .iter()
            .any(|t| term_matches(t, node))
    {
        return false;
    }
    let mut tols = spec.tolerations.clone().unwrap_or_default();
    tols.extend(default_tolerations());
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tols, t))
}

/// The node a DaemonSet pod is for: its nodeName, or the `metadata.name` of its affinity.
pub fn pod_node(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(n.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

fn pod_hash(p: &Pod) -> Option<&str> {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REVISION_HASH))
        .map(String::as_str)
}

/// The pod of `ds` for `node`.
fn pod_for(ds: &DaemonSet, node: &str, hash: &str) -> Pod {
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    let mut labels = tmeta.labels.unwrap_or_default();
    labels.insert(REVISION_HASH.into(), hash.into());
    labels.insert(
        TEMPLATE_GENERATION.into(),
        ds.metadata.generation.unwrap_or(1).to_string(),
    );
    let mut spec = template.spec.unwrap_or_default();
    let tols = spec.tolerations.get_or_insert_with(Vec::new);
    for t in default_tolerations() {
        if !tols.iter().any(|x| x.key == t.key && x.effect == t.effect) {
            tols.push(t);
        }
    }
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let na = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    na.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![node.into()]),
            }]),
            match_expressions: None,
        }],
    });
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", ds.metadata.name.as_deref().unwrap_or("ds"))),
            namespace: ds.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: tmeta.annotations,
            owner_references: Some(vec![util::owner_ref("apps/v1", "DaemonSet", &ds.metadata)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Makes sure a ControllerRevision exists for the current template; returns its hash.
pub(crate) async fn ensure_revision(
    ctx: &Ctx,
    ns: &str,
    owner_kind: &str,
    owner: &ObjectMeta,
    template: &PodTemplateSpec,
    history_limit: i32,
    in_use: &[&str],
) -> Result<(String, i64), ControllerError> {
    let hash = crate::deployment::template_hash(template, 0);
    let owner_uid = owner.uid.clone().unwrap_or_default();
    let owner_name = owner.name.clone().unwrap_or_default();
    let mut mine: Vec<Arc<ControllerRevision>> = ctx
        .revisions
        .in_namespace(ns)
        .into_iter()
        .filter(|r| controller_ref(&r.metadata).is_some_and(|o| o.uid == owner_uid))
        .collect();
    mine.sort_by_key(|r| r.revision);
    let max = mine.last().map(|r| r.revision).unwrap_or(0);
    let api = Api::<ControllerRevision>::namespaced(ctx.client.clone(), ns);
    let current = mine.iter().find(|r| {
        r.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(REVISION_HASH))
            == Some(&hash)
    });
    let revision = match current {
        Some(r) if r.revision == max => r.revision,
        Some(r) => {
            // Rolled back to an older template: it becomes the newest revision.
            let name = r.metadata.name.as_deref().unwrap_or("");
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"revision": max + 1})),
            )
            .await?;
            max + 1
        }
        None => {
            let mut data = serde_json::to_value(template)
                .map_err(|e| ControllerError::Invalid(e.to_string()))?;
            data["$patch"] = json!("replace");
            let mut labels = template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            labels.insert(REVISION_HASH.into(), hash.clone());
            let cr = ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(format!("{owner_name}-{hash}")),
                    namespace: Some(ns.into()),
                    labels: Some(labels),
                    owner_references: Some(vec![util::owner_ref("apps/v1", owner_kind, owner)]),
                    ..Default::default()
                },
                data: Some(RawExtension(json!({"spec": {"template": data}}))),
                revision: max + 1,
            };
            match api.create(&PostParams::default(), &cr).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            max + 1
        }
    };
    // History: keep the newest `history_limit` revisions that no pod uses.
    let mut old: Vec<&Arc<ControllerRevision>> = mine
        .iter()
        .filter(|r| {
            let h = r
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(REVISION_HASH));
            h != Some(&hash) && h.is_none_or(|h| !in_use.contains(&h.as_str()))
        })
        .collect();
    let keep = usize::try_from(history_limit.max(0)).unwrap_or(0);
    if old.len() > keep {
        old.sort_by_key(|r| r.revision);
        for r in &old[..old.len() - keep] {
            match api
                .delete(
                    r.metadata.name.as_deref().unwrap_or(""),
                    &DeleteParams::default(),
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok((hash, revision))
}

async fn sync(ctx: Arc<Ctx>, k: String) -> Result<Option<Duration>, ControllerError> {
    let (ns, name) = split_key(&k);
    let Some(ds) = ctx.daemonsets.get(ns, name) else {
        return Ok(None);
    };
    let Some(spec) = ds.spec.as_ref() else {
        return Ok(None);
    };
    if deleting(&ds.metadata) {
        return Ok(None);
    }
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let owned: Vec<Arc<Pod>> = ctx
        .pods
        .in_namespace(ns)
        .into_iter()
        .filter(|p| controller_ref(&p.metadata).is_some_and(|r| r.uid == uid))
        .collect();
    let in_use: Vec<&str> = owned.iter().filter_map(|p| pod_hash(p)).collect();
    let (hash, _rev) = ensure_revision(
        &ctx,
        ns,
        "DaemonSet",
        &ds.metadata,
        &spec.template,
        spec.revision_history_limit.unwrap_or(10),
        &in_use,
    )
    .await?;

    let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in &owned {
        if let Some(n) = pod_node(p) {
            by_node.entry(n).or_default().push(p.clone());
        }
    }
    let now = Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let mut requeue: Option<Duration> = None;
    let mut avail = |p: &Pod| match util::available(p, min_ready, now) {
        Ok(a) => a,
        Err(wait) => {
            requeue = Some(requeue.map_or(wait, |r: Duration| r.min(wait)));
            false
        }
    };
    let nodes = ctx.nodes.store.state();
    let mut create_on: Vec<String> = Vec::new();
    let mut to_delete: Vec<Arc<Pod>> = Vec::new();
    // (node, live pods) of eligible nodes.
    let mut eligible: Vec<(String, Vec<Arc<Pod>>)> = Vec::new();
    let (mut desired, mut current, mut misscheduled, mut ready, mut available, mut updated) =
        (0, 0, 0, 0, 0, 0);
    for node in &nodes {
        let nname = node.metadata.name.clone().unwrap_or_default();
        let pods: Vec<Arc<Pod>> = by_node.remove(&nname).unwrap_or_default();
        let live: Vec<Arc<Pod>> = pods
            .iter()
            .filter(|p| !deleting(&p.metadata))
            .cloned()
            .collect();
        if should_run(&spec.template, node) {
            desired += 1;
            // Failed pods are deleted and replaced.
            let (failed, live): (Vec<_>, Vec<_>) =
                live.into_iter().partition(|p| util::phase(p) == "Failed");
            to_delete.extend(failed);
            if !live.is_empty() {
                current += 1;
                if live.iter().any(|p| util::is_ready(p)) {
                    ready += 1;
                }
                if live.iter().any(|p| avail(p)) {
                    available += 1;
                }
                if live.iter().any(|p| pod_hash(p) == Some(&hash)) {
                    updated += 1;
                }
            } else if !pods.iter().any(|p| deleting(&p.metadata)) {
                create_on.push(nname.clone());
            }
            eligible.push((nname, live));
        } else if !live.is_empty() {
            misscheduled += 1;
            to_delete.extend(live);
        }
    }
    // Pods for nodes that no longer exist.
    for pods in by_node.into_values() {
        to_delete.extend(pods.into_iter().filter(|p| !deleting(&p.metadata)));
    }

    // Rolling update.
    let strategy = spec.update_strategy.as_ref();
    if strategy.and_then(|s| s.type_.as_deref()) != Some("OnDelete") {
        let ru = strategy.and_then(|s| s.rolling_update.as_ref());
        let max_surge =
            crate::deployment::resolve(ru.and_then(|r| r.max_surge.as_ref()), desired, true, "0");
        let max_unavail = crate::deployment::resolve(
            ru.and_then(|r| r.max_unavailable.as_ref()),
            desired,
            true,
            "1",
        );
        let max_unavail = if max_surge == 0 {
            max_unavail.max(1)
        } else {
            max_unavail
        };
        let mut unavailable_now = 0;
        let mut candidates: Vec<Arc<Pod>> = Vec::new();
        let mut surging = 0;
        for (nname, live) in &eligible {
            let new: Vec<&Arc<Pod>> = live.iter().filter(|p| pod_hash(p) == Some(&hash)).collect();
            let old: Vec<&Arc<Pod>> = live.iter().filter(|p| pod_hash(p) != Some(&hash)).collect();
            if live.is_empty() || !live.iter().any(|p| avail(p)) {
                unavailable_now += 1;
            }
            if old.is_empty() {
                // Extra pods of the current revision on one node.
                to_delete.extend(new.iter().skip(1).map(|p| (*p).clone()));
                continue;
            }
            if max_surge > 0 {
                if new.is_empty() {
                    if surging < max_surge {
                        create_on.push(nname.clone());
                        surging += 1;
                    }
                } else if new.iter().any(|p| avail(p)) {
                    to_delete.extend(old.into_iter().cloned());
                } else {
                    surging += 1;
                }
            } else if !old.iter().any(|p| avail(p)) {
                // Old and unavailable: replacing it costs nothing.
                to_delete.extend(old.into_iter().cloned());
            } else {
                candidates.extend(old.into_iter().cloned());
            }
        }
        let budget = usize::try_from((max_unavail - unavailable_now).max(0)).unwrap_or(0);
        to_delete.extend(candidates.into_iter().take(budget));
    } else {
        for (_, live) in &eligible {
            to_delete.extend(live.iter().skip(1).cloned());
        }
    }

    let mut err = None;
    let rec = ctx.events.component("daemonset-controller");
    for p in &to_delete {
        let was_live = !deleting(&p.metadata);
        match util::delete_pod(&pods_api, p).await {
            Ok(()) if was_live => rec.event(
                &*ds,
                NORMAL,
                "SuccessfulDelete",
                format!("Deleted pod: {}", p.metadata.name.as_deref().unwrap_or("")),
            ),
            Ok(()) => {}
            Err(e) => err = Some(e),
        }
    }
    let pp = PostParams::default();
    for n in &create_on {
        match pods_api.create(&pp, &pod_for(&ds, n, &hash)).await {
            Ok(p) => rec.event(
                &*ds,
                NORMAL,
                "SuccessfulCreate",
                format!("Created pod: {}", p.metadata.name.as_deref().unwrap_or("")),
            ),
            Err(e) => {
                let e = ControllerError::from(e);
                rec.event(
                    &*ds,
                    WARNING,
                    "FailedCreate",
                    format!("Error creating: {}", api_message(&e)),
                );
                err = Some(e);
            }
        }
    }

    let status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": current,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "numberAvailable": available,
        "numberUnavailable": desired - available,
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.metadata.generation.unwrap_or(0),
    });
    let cur = serde_json::to_value(ds.status.as_ref()).unwrap_or_default();
    let changed = status
        .as_object()
        .is_some_and(|m| m.iter().any(|(k, v)| cur.get(k).unwrap_or(&json!(0)) != v));
    if changed {
        let api = Api::<DaemonSet>::namespaced(ctx.client.clone(), ns);
        if !util::patch_status(&api, name, status).await? {
            return Ok(None);
        }
    }
    if let Some(e) = err {
        return Err(e);
    }
    Ok(requeue)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap_or_default()
    }

    fn tmpl(v: serde_json::Value) -> PodTemplateSpec {
        serde_json::from_value(json!({"spec": v})).unwrap_or_default()
    }

    #[test]
    fn eligibility() {
        let plain = node(json!({"metadata": {"name": "a", "labels": {"disk": "ssd"}}}));
        let tainted = node(json!({"metadata": {"name": "b"},
            "spec": {"taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]}}));
        let cordoned = node(
            json!({"metadata": {"name": "c"}, "spec": {"unschedulable": true,
            "taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
        );
        let any = tmpl(json!({"containers": []}));
        assert!(should_run(&any, &plain));
        assert!(!should_run(&any, &tainted));
        assert!(
            should_run(&any, &cordoned),
            "DaemonSets tolerate unschedulable"
        );
        let tol = tmpl(
            json!({"containers": [], "tolerations": [{"key": "gpu", "operator": "Equal", "value": "yes"}]}),
        );
        assert!(should_run(&tol, &tainted));
        let sel = tmpl(json!({"containers": [], "nodeSelector": {"disk": "hdd"}}));
        assert!(!should_run(&sel, &plain));
        let aff = tmpl(json!({"containers": [], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}}}));
        assert!(should_run(&aff, &plain));
        assert!(!should_run(&aff, &tainted));
    }
}
