//! Garbage collector: background, orphan and foreground deletion of a Deployment's tree.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, PropagationPolicy};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn deploy(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    })
}

async fn setup(c: &common::Cluster, name: &str) -> Api<DynamicObject> {
    c.create(deploy(name)).await;
    c.wait("2 pods", T, || async {
        c.pods("default").await.len() == 2
            && c.list("apps/v1", "ReplicaSet", Some("default")).await.len() == 1
    })
    .await;
    c.dyn_api("apps/v1", "Deployment", Some("default"))
}

async fn delete(api: &Api<DynamicObject>, name: &str, p: PropagationPolicy) {
    api.delete(
        name,
        &DeleteParams {
            propagation_policy: Some(p),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn background_deletes_dependents() {
    let c = common::cluster().await;
    let api = setup(&c, "bg").await;
    delete(&api, "bg", PropagationPolicy::Background).await;
    c.wait("replica sets and pods gone", T, || async {
        c.pods("default").await.is_empty()
            && c.list("apps/v1", "ReplicaSet", Some("default"))
                .await
                .is_empty()
    })
    .await;
}

#[tokio::test]
async fn orphan_keeps_dependents_without_owner() {
    let c = common::cluster().await;
    let api = setup(&c, "or").await;
    delete(&api, "or", PropagationPolicy::Orphan).await;
    c.wait("deployment gone", T, || async {
        c.get("apps/v1", "Deployment", Some("default"), "or")
            .await
            .is_none()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = c.list("apps/v1", "ReplicaSet", Some("default")).await;
    assert_eq!(rss.len(), 1);
    assert!(
        rss[0]["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|a| a.is_empty())
    );
    assert_eq!(c.pods("default").await.len(), 2);
}

#[tokio::test]
async fn foreground_deletes_children_first() {
    let c = common::cluster().await;
    let api = setup(&c, "fg").await;
    // A finalizer on one pod holds the whole chain.
    let pod = c.pods("default").await[0].metadata.name.clone().unwrap();
    c.patch(
        "v1",
        "Pod",
        Some("default"),
        &pod,
        json!({"metadata": {"finalizers": ["test.skiff.dev/hold"]}}),
    )
    .await;
    delete(&api, "fg", PropagationPolicy::Foreground).await;
    c.wait("other pod gone", T, || async {
        c.pods("default").await.len() == 1
    })
    .await;
    let d = c
        .get("apps/v1", "Deployment", Some("default"), "fg")
        .await
        .unwrap();
    assert!(d["metadata"]["deletionTimestamp"].is_string());
    assert!(
        d["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "foregroundDeletion")
    );
    assert_eq!(
        c.list("apps/v1", "ReplicaSet", Some("default")).await.len(),
        1
    );
    c.patch(
        "v1",
        "Pod",
        Some("default"),
        &pod,
        json!({"metadata": {"finalizers": null}}),
    )
    .await;
    c.wait("everything gone", T, || async {
        c.get("apps/v1", "Deployment", Some("default"), "fg")
            .await
            .is_none()
            && c.pods("default").await.is_empty()
            && c.list("apps/v1", "ReplicaSet", Some("default"))
                .await
                .is_empty()
    })
    .await;
}
