//! StatefulSet controller against the real apiserver router and a memory store; the test
//! marks pods Running and Ready.
#![allow(clippy::unwrap_used)]

use crate::common::{self, Cluster};

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);
const NS: &str = "default";

fn sts(name: &str, replicas: i64, extra: Value) -> Value {
    let mut spec = json!({"replicas": replicas, "serviceName": name,
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}},
        "volumeClaimTemplates": [{"metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}}}}]});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

async fn names(c: &Cluster) -> Vec<String> {
    let mut v: Vec<String> = c
        .pods(NS)
        .await
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    v.sort();
    v
}

async fn pod(c: &Cluster, name: &str) -> Pod {
    c.pods(NS)
        .await
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .unwrap()
}

async fn claims(c: &Cluster) -> Vec<String> {
    let mut v: Vec<String> = c
        .list("v1", "PersistentVolumeClaim", Some(NS))
        .await
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

async fn get_sts(c: &Cluster, name: &str) -> Value {
    c.get("apps/v1", "StatefulSet", Some(NS), name)
        .await
        .unwrap()
}

fn rev(p: &Pod) -> String {
    p.metadata.labels.as_ref().unwrap()["controller-revision-hash"].clone()
}

#[tokio::test]
async fn ordered_ready_creates_in_order_and_scales_down_in_reverse() {
    let c = common::cluster().await;
    c.create(sts("web", 3, json!({}))).await;
    c.wait("web-0", T, || async { names(&c).await == ["web-0"] })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        names(&c).await,
        ["web-0"],
        "web-1 waits for web-0 to be Ready"
    );
    let p = pod(&c, "web-0").await;
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(spec.hostname.as_deref(), Some("web-0"));
    assert_eq!(spec.subdomain.as_deref(), Some("web"));
    let l = p.metadata.labels.as_ref().unwrap();
    assert_eq!(l["statefulset.kubernetes.io/pod-name"], "web-0");
    assert_eq!(l["apps.kubernetes.io/pod-index"], "0");
    let vol = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "data")
        .unwrap();
    assert_eq!(
        vol.persistent_volume_claim.as_ref().unwrap().claim_name,
        "data-web-0"
    );
    assert_eq!(claims(&c).await, ["data-web-0"]);
    for next in [["web-0", "web-1"].as_slice(), &["web-0", "web-1", "web-2"]] {
        c.mark_ready(NS).await;
        c.wait("next ordinal", T, || async { names(&c).await == next })
            .await;
    }
    c.mark_ready(NS).await;
    c.wait("status 3 ready, one revision", T, || async {
        let s = get_sts(&c, "web").await;
        let st = &s["status"];
        st["replicas"] == 3
            && st["readyReplicas"] == 3
            && st["availableReplicas"] == 3
            && st["updatedReplicas"] == 3
            && st["currentReplicas"] == 3
            && st["currentRevision"] == st["updateRevision"]
            && st["updateRevision"].as_str().unwrap().starts_with("web-")
            && st["observedGeneration"] == 1
    })
    .await;
    let s = get_sts(&c, "web").await;
    assert_eq!(
        rev(&pod(&c, "web-1").await),
        s["status"]["updateRevision"].as_str().unwrap()
    );
    assert_eq!(claims(&c).await, ["data-web-0", "data-web-1", "data-web-2"]);
    // Scale down: web-2 goes first, and web-1 only once web-2 is gone; claims stay
    // (retention Retain). A test finalizer holds each pod in Terminating to see the order.
    let hold = |on: bool| json!({"metadata": {"finalizers": if on { json!(["test/hold"]) } else { json!(null) }}});
    for n in ["web-1", "web-2"] {
        c.patch("v1", "Pod", Some(NS), n, hold(true)).await;
    }
    c.patch(
        "apps/v1",
        "StatefulSet",
        Some(NS),
        "web",
        json!({"spec": {"replicas": 1}}),
    )
    .await;
    let terminating = |n: &'static str| {
        let c = &c;
        async move { pod(c, n).await.metadata.deletion_timestamp.is_some() }
    };
    c.wait("web-2 terminating", T, || terminating("web-2"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !terminating("web-1").await,
        "web-1 waits until web-2 is gone"
    );
    c.patch("v1", "Pod", Some(NS), "web-2", hold(false)).await;
    c.wait("web-1 terminating", T, || terminating("web-1"))
        .await;
    c.patch("v1", "Pod", Some(NS), "web-1", hold(false)).await;
    c.wait("only web-0 left", T, || async {
        names(&c).await == ["web-0"]
    })
    .await;
    assert_eq!(claims(&c).await, ["data-web-0", "data-web-1", "data-web-2"]);
}

#[tokio::test]
async fn parallel_creates_all_at_once_and_scaled_claims_can_be_deleted() {
    let c = common::cluster().await;
    c.create(sts(
        "db",
        3,
        json!({"podManagementPolicy": "Parallel",
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Delete"}}),
    ))
    .await;
    c.wait("3 pods without waiting for Ready", T, || async {
        names(&c).await == ["db-0", "db-1", "db-2"]
    })
    .await;
    c.patch(
        "apps/v1",
        "StatefulSet",
        Some(NS),
        "db",
        json!({"spec": {"replicas": 1}}),
    )
    .await;
    c.wait("scaled to 1, its claims deleted", T, || async {
        names(&c).await == ["db-0"] && claims(&c).await == ["data-db-0"]
    })
    .await;
}

#[tokio::test]
async fn rolling_update_with_partition_in_reverse_order() {
    let c = common::cluster().await;
    c.create(sts(
        "app",
        3,
        json!({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}}),
    ))
    .await;
    for _ in 0..3 {
        c.mark_ready(NS).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.wait("3 ready", T, || async {
        c.mark_ready(NS).await;
        get_sts(&c, "app").await["status"]["readyReplicas"] == 3
    })
    .await;
    let old_rev = rev(&pod(&c, "app-0").await);
    c.patch(
        "apps/v1",
        "StatefulSet",
        Some(NS),
        "app",
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}}}),
    )
    .await;
    c.wait("app-2 and app-1 updated, app-0 kept", T, || async {
        c.mark_ready(NS).await;
        let s = get_sts(&c, "app").await;
        let st = &s["status"];
        let ps = c.pods(NS).await;
        let r = |n: &str| {
            ps.iter()
                .find(|p| {
                    p.metadata.name.as_deref() == Some(n) && p.metadata.deletion_timestamp.is_none()
                })
                .map(rev)
        };
        st["updatedReplicas"] == 2
            && st["readyReplicas"] == 3
            && r("app-0") == Some(old_rev.clone())
            && r("app-1").is_some_and(|x| x != old_rev)
            && r("app-2").is_some_and(|x| x != old_rev)
            && st["currentRevision"] == old_rev.as_str()
            && st["updateRevision"] != old_rev.as_str()
    })
    .await;
    c.patch(
        "apps/v1",
        "StatefulSet",
        Some(NS),
        "app",
        json!({"spec": {"updateStrategy": {"rollingUpdate": {"partition": 0}}}}),
    )
    .await;
    c.wait("all updated, currentRevision moves", T, || async {
        c.mark_ready(NS).await;
        let s = get_sts(&c, "app").await;
        let st = &s["status"];
        st["updatedReplicas"] == 3
            && st["readyReplicas"] == 3
            && st["currentRevision"] == st["updateRevision"]
            && st["observedGeneration"] == s["metadata"]["generation"]
    })
    .await;
    assert_eq!(
        c.list("apps/v1", "ControllerRevision", Some(NS))
            .await
            .len(),
        2
    );
}
