//! DaemonSet controller against the real apiserver router and a memory store, with Node
//! objects and no kubelet (the test marks pods Ready).
#![allow(clippy::unwrap_used)]

use crate::common::{self, Cluster};

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);
const NS: &str = "default";

fn ds(name: &str, strategy: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": name}}, "updateStrategy": strategy,
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}}})
}

async fn node(c: &Cluster, name: &str, spec: Value) {
    c.create(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name,
        "labels": {"kubernetes.io/hostname": name}}, "spec": spec}),
    )
    .await;
}

fn target(p: &Pod) -> String {
    let t = &p
        .spec
        .as_ref()
        .unwrap()
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms[0];
    let f = &t.match_fields.as_ref().unwrap()[0];
    assert_eq!(
        (f.key.as_str(), f.operator.as_str()),
        ("metadata.name", "In")
    );
    f.values.as_ref().unwrap()[0].clone()
}

async fn live(c: &Cluster) -> Vec<Pod> {
    c.pods(NS)
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

async fn nodes_with_pods(c: &Cluster) -> Vec<String> {
    let mut v: Vec<String> = live(c).await.iter().map(target).collect();
    v.sort();
    v
}

fn hash(p: &Pod) -> String {
    p.metadata.labels.as_ref().unwrap()["controller-revision-hash"].clone()
}

async fn get_ds(c: &Cluster, name: &str) -> Value {
    c.get("apps/v1", "DaemonSet", Some(NS), name).await.unwrap()
}

fn rolled_out(d: &Value, n: i64) -> bool {
    let s = &d["status"];
    s["observedGeneration"] == d["metadata"]["generation"]
        && s["desiredNumberScheduled"] == n
        && s["updatedNumberScheduled"] == n
        && s["numberAvailable"] == n
        && s["currentNumberScheduled"] == n
}

#[tokio::test]
async fn one_pod_per_eligible_node() {
    let c = common::cluster().await;
    node(&c, "a", json!({})).await;
    node(
        &c,
        "b",
        json!({"taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]}),
    )
    .await;
    node(
        &c,
        "c",
        json!({"unschedulable": true, "taints": [
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}),
    )
    .await;
    c.create(ds("agent", json!({"type": "RollingUpdate"})))
        .await;
    c.wait("pods on a and c", T, || async {
        nodes_with_pods(&c).await == ["a", "c"]
    })
    .await;
    let pods = live(&c).await;
    for p in &pods {
        let l = p.metadata.labels.as_ref().unwrap();
        assert_eq!(l["pod-template-generation"], "1");
        assert!(!l["controller-revision-hash"].is_empty());
        let r = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((r.kind.as_str(), r.controller), ("DaemonSet", Some(true)));
        let tols = p.spec.as_ref().unwrap().tolerations.as_ref().unwrap();
        for (k, e) in [
            ("node.kubernetes.io/not-ready", "NoExecute"),
            ("node.kubernetes.io/unreachable", "NoExecute"),
            ("node.kubernetes.io/disk-pressure", "NoSchedule"),
            ("node.kubernetes.io/memory-pressure", "NoSchedule"),
            ("node.kubernetes.io/pid-pressure", "NoSchedule"),
            ("node.kubernetes.io/unschedulable", "NoSchedule"),
        ] {
            assert!(
                tols.iter().any(|t| t.key.as_deref() == Some(k)
                    && t.effect.as_deref() == Some(e)
                    && t.operator.as_deref() == Some("Exists")),
                "toleration {k}:{e}"
            );
        }
    }
    let revs = c.list("apps/v1", "ControllerRevision", Some(NS)).await;
    assert_eq!(revs.len(), 1);
    assert_eq!(
        revs[0]["metadata"]["labels"]["controller-revision-hash"],
        hash(&pods[0]).as_str()
    );
    assert_eq!(revs[0]["revision"], 1);
    c.mark_ready(NS).await;
    c.wait("status 2/2", T, || async {
        let d = get_ds(&c, "agent").await;
        rolled_out(&d, 2)
            && d["status"]["numberReady"] == 2
            && d["status"]["numberMisscheduled"] == 0
    })
    .await;
    // A new node gets a pod; a node that stops being eligible loses it.
    node(&c, "d", json!({})).await;
    c.wait("pod on d", T, || async {
        nodes_with_pods(&c).await == ["a", "c", "d"]
    })
    .await;
    c.patch(
        "v1",
        "Node",
        None,
        "a",
        json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoExecute"}]}}),
    )
    .await;
    c.wait("pod leaves a", T, || async {
        nodes_with_pods(&c).await == ["c", "d"]
    })
    .await;
    c.mark_ready(NS).await;
    c.wait("status 2 desired", T, || async {
        let d = get_ds(&c, "agent").await;
        rolled_out(&d, 2) && d["status"]["numberMisscheduled"] == 0
    })
    .await;
}

#[tokio::test]
async fn rolling_update_replaces_pods_one_at_a_time() {
    let c = common::cluster().await;
    for n in ["a", "b", "c"] {
        node(&c, n, json!({})).await;
    }
    c.create(ds(
        "roll",
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}),
    ))
    .await;
    c.wait("3 pods", T, || async { live(&c).await.len() == 3 })
        .await;
    c.mark_ready(NS).await;
    c.wait("rolled out", T, || async {
        rolled_out(&get_ds(&c, "roll").await, 3)
    })
    .await;
    let old_hash = hash(&live(&c).await[0]);
    c.patch(
        "apps/v1",
        "DaemonSet",
        Some(NS),
        "roll",
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}}}),
    )
    .await;
    let max_old_missing = std::cell::Cell::new(0usize);
    c.wait(
        "all pods on the new revision",
        Duration::from_secs(20),
        || {
            let c = &c;
            let old_hash = old_hash.clone();
            let max_old_missing = &max_old_missing;
            async move {
                // Count how many nodes lack an available pod before marking new pods Ready.
                let pods = live(c).await;
                let ready = pods
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .count();
                max_old_missing.set(max_old_missing.get().max(3usize.saturating_sub(ready)));
                c.mark_ready(NS).await;
                let d = get_ds(c, "roll").await;
                rolled_out(&d, 3) && pods.iter().all(|p| hash(p) != old_hash) && pods.len() == 3
            }
        },
    )
    .await;
    assert!(
        max_old_missing.get() <= 1,
        "at most maxUnavailable=1 node without a ready pod"
    );
    let pods = live(&c).await;
    assert!(
        pods.iter()
            .all(|p| p.metadata.labels.as_ref().unwrap()["pod-template-generation"] == "2")
    );
    assert_eq!(
        c.list("apps/v1", "ControllerRevision", Some(NS))
            .await
            .len(),
        2
    );
}

#[tokio::test]
async fn surge_starts_new_pod_before_old_goes() {
    let c = common::cluster().await;
    node(&c, "a", json!({})).await;
    c.create(ds(
        "surge",
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}),
    ))
    .await;
    c.wait("1 pod", T, || async { live(&c).await.len() == 1 })
        .await;
    c.mark_ready(NS).await;
    c.wait("rolled out", T, || async {
        rolled_out(&get_ds(&c, "surge").await, 1)
    })
    .await;
    c.patch(
        "apps/v1",
        "DaemonSet",
        Some(NS),
        "surge",
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}}}),
    )
    .await;
    c.wait("old and new pod side by side", T, || async {
        live(&c).await.len() == 2
    })
    .await;
    c.mark_ready(NS).await;
    c.wait("old pod gone", T, || async {
        live(&c).await.len() == 1 && rolled_out(&get_ds(&c, "surge").await, 1)
    })
    .await;
}

#[tokio::test]
async fn on_delete_waits_for_manual_deletion() {
    let c = common::cluster().await;
    node(&c, "a", json!({})).await;
    c.create(ds("manual", json!({"type": "OnDelete"}))).await;
    c.wait("1 pod", T, || async { live(&c).await.len() == 1 })
        .await;
    let first = live(&c).await.remove(0);
    c.patch(
        "apps/v1",
        "DaemonSet",
        Some(NS),
        "manual",
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}}}),
    )
    .await;
    c.wait("observed generation 2", T, || async {
        get_ds(&c, "manual").await["status"]["observedGeneration"] == 2
    })
    .await;
    let pods = live(&c).await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].metadata.name, first.metadata.name);
    assert_eq!(
        get_ds(&c, "manual").await["status"]["updatedNumberScheduled"],
        0
    );
    c.dyn_api("v1", "Pod", Some(NS))
        .delete(first.metadata.name.as_deref().unwrap(), &Default::default())
        .await
        .unwrap();
    c.wait("replaced on the new revision", T, || async {
        let pods = live(&c).await;
        pods.len() == 1
            && pods[0].metadata.name != first.metadata.name
            && hash(&pods[0]) != hash(&first)
    })
    .await;
}
