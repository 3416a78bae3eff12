//! ReplicaSet controller against the real apiserver router and a memory store.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn rs(name: &str, replicas: i64) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    })
}

fn active(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
}

#[tokio::test]
async fn creates_scales_and_reports_status() {
    let c = common::cluster().await;
    c.create(rs("web", 3)).await;
    c.wait("3 pods", T, || async { c.pods("default").await.len() == 3 })
        .await;
    for p in c.pods("default").await {
        let r = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(r.kind, "ReplicaSet");
        assert_eq!(r.name, "web");
        assert_eq!(r.controller, Some(true));
        assert_eq!(r.block_owner_deletion, Some(true));
        assert!(p.metadata.name.as_deref().unwrap().starts_with("web-"));
    }
    c.mark_ready("default").await;
    c.wait("status 3 ready", T, || async {
        let rs = c
            .get("apps/v1", "ReplicaSet", Some("default"), "web")
            .await
            .unwrap();
        rs["status"]["readyReplicas"] == 3
            && rs["status"]["availableReplicas"] == 3
            && rs["status"]["replicas"] == 3
            && rs["status"]["observedGeneration"] == rs["metadata"]["generation"]
    })
    .await;
    c.patch(
        "apps/v1",
        "ReplicaSet",
        Some("default"),
        "web",
        json!({"spec": {"replicas": 1}}),
    )
    .await;
    c.wait("1 pod left", T, || async {
        c.pods("default").await.iter().filter(|p| active(p)).count() == 1
    })
    .await;
    c.wait("status 1", T, || async {
        let rs = c
            .get("apps/v1", "ReplicaSet", Some("default"), "web")
            .await
            .unwrap();
        rs["status"]["replicas"] == 1 && rs["status"]["observedGeneration"] == 2
    })
    .await;
}

#[tokio::test]
async fn adopts_orphans_and_releases_relabelled_pods() {
    let c = common::cluster().await;
    c.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "stray", "namespace": "default", "labels": {"app": "db"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
        .await;
    c.create(rs("db", 2)).await;
    c.wait("2 pods, stray adopted", T, || async {
        let pods = c.pods("default").await;
        pods.len() == 2
            && pods.iter().any(|p| {
                p.metadata.name.as_deref() == Some("stray")
                    && p.metadata
                        .owner_references
                        .as_ref()
                        .is_some_and(|r| r[0].name == "db")
            })
    })
    .await;
    c.patch(
        "v1",
        "Pod",
        Some("default"),
        "stray",
        json!({"metadata": {"labels": {"app": "other"}}}),
    )
    .await;
    c.wait("stray released and replaced", T, || async {
        let pods = c.pods("default").await;
        let stray = pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("stray"));
        pods.len() == 3
            && stray.is_some_and(|p| {
                p.metadata
                    .owner_references
                    .as_ref()
                    .is_none_or(|r| r.is_empty())
            })
    })
    .await;
}

#[tokio::test]
async fn min_ready_seconds_delays_available() {
    let c = common::cluster().await;
    let mut r = rs("slow", 1);
    r["spec"]["minReadySeconds"] = json!(2);
    c.create(r).await;
    c.wait("1 pod", T, || async { c.pods("default").await.len() == 1 })
        .await;
    c.mark_ready("default").await;
    c.wait("ready but not available", T, || async {
        let rs = c
            .get("apps/v1", "ReplicaSet", Some("default"), "slow")
            .await
            .unwrap();
        rs["status"]["readyReplicas"] == 1 && rs["status"]["availableReplicas"] == 0
    })
    .await;
    c.wait("available after minReadySeconds", T, || async {
        let rs = c
            .get("apps/v1", "ReplicaSet", Some("default"), "slow")
            .await
            .unwrap();
        rs["status"]["availableReplicas"] == 1
    })
    .await;
}

#[tokio::test]
async fn replication_controller_keeps_its_pods() {
    let c = common::cluster().await;
    // No selector: the template's labels are the selector (v1 defaulting).
    c.create(json!({
        "apiVersion": "v1", "kind": "ReplicationController",
        "metadata": {"name": "legacy", "namespace": "default"},
        "spec": {"replicas": 2,
            "template": {"metadata": {"labels": {"app": "legacy"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .await;
    c.wait("2 pods", T, || async { c.pods("default").await.len() == 2 })
        .await;
    for p in c.pods("default").await {
        let r = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(r.kind, "ReplicationController");
        assert_eq!(r.api_version, "v1");
        assert_eq!(r.name, "legacy");
        assert_eq!(r.controller, Some(true));
    }
    c.mark_ready("default").await;
    c.wait("rc status 2 ready", T, || async {
        let rc = c
            .get("v1", "ReplicationController", Some("default"), "legacy")
            .await
            .unwrap();
        rc["status"]["readyReplicas"] == 2
            && rc["status"]["availableReplicas"] == 2
            && rc["status"]["replicas"] == 2
            && rc["status"]["observedGeneration"] == rc["metadata"]["generation"]
    })
    .await;
    // A ReplicaSet with the same labels does not take the RC's pods.
    c.create(rs("other", 0)).await;
    c.patch(
        "v1",
        "ReplicationController",
        Some("default"),
        "legacy",
        json!({"spec": {"replicas": 3}}),
    )
    .await;
    c.wait("3 pods", T, || async {
        c.pods("default").await.iter().filter(|p| active(p)).count() == 3
    })
    .await;
}
