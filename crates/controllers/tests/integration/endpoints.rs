//! Endpoints and EndpointSlice controllers.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

async fn pod(c: &common::Cluster, name: &str, ip: &str, ready: bool) {
    c.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "ports": [{"name": "http", "containerPort": 8080}]}]}}))
        .await;
    let st = json!({"status": {"phase": "Running", "podIP": ip,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
    c.dyn_api("v1", "Pod", Some("default"))
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(st),
        )
        .await
        .unwrap();
}

async fn slices(c: &common::Cluster) -> Vec<Value> {
    c.list("discovery.k8s.io/v1", "EndpointSlice", Some("default"))
        .await
        .into_iter()
        .filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == "web")
        .collect()
}

#[tokio::test]
async fn endpoints_and_slices_follow_pods() {
    let c = common::cluster().await;
    pod(&c, "a", "10.42.0.5", true).await;
    pod(&c, "b", "10.42.0.6", false).await;
    c.create(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
        .await;
    c.wait("endpoints", T, || async {
        let Some(e) = c.get("v1", "Endpoints", Some("default"), "web").await else {
            return false;
        };
        let s = &e["subsets"][0];
        s["addresses"][0]["ip"] == "10.42.0.5"
            && s["addresses"][0]["targetRef"]["name"] == "a"
            && s["notReadyAddresses"][0]["ip"] == "10.42.0.6"
            && s["ports"][0]["port"] == 8080
            && s["ports"][0]["name"] == "http"
    })
    .await;
    c.wait("slice", T, || async {
        let s = slices(&c).await;
        s.len() == 1
            && s[0]["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                == "endpointslice-controller.k8s.io"
            && s[0]["metadata"]["ownerReferences"][0]["kind"] == "Service"
            && s[0]["addressType"] == "IPv4"
            && s[0]["ports"][0]["port"] == 8080
            && s[0]["endpoints"].as_array().unwrap().len() == 2
            && s[0]["endpoints"][0]["conditions"]["ready"] == true
            && s[0]["endpoints"][1]["conditions"]["ready"] == false
    })
    .await;
    // A terminating pod stays in the slice as terminating, leaves Endpoints.
    c.patch(
        "v1",
        "Pod",
        Some("default"),
        "a",
        json!({"metadata": {"finalizers": ["test.skiff.dev/hold"]}}),
    )
    .await;
    c.dyn_api("v1", "Pod", Some("default"))
        .delete("a", &Default::default())
        .await
        .unwrap();
    c.wait("terminating", T, || async {
        let s = slices(&c).await;
        let e = c
            .get("v1", "Endpoints", Some("default"), "web")
            .await
            .unwrap();
        s.len() == 1
            && s[0]["endpoints"].as_array().unwrap().iter().any(|x| {
                x["addresses"][0] == "10.42.0.5"
                    && x["conditions"]["terminating"] == true
                    && x["conditions"]["ready"] == false
                    && x["conditions"]["serving"] == true
            })
            && e["subsets"][0]["addresses"].is_null()
    })
    .await;
    c.patch(
        "v1",
        "Pod",
        Some("default"),
        "a",
        json!({"metadata": {"finalizers": null}}),
    )
    .await;
    // publishNotReadyAddresses makes the unready pod an address.
    c.patch(
        "v1",
        "Service",
        Some("default"),
        "web",
        json!({"spec": {"publishNotReadyAddresses": true}}),
    )
    .await;
    c.wait("published", T, || async {
        let e = c
            .get("v1", "Endpoints", Some("default"), "web")
            .await
            .unwrap();
        e["subsets"][0]["addresses"][0]["ip"] == "10.42.0.6"
    })
    .await;
    // Deleting the service removes both.
    c.dyn_api("v1", "Service", Some("default"))
        .delete("web", &Default::default())
        .await
        .unwrap();
    c.wait("cleaned", T, || async {
        c.get("v1", "Endpoints", Some("default"), "web")
            .await
            .is_none()
            && slices(&c).await.is_empty()
    })
    .await;
}
