//! Per-namespace defaults (the `default` ServiceAccount, `kube-root-ca.crt`) and PodGC.

use crate::common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use skiff_controllers::ControllerConfig;

const T: Duration = Duration::from_secs(20);
const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n";

fn config() -> ControllerConfig {
    ControllerConfig {
        root_ca_pem: Some(CA.into()),
        podgc_period: Duration::from_millis(200),
        podgc_quarantine: Duration::from_millis(500),
        terminated_pod_gc_threshold: 2,
        ..common::fast_config()
    }
}

#[tokio::test]
async fn every_namespace_gets_default_service_account_and_root_ca() {
    let c = common::cluster_with(config()).await;
    c.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}))
        .await;
    for ns in ["default", "kube-system", "team"] {
        c.wait(&format!("default SA in {ns}"), T, || async {
            c.get("v1", "ServiceAccount", Some(ns), "default")
                .await
                .is_some()
        })
        .await;
        c.wait(&format!("kube-root-ca.crt in {ns}"), T, || async {
            c.get("v1", "ConfigMap", Some(ns), "kube-root-ca.crt")
                .await
                .is_some_and(|cm| cm["data"]["ca.crt"] == CA)
        })
        .await;
    }
    // Deleted: re-created. Edited: restored.
    let uid = c
        .get("v1", "ServiceAccount", Some("team"), "default")
        .await
        .unwrap()["metadata"]["uid"]
        .clone();
    c.dyn_api("v1", "ServiceAccount", Some("team"))
        .delete("default", &DeleteParams::default())
        .await
        .unwrap();
    c.wait("default SA re-created", T, || async {
        c.get("v1", "ServiceAccount", Some("team"), "default")
            .await
            .is_some_and(|sa| sa["metadata"]["uid"] != uid)
    })
    .await;
    c.patch(
        "v1",
        "ConfigMap",
        Some("team"),
        "kube-root-ca.crt",
        json!({"data": {"ca.crt": "tampered"}}),
    )
    .await;
    c.wait("kube-root-ca.crt restored", T, || async {
        c.get("v1", "ConfigMap", Some("team"), "kube-root-ca.crt")
            .await
            .is_some_and(|cm| cm["data"]["ca.crt"] == CA)
    })
    .await;
    // Other service accounts and config maps are left alone.
    c.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "builder", "namespace": "team"}}))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.list("v1", "ServiceAccount", Some("team")).await.len(), 2);
}

async fn pod(c: &common::Cluster, name: &str, node: &str) {
    c.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}))
        .await;
}

async fn set_phase(c: &common::Cluster, name: &str, phase: &str) {
    Api::<Pod>::namespaced(c.client.clone(), "default")
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": phase}})),
        )
        .await
        .unwrap();
}

async fn names(c: &common::Cluster) -> Vec<String> {
    let mut v: Vec<String> = c
        .pods("default")
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn podgc_removes_orphans_and_old_terminated_pods() {
    let c = common::cluster_with(config()).await;
    c.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}))
        .await;
    pod(&c, "live", "n1").await;
    pod(&c, "orphan", "ghost").await;
    c.wait("orphan of a node that never existed removed", T, || async {
        names(&c).await == ["live"]
    })
    .await;
    // Terminated pods beyond the threshold (2) go, oldest first; running ones stay.
    for n in ["done-1", "done-2", "done-3", "done-4"] {
        pod(&c, n, "n1").await;
        set_phase(&c, n, if n == "done-2" { "Failed" } else { "Succeeded" }).await;
        // creationTimestamp has one-second resolution: space them so the order is defined.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    c.wait("two oldest terminated pods removed", T, || async {
        names(&c).await == ["done-3", "done-4", "live"]
    })
    .await;
    // A node deleted: its pods go after the quarantine.
    c.dyn_api("v1", "Node", None)
        .delete("n1", &DeleteParams::default())
        .await
        .unwrap();
    c.wait("pods of the deleted node removed", T, || async {
        names(&c).await.is_empty()
    })
    .await;
}
