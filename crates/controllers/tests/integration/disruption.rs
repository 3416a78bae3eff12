//! PodDisruptionBudget status (disruption controller) and the `pods/eviction` subresource that
//! honours it, against the real apiserver router and a memory store.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, EvictParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn rs(ns: &str, name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    })
}

fn pdb(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

async fn namespace(c: &common::Cluster, ns: &str) {
    c.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .await;
}

async fn get_pdb(c: &common::Cluster, ns: &str, name: &str) -> Value {
    c.get("policy/v1", "PodDisruptionBudget", Some(ns), name)
        .await
        .unwrap()
}

/// Waits until the PDB's status has these (expected, current, desired, allowed) numbers and
/// has observed its generation.
async fn wait_status(c: &common::Cluster, ns: &str, name: &str, want: (i64, i64, i64, i64)) {
    let what = format!("pdb {name} status {want:?}");
    let deadline = std::time::Instant::now() + T;
    loop {
        let p = get_pdb(c, ns, name).await;
        let s = &p["status"];
        let got = (
            s["expectedPods"].as_i64().unwrap_or(-1),
            s["currentHealthy"].as_i64().unwrap_or(-1),
            s["desiredHealthy"].as_i64().unwrap_or(-1),
            s["disruptionsAllowed"].as_i64().unwrap_or(-1),
        );
        if got == want && s["observedGeneration"] == p["metadata"]["generation"] {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; last status {s}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(p: &Value) -> (String, String) {
    let c = p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "DisruptionAllowed")
        .cloned()
        .unwrap_or(json!({}));
    (
        c["status"].as_str().unwrap_or("").into(),
        c["reason"].as_str().unwrap_or("").into(),
    )
}

/// Marks the first `n` (by name) pods of `ns` Running and Ready, the rest Running and not Ready.
async fn ready_pods(c: &common::Cluster, ns: &str, n: usize) {
    let api = Api::<Pod>::namespaced(c.client.clone(), ns);
    let mut pods = c.pods(ns).await;
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    for (i, p) in pods.iter().enumerate() {
        let ready = if i < n { "True" } else { "False" };
        let st = json!({"status": {"phase": "Running", "podIP": "10.42.0.9",
            "conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": now}]}});
        api.patch_status(
            p.metadata.name.as_deref().unwrap(),
            &PatchParams::default(),
            &Patch::Merge(st),
        )
        .await
        .unwrap();
    }
}

async fn evict(
    c: &common::Cluster,
    ns: &str,
    pod: &str,
    dry_run: bool,
) -> Result<(), Box<kube::core::Status>> {
    let api = Api::<Pod>::namespaced(c.client.clone(), ns);
    let ep = EvictParams {
        delete_options: Some(DeleteParams::default()),
        post_options: PostParams {
            dry_run,
            ..Default::default()
        },
    };
    match api.evict(pod, &ep).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(s),
        Err(e) => panic!("eviction of {pod}: {e}"),
    }
}

fn live(pods: &[Pod]) -> Vec<String> {
    let mut v: Vec<String> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn min_available_int_counts_ready_pods() {
    let c = common::cluster().await;
    namespace(&c, "pdb-int").await;
    c.create(rs("pdb-int", "web", 3)).await;
    c.wait("3 pods", T, || async { c.pods("pdb-int").await.len() == 3 })
        .await;
    ready_pods(&c, "pdb-int", 3).await;
    c.create(pdb(
        "pdb-int",
        "web",
        json!({"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}),
    ))
    .await;
    wait_status(&c, "pdb-int", "web", (3, 3, 2, 1)).await;
    assert_eq!(
        condition(&get_pdb(&c, "pdb-int", "web").await),
        ("True".into(), "SufficientPods".into())
    );
    // One pod stops being Ready: nothing may be disrupted any more.
    ready_pods(&c, "pdb-int", 2).await;
    wait_status(&c, "pdb-int", "web", (3, 2, 2, 0)).await;
    assert_eq!(
        condition(&get_pdb(&c, "pdb-int", "web").await),
        ("False".into(), "InsufficientPods".into())
    );
    // A spec change is observed (generation 2).
    c.patch(
        "policy/v1",
        "PodDisruptionBudget",
        Some("pdb-int"),
        "web",
        json!({"spec": {"minAvailable": 1}}),
    )
    .await;
    wait_status(&c, "pdb-int", "web", (3, 2, 1, 1)).await;
    assert_eq!(
        get_pdb(&c, "pdb-int", "web").await["metadata"]["generation"],
        2
    );
}

#[tokio::test]
async fn percent_and_max_unavailable_use_the_owners_scale() {
    let c = common::cluster().await;
    namespace(&c, "pdb-pct").await;
    c.create(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "pdb-pct"},
        "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "api"}},
            "template": {"metadata": {"labels": {"app": "api"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .await;
    c.wait("4 pods", T, || async { c.pods("pdb-pct").await.len() == 4 })
        .await;
    ready_pods(&c, "pdb-pct", 4).await;
    c.create(pdb(
        "pdb-pct",
        "half",
        json!({"minAvailable": "50%", "selector": {"matchLabels": {"app": "api"}}}),
    ))
    .await;
    c.create(pdb(
        "pdb-pct",
        "one",
        json!({"maxUnavailable": 1, "selector": {"matchLabels": {"app": "api"}}}),
    ))
    .await;
    c.create(pdb(
        "pdb-pct",
        "quarter",
        json!({"maxUnavailable": "30%", "selector": {"matchLabels": {"app": "api"}}}),
    ))
    .await;
    wait_status(&c, "pdb-pct", "half", (4, 4, 2, 2)).await;
    wait_status(&c, "pdb-pct", "one", (4, 4, 3, 1)).await;
    // 30% of 4 rounds up to 2 unavailable.
    wait_status(&c, "pdb-pct", "quarter", (4, 4, 2, 2)).await;
    // expectedPods follows the Deployment's replicas, not the pods that exist: scale to 6
    // while only the 4 old pods are Ready.
    c.patch(
        "apps/v1",
        "Deployment",
        Some("pdb-pct"),
        "api",
        json!({"spec": {"replicas": 6}}),
    )
    .await;
    wait_status(&c, "pdb-pct", "half", (6, 4, 3, 1)).await;
    wait_status(&c, "pdb-pct", "one", (6, 4, 5, 0)).await;
}

#[tokio::test]
async fn selector_rules_and_unmanaged_pods() {
    let c = common::cluster().await;
    namespace(&c, "pdb-sel").await;
    let pods = Api::<Pod>::namespaced(c.client.clone(), "pdb-sel");
    for n in ["a", "b"] {
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": n, "labels": {"x": n}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
        .unwrap();
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    ready_pods(&c, "pdb-sel", 2).await;
    // policy/v1: an empty selector selects every pod of the namespace...
    c.create(pdb(
        "pdb-sel",
        "all",
        json!({"minAvailable": 1, "selector": {}}),
    ))
    .await;
    wait_status(&c, "pdb-sel", "all", (2, 2, 1, 1)).await;
    // ... a missing one selects none.
    c.create(pdb("pdb-sel", "none", json!({"minAvailable": 1})))
        .await;
    wait_status(&c, "pdb-sel", "none", (0, 0, 1, 0)).await;
    c.wait("NoPods event", T, || async {
        c.list("v1", "Event", Some("pdb-sel"))
            .await
            .iter()
            .any(|e| {
                e["involvedObject"]["kind"] == "PodDisruptionBudget"
                    && e["involvedObject"]["name"] == "none"
                    && e["reason"] == "NoPods"
                    && e["message"] == "No matching pods found"
            })
    })
    .await;
    // Pods without a controller add nothing to a percentage's scale.
    c.create(pdb(
        "pdb-sel",
        "pct",
        json!({"minAvailable": "50%", "selector": {"matchLabels": {"x": "a"}}}),
    ))
    .await;
    wait_status(&c, "pdb-sel", "pct", (0, 1, 0, 1)).await;
}

#[tokio::test]
async fn eviction_honours_the_budget() {
    let c = common::cluster().await;
    namespace(&c, "pdb-ev").await;
    c.create(rs("pdb-ev", "web", 3)).await;
    c.wait("3 pods", T, || async { c.pods("pdb-ev").await.len() == 3 })
        .await;
    ready_pods(&c, "pdb-ev", 3).await;
    c.create(pdb(
        "pdb-ev",
        "web",
        json!({"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}),
    ))
    .await;
    wait_status(&c, "pdb-ev", "web", (3, 3, 2, 1)).await;
    let names = live(&c.pods("pdb-ev").await);

    // Not found.
    let e = evict(&c, "pdb-ev", "nope", false).await.unwrap_err();
    assert_eq!(e.code, 404);
    assert_eq!(e.message, "pods \"nope\" not found");
    // The body names another pod.
    let req = http::Request::post(format!(
        "/api/v1/namespaces/pdb-ev/pods/{}/eviction",
        names[0]
    ))
    .header("content-type", "application/json")
    .body(
        serde_json::to_vec(&json!({"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": "other", "namespace": "pdb-ev"}}))
        .unwrap(),
    )
    .unwrap();
    match c.client.request::<Value>(req).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 400);
            assert_eq!(
                s.message,
                "name in URL does not match name in Eviction object"
            );
        }
        other => panic!("eviction with a mismatched name: {other:?}"),
    }

    // dryRun: allowed, but nothing changes.
    evict(&c, "pdb-ev", &names[0], true).await.unwrap();
    assert_eq!(live(&c.pods("pdb-ev").await), names);
    assert_eq!(
        get_pdb(&c, "pdb-ev", "web").await["status"]["disruptionsAllowed"],
        1
    );

    // Allowed: the pod goes and the budget is used.
    evict(&c, "pdb-ev", &names[0], false).await.unwrap();
    assert!(!live(&c.pods("pdb-ev").await).contains(&names[0]));
    // The replacement pod is not Ready yet: no disruption left.
    c.wait("replacement pod", T, || async {
        c.pods("pdb-ev").await.len() == 3
    })
    .await;
    wait_status(&c, "pdb-ev", "web", (3, 2, 2, 0)).await;
    let e = evict(&c, "pdb-ev", &names[1], false).await.unwrap_err();
    assert_eq!(e.code, 429);
    assert_eq!(e.reason, "TooManyRequests");
    assert_eq!(
        e.message,
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    let causes = e.details.as_ref().unwrap().causes.clone();
    assert_eq!(causes.len(), 1);
    assert_eq!(causes[0].reason, "DisruptionBudget");
    assert_eq!(
        causes[0].message,
        "The disruption budget web needs 2 healthy pods and has 2 currently"
    );
    assert!(live(&c.pods("pdb-ev").await).contains(&names[1]));

    // The not-Ready replacement may go (IfHealthyBudget: the budget is met without it).
    let fresh: Vec<String> = live(&c.pods("pdb-ev").await)
        .into_iter()
        .filter(|n| !names.contains(n))
        .collect();
    assert_eq!(fresh.len(), 1);
    let api = Api::<Pod>::namespaced(c.client.clone(), "pdb-ev");
    api.patch_status(
        &fresh[0],
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}]}})),
    )
    .await
    .unwrap();
    evict(&c, "pdb-ev", &fresh[0], false).await.unwrap();

    // A second budget over the same pods: kube-apiserver refuses with 500.
    c.create(pdb(
        "pdb-ev",
        "web2",
        json!({"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}),
    ))
    .await;
    let e = evict(&c, "pdb-ev", &names[1], false).await.unwrap_err();
    assert_eq!(e.code, 500);
    assert_eq!(
        e.message,
        "Internal error occurred: This pod has more than one PodDisruptionBudget, which the eviction subresource does not support."
    );
}

#[tokio::test]
async fn eviction_waits_for_the_controller_and_frees_pending_pods() {
    let c = common::cluster().await;
    namespace(&c, "pdb-gen").await;
    c.create(rs("pdb-gen", "web", 2)).await;
    c.wait("2 pods", T, || async { c.pods("pdb-gen").await.len() == 2 })
        .await;
    // A budget that allows nothing does not hold back pods that are not running.
    c.create(pdb(
        "pdb-gen",
        "web",
        json!({"maxUnavailable": 0, "selector": {"matchLabels": {"app": "web"}}}),
    ))
    .await;
    wait_status(&c, "pdb-gen", "web", (2, 0, 2, 0)).await;
    let names = live(&c.pods("pdb-gen").await);
    evict(&c, "pdb-gen", &names[0], false).await.unwrap();
    // An evicted pod on a node is marked as a disruption target while it terminates.
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "bound"},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]}}))
    .unwrap();
    let pods = Api::<Pod>::namespaced(c.client.clone(), "pdb-gen");
    pods.create(&PostParams::default(), &p).await.unwrap();
    pods.patch_status(
        "bound",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}})),
    )
    .await
    .unwrap();
    evict(&c, "pdb-gen", "bound", false).await.unwrap();
    let p = pods.get("bound").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    let dt = p
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "DisruptionTarget")
        .unwrap();
    assert_eq!(
        (
            dt.status.as_str(),
            dt.reason.as_deref(),
            dt.message.as_deref()
        ),
        (
            "True",
            Some("EvictionByEvictionAPI"),
            Some("Eviction API: evicting")
        )
    );
    // A budget whose spec changed but whose status has not caught up yet: 429 "still being
    // processed". Stop the controllers first so that the status stays behind.
    drop(c);
    let c2 = common::client().await;
    let cl = common::Cluster::from_client(c2);
    namespace(&cl, "pdb-gen").await;
    let pods = Api::<Pod>::namespaced(cl.client.clone(), "pdb-gen");
    let p: Pod =
        serde_json::from_value(json!({"metadata": {"name": "p", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
        .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    ready_pods(&cl, "pdb-gen", 1).await;
    cl.create(pdb(
        "pdb-gen",
        "web",
        json!({"minAvailable": 0, "selector": {"matchLabels": {"app": "web"}}}),
    ))
    .await;
    let e = evict(&cl, "pdb-gen", "p", false).await.unwrap_err();
    assert_eq!(e.code, 429);
    assert_eq!(
        e.details.as_ref().unwrap().causes[0].message,
        "The disruption budget web is still being processed by the server."
    );
}
