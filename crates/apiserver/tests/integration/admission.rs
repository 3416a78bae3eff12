//! Pod admission through the router: Priority (priorityClassName, globalDefault, built-in
//! classes), DefaultTolerationSeconds, requests from limits and the default service account.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use http::{Method, Request};
use serde_json::{Value, json};
use skiff_apiserver::{ApiState, Config, Identity, router};
use tower::ServiceExt;

async fn api() -> axum::Router {
    let state = ApiState::new(skiff_store::memory(), Config::default())
        .await
        .unwrap();
    router(state)
}

async fn call(r: &axum::Router, method: Method, path: &str, body: Value) -> (u16, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    req.extensions_mut().insert(Identity {
        user: "admin".into(),
        groups: vec!["system:masters".into()],
        uid: String::new(),
    });
    let resp = r.clone().oneshot(req).await.unwrap();
    let code = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn pod(name: &str, extra: Value) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    if let (Some(spec), Some(extra)) = (p["spec"].as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    p
}

const PODS: &str = "/api/v1/namespaces/default/pods";

#[tokio::test]
async fn builtin_priority_classes_exist() {
    let r = api().await;
    let (code, pc) = call(
        &r,
        Method::GET,
        "/apis/scheduling.k8s.io/v1/priorityclasses/system-node-critical",
        Value::Null,
    )
    .await;
    assert_eq!(code, 200, "{pc}");
    assert_eq!(pc["value"], 2_000_001_000);
    assert_eq!(pc["preemptionPolicy"], "PreemptLowerPriority");
    let (code, pc) = call(
        &r,
        Method::GET,
        "/apis/scheduling.k8s.io/v1/priorityclasses/system-cluster-critical",
        Value::Null,
    )
    .await;
    assert_eq!(code, 200, "{pc}");
    assert_eq!(pc["value"], 2_000_000_000);
}

#[tokio::test]
async fn priority_class_name_sets_priority() {
    let r = api().await;
    let (code, p) = call(
        &r,
        Method::POST,
        PODS,
        pod("crit", json!({"priorityClassName": "system-node-critical"})),
    )
    .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["spec"]["priority"], 2_000_001_000);
    assert_eq!(p["spec"]["preemptionPolicy"], "PreemptLowerPriority");

    let (code, s) = call(
        &r,
        Method::POST,
        PODS,
        pod("bad", json!({"priorityClassName": "nope"})),
    )
    .await;
    assert_eq!(code, 403, "{s}");
    assert_eq!(s["kind"], "Status");
    assert_eq!(s["reason"], "Forbidden");
    assert_eq!(
        s["message"],
        "pods \"bad\" is forbidden: no PriorityClass with name nope was found"
    );

    // A class that never preempts, and a priority that disagrees with the class.
    let (code, _) = call(&r, Method::POST, "/apis/scheduling.k8s.io/v1/priorityclasses",
        json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "batch"},
               "value": 100, "preemptionPolicy": "Never"})).await;
    assert_eq!(code, 201);
    let (code, p) = call(
        &r,
        Method::POST,
        PODS,
        pod("b1", json!({"priorityClassName": "batch"})),
    )
    .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["spec"]["priority"], 100);
    assert_eq!(p["spec"]["preemptionPolicy"], "Never");
    let (code, s) = call(
        &r,
        Method::POST,
        PODS,
        pod("b2", json!({"priorityClassName": "batch", "priority": 5})),
    )
    .await;
    assert_eq!(code, 403, "{s}");
    assert!(
        s["message"].as_str().unwrap().contains("priority (5)"),
        "{s}"
    );
}

#[tokio::test]
async fn global_default_class_applies_without_a_name() {
    let r = api().await;
    let (code, p) = call(&r, Method::POST, PODS, pod("zero", json!({}))).await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["spec"]["priority"], 0);
    assert!(p["spec"].get("priorityClassName").is_none());
    let (code, _) = call(&r, Method::POST, "/apis/scheduling.k8s.io/v1/priorityclasses",
        json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "dflt"},
               "value": 1000, "globalDefault": true})).await;
    assert_eq!(code, 201);
    let (code, p) = call(&r, Method::POST, PODS, pod("d", json!({}))).await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["spec"]["priority"], 1000);
    assert_eq!(p["spec"]["priorityClassName"], "dflt");
    // Without a class name an explicit priority is kept (skiff is lenient here).
    let (code, p) = call(&r, Method::POST, PODS, pod("own", json!({"priority": 7}))).await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["spec"]["priority"], 7);
}

#[tokio::test]
async fn tolerations_requests_and_service_account() {
    let r = api().await;
    let mut p = pod(
        "t",
        json!({"tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10}]}),
    );
    p["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "500m", "memory": "32Mi"}});
    let (code, p) = call(&r, Method::POST, PODS, p).await;
    assert_eq!(code, 201, "{p}");
    let t = p["spec"]["tolerations"].as_array().unwrap();
    assert_eq!(t.len(), 2, "{t:?}");
    assert_eq!(t[0]["tolerationSeconds"], 10);
    assert_eq!(t[1]["key"], "node.kubernetes.io/unreachable");
    assert_eq!(t[1]["tolerationSeconds"], 300);
    assert_eq!(
        p["spec"]["containers"][0]["resources"]["requests"],
        json!({"cpu": "500m", "memory": "32Mi"})
    );
    assert_eq!(p["status"]["qosClass"], "Guaranteed");
    assert_eq!(p["spec"]["serviceAccountName"], "default");
    // An update does not re-add tolerations the user removed from a new object's template.
    let (code, d) = call(&r, Method::POST, "/apis/apps/v1/namespaces/default/deployments",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
               "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})).await;
    assert_eq!(code, 201, "{d}");
    assert!(
        d.pointer("/spec/template/spec/tolerations").is_none(),
        "{d}"
    );
}

#[tokio::test]
async fn metrics_count_requests() {
    let r = api().await;
    let (code, _) = call(&r, Method::POST, PODS, pod("m", json!({}))).await;
    assert_eq!(code, 201);
    let (code, _) = call(&r, Method::GET, &format!("{PODS}/missing"), Value::Null).await;
    assert_eq!(code, 404);
    let mut req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(Identity {
        user: "admin".into(),
        groups: vec!["system:masters".into()],
        uid: String::new(),
    });
    let resp = r.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("apiserver_request_total{code=\"201\",resource=\"pods\",verb=\"POST\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("apiserver_request_total{code=\"404\",resource=\"pods\",verb=\"GET\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "apiserver_request_duration_seconds_count{resource=\"pods\",verb=\"POST\"} 1"
        ),
        "{text}"
    );
}
