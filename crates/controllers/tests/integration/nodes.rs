//! Node IPAM and node lifecycle (lease expiry, taints, eviction by tolerationSeconds).
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

async fn node(c: &common::Cluster, name: &str) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    c.create(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "lastHeartbeatTime": now, "lastTransitionTime": now}]}}),
    )
    .await;
    c.create(
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro()}}),
    )
    .await;
}

fn micro() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

async fn pod(c: &common::Cluster, name: &str, node: &str, tolerations: Value) {
    c.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "tolerations": tolerations, "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": "busybox"}]}}))
        .await;
}

#[tokio::test]
async fn pod_cidrs_are_distinct_and_stable() {
    let c = common::cluster().await;
    for n in ["a", "b", "c"] {
        c.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}))
            .await;
    }
    c.wait("3 pod cidrs", T, || async {
        let nodes = c.list("v1", "Node", None).await;
        let mut cidrs: Vec<String> = nodes
            .iter()
            .filter_map(|n| n["spec"]["podCIDR"].as_str().map(str::to_string))
            .collect();
        cidrs.sort();
        cidrs == ["10.42.0.0/24", "10.42.1.0/24", "10.42.2.0/24"]
            && nodes
                .iter()
                .all(|n| n["spec"]["podCIDRs"][0] == n["spec"]["podCIDR"])
    })
    .await;
}

#[tokio::test]
async fn lost_lease_taints_node_and_evicts_pods() {
    let c = common::cluster().await;
    node(&c, "alive").await;
    node(&c, "dead").await;
    let tol = |s: i64| {
        json!([{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
        "effect": "NoExecute", "tolerationSeconds": s}])
    };
    pod(&c, "patient", "dead", tol(2)).await;
    pod(&c, "stubborn", "dead", tol(3600)).await;
    // Admission gives pods without one a 300 s unreachable toleration (DefaultTolerationSeconds),
    // so "impatient" asks for 0 s explicitly.
    pod(&c, "impatient", "dead", tol(0)).await;
    pod(&c, "safe", "alive", json!([])).await;
    // Renew only the live node's lease.
    let api = c.dyn_api("coordination.k8s.io/v1", "Lease", Some("kube-node-lease"));
    let renew = tokio::spawn(async move {
        loop {
            let _ = api
                .patch(
                    "alive",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"spec": {"renewTime": micro()}})),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    c.wait("dead node Unknown and tainted", T, || async {
        let n = c.get("v1", "Node", None, "dead").await.unwrap();
        let ready = n["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["type"] == "Ready")
            .unwrap()
            .clone();
        ready["status"] == "Unknown"
            && ready["reason"] == "NodeStatusUnknown"
            && n["spec"]["taints"].as_array().is_some_and(|t| {
                t.iter().any(|x| {
                    x["key"] == "node.kubernetes.io/unreachable" && x["effect"] == "NoExecute"
                })
            })
    })
    .await;
    let alive = c.get("v1", "Node", None, "alive").await.unwrap();
    assert!(
        alive["spec"]["taints"]
            .as_array()
            .is_none_or(|t| t.is_empty())
    );
    let names = || async {
        let mut v: Vec<String> = c
            .pods("default")
            .await
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.metadata.name.unwrap())
            .collect();
        v.sort();
        v
    };
    c.wait("impatient and patient evicted", T, || async {
        names().await == ["safe", "stubborn"]
    })
    .await;
    renew.abort();
}

#[tokio::test]
async fn leader_election_has_one_holder_and_fails_over() {
    use skiff_controllers::leader::{LeaderConfig, run_elected};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let client = common::client().await;
    let running = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..2 {
        let mut cfg = LeaderConfig::new("test-lease", &format!("cand-{i}"));
        cfg.lease_duration = Duration::from_secs(2);
        cfg.renew_deadline = Duration::from_millis(1500);
        cfg.retry_period = Duration::from_millis(200);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        let (running, max) = (running.clone(), max.clone());
        tasks.push(tokio::spawn(run_elected(
            client.clone(),
            cfg,
            async {
                let _ = rx.await;
            },
            move |mut stop| {
                let (running, max) = (running.clone(), max.clone());
                async move {
                    let n = running.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(n, Ordering::SeqCst);
                    let _ = stop.wait_for(|s| *s).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                }
            },
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(running.load(Ordering::SeqCst), 1);
    let api = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        client.clone(),
        "kube-system",
    );
    let holder = api
        .get("test-lease")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    let idx: usize = holder.strip_prefix("cand-").unwrap().parse().unwrap();
    // Stop the leader: it releases the lease and the other takes over.
    let _ = stops.remove(idx).send(());
    tasks.remove(idx).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(running.load(Ordering::SeqCst), 1);
    let holder2 = api
        .get("test-lease")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    assert_ne!(holder, holder2);
    assert_eq!(max.load(Ordering::SeqCst), 1, "two leaders at once");
    drop(stops);
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn pressure_conditions_taint_the_node_no_schedule() {
    let c = common::cluster().await;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = |disk: &str| {
        json!({"conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "lastHeartbeatTime": now, "lastTransitionTime": now},
            {"type": "DiskPressure", "status": disk, "reason": "KubeletHasDiskPressure",
             "lastHeartbeatTime": now, "lastTransitionTime": now}]})
    };
    c.create(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "full"},
        "spec": {"taints": [{"key": "mine", "value": "x", "effect": "NoSchedule"}]},
        "status": status("True")}),
    )
    .await;
    let taint_keys = || async {
        let n = c.get("v1", "Node", None, "full").await.unwrap_or_default();
        n["spec"]["taints"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| {
                        format!(
                            "{}:{}",
                            t["key"].as_str().unwrap_or(""),
                            t["effect"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    c.wait("disk-pressure taint", T, || async {
        taint_keys().await
            == [
                "mine:NoSchedule",
                "node.kubernetes.io/disk-pressure:NoSchedule",
            ]
    })
    .await;
    let api = c.dyn_api("v1", "Node", None);
    api.patch_status(
        "full",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"status": status("False")})),
    )
    .await
    .unwrap();
    c.wait(
        "disk-pressure taint removed, the user's kept",
        T,
        || async { taint_keys().await == ["mine:NoSchedule"] },
    )
    .await;
}
