//! The API router driven in-process (tower oneshot, memory store): status codes, Status bodies,
//! list/watch semantics, subresources and discovery, as a client sees them.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions may unwrap too

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use futures::StreamExt;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use skiff_apiserver::{ApiState, Config, Identity, router};
use tower::ServiceExt;

struct Api {
    router: axum::Router,
    store: Arc<dyn skiff_store::Store>,
}

fn admin() -> Identity {
    Identity {
        user: "system:admin".into(),
        groups: vec!["system:masters".into()],
        uid: String::new(),
    }
}

async fn api() -> Api {
    let store = skiff_store::memory();
    let config = Config {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let state = ApiState::new(store.clone(), config).await.unwrap();
    Api {
        router: router(state),
        store,
    }
}

impl Api {
    async fn send(
        &self,
        method: Method,
        path: &str,
        ct: &str,
        accept: &str,
        body: Vec<u8>,
    ) -> (StatusCode, http::HeaderMap, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path);
        if !ct.is_empty() {
            req = req.header("content-type", ct);
        }
        if !accept.is_empty() {
            req = req.header("accept", accept);
        }
        let mut req = req.body(Body::from(body)).unwrap();
        req.extensions_mut().insert(admin());
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (parts.status, parts.headers, bytes.to_vec())
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let (code, _, bytes) = self
            .send(
                method,
                path,
                "application/json",
                "application/json",
                body.map(|b| serde_json::to_vec(&b).unwrap())
                    .unwrap_or_default(),
            )
            .await;
        (
            code.as_u16(),
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn patch(&self, path: &str, ct: &str, body: Value) -> (u16, Value) {
        let (code, _, bytes) = self
            .send(
                Method::PATCH,
                path,
                ct,
                "application/json",
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        (
            code.as_u16(),
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Starts a watch and returns a stream of decoded events.
    async fn watch(
        &self,
        path: &str,
    ) -> std::pin::Pin<Box<dyn futures::Stream<Item = Value> + Send>> {
        let mut req = Request::builder().uri(path).body(Body::empty()).unwrap();
        req.extensions_mut().insert(admin());
        let resp = self.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut buf = Vec::new();
        let stream = resp.into_body().into_data_stream();
        Box::pin(
            stream
                .map(move |chunk| {
                    buf.extend_from_slice(&chunk.unwrap());
                    let mut out = Vec::new();
                    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        out.push(
                            serde_json::from_slice::<Value>(&line)
                                .expect("one JSON event per line"),
                        );
                    }
                    futures::stream::iter(out)
                })
                .flatten(),
        )
    }
}

async fn next_event(s: &mut (impl futures::Stream<Item = Value> + Unpin)) -> Value {
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("watch event within 5 s")
        .expect("stream open")
}

fn cm(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
}

const CMS: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test]
async fn create_get_and_errors_like_kube_apiserver() {
    let a = api().await;
    let (code, obj) = a.call(Method::POST, CMS, Some(cm("a", json!({})))).await;
    assert_eq!(code, 201);
    assert_eq!(obj["metadata"]["namespace"], "default");
    assert_eq!(obj["metadata"]["uid"].as_str().unwrap().len(), 36);
    assert!(
        obj["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let rv: i64 = obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv > 0);

    let (code, st) = a.call(Method::POST, CMS, Some(cm("a", json!({})))).await;
    assert_eq!((code, st["reason"].as_str()), (409, Some("AlreadyExists")));
    assert_eq!(st["message"], "configmaps \"a\" already exists");
    assert_eq!(st["kind"], "Status");

    let (code, st) = a.call(Method::GET, &format!("{CMS}/nope"), None).await;
    assert_eq!(code, 404);
    assert_eq!(st["message"], "configmaps \"nope\" not found");
    assert_eq!(st["details"], json!({"name": "nope", "kind": "configmaps"}));

    let (code, st) = a
        .call(Method::POST, CMS, Some(cm("Bad_Name", json!({}))))
        .await;
    assert_eq!(code, 422);
    assert_eq!(st["reason"], "Invalid");
    assert_eq!(st["details"]["causes"][0]["field"], "metadata.name");

    let (code, _, body) = a
        .send(
            Method::POST,
            CMS,
            "application/json",
            "",
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!(code, 400);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["reason"],
        "BadRequest"
    );

    let (code, st) = a
        .call(
            Method::POST,
            CMS,
            Some(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}})),
        )
        .await;
    assert_eq!((code, st["reason"].as_str()), (400, Some("BadRequest")));

    let (code, st) = a
        .call(Method::PUT, &format!("{CMS}/a"), Some(cm("b", json!({}))))
        .await;
    assert_eq!(code, 400);
    assert_eq!(
        st["message"],
        "the name of the object (b) does not match the name on the URL (a)"
    );

    let mut stale = obj.clone();
    stale["metadata"]["resourceVersion"] = json!((rv - 1).to_string());
    let (code, st) = a.call(Method::PUT, &format!("{CMS}/a"), Some(stale)).await;
    assert_eq!(code, 409);
    assert_eq!(
        st["message"],
        "Operation cannot be fulfilled on configmaps \"a\": the object has been modified; please apply your changes to the latest version and try again"
    );

    let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"k": "x".repeat(3 * 1024 * 1024 + 10)}});
    let (code, st) = a.call(Method::POST, CMS, Some(big)).await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (413, Some("RequestEntityTooLarge"))
    );

    let (code, st) = a
        .call(Method::GET, "/api/v1/namespaces/default/widgets", None)
        .await;
    assert_eq!((code, st["reason"].as_str()), (404, Some("NotFound")));

    let (code, st) = a
        .call(
            Method::POST,
            "/api/v1/namespaces/missing/configmaps",
            Some(cm("x", json!({}))),
        )
        .await;
    assert_eq!(code, 404);
    assert_eq!(st["message"], "namespaces \"missing\" not found");

    let (code, _, _) = a
        .send(
            Method::GET,
            CMS,
            "",
            "application/vnd.kubernetes.protobuf",
            vec![],
        )
        .await;
    assert_eq!(code, 406);
    let (code, _, _) = a
        .send(
            Method::GET,
            CMS,
            "",
            "application/vnd.kubernetes.protobuf, application/json",
            vec![],
        )
        .await;
    assert_eq!(code, 200);

    let mut req = Request::builder().uri(CMS).body(Body::empty()).unwrap();
    req.extensions_mut().clear();
    let resp = a.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let (code, obj) = a
        .call(
            Method::POST,
            CMS,
            Some(json!({"metadata": {"generateName": "gen-"}})),
        )
        .await;
    assert_eq!(code, 201);
    let n = obj["metadata"]["name"].as_str().unwrap();
    assert!(n.starts_with("gen-") && n.len() == 9, "{n}");
}

#[tokio::test]
async fn list_selectors_and_pagination() {
    let a = api().await;
    for i in 0..7 {
        let tier = if i % 2 == 0 { "front" } else { "back" };
        a.call(
            Method::POST,
            CMS,
            Some(cm(&format!("c{i}"), json!({"tier": tier}))),
        )
        .await;
    }
    let (_, list) = a
        .call(
            Method::GET,
            &format!("{CMS}?labelSelector=tier%3Dfront"),
            None,
        )
        .await;
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["items"].as_array().unwrap().len(), 4);
    let (_, list) = a
        .call(
            Method::GET,
            &format!("{CMS}?labelSelector=tier+notin+(front)"),
            None,
        )
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    let (_, list) = a
        .call(
            Method::GET,
            &format!("{CMS}?fieldSelector=metadata.name%3Dc3"),
            None,
        )
        .await;
    assert_eq!(list["items"][0]["metadata"]["name"], "c3");
    let (code, st) = a
        .call(
            Method::GET,
            &format!("{CMS}?fieldSelector=spec.bogus%3Dx"),
            None,
        )
        .await;
    assert_eq!(
        (code, st["message"].as_str()),
        (400, Some("field label not supported: spec.bogus"))
    );

    let mut names = Vec::new();
    let mut cont = String::new();
    let mut pages = 0;
    loop {
        let (_, page) = a
            .call(Method::GET, &format!("{CMS}?limit=3&continue={cont}"), None)
            .await;
        pages += 1;
        for it in page["items"].as_array().unwrap() {
            names.push(it["metadata"]["name"].as_str().unwrap().to_string());
        }
        match page["metadata"]["continue"].as_str() {
            Some(c) => cont = c.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, (0..7).map(|i| format!("c{i}")).collect::<Vec<_>>());

    // Cluster-wide list sees all namespaces.
    let (_, all) = a.call(Method::GET, "/api/v1/configmaps", None).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 7);
    let (_, nss) = a.call(Method::GET, "/api/v1/namespaces", None).await;
    let names: Vec<&str> = nss["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["default", "kube-node-lease", "kube-public", "kube-system"]
    );

    // deletecollection with a selector.
    let (code, _) = a
        .call(
            Method::DELETE,
            &format!("{CMS}?labelSelector=tier%3Dback"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    let (_, list) = a.call(Method::GET, CMS, None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn watch_initial_state_changes_and_selectors() {
    let a = api().await;
    a.call(Method::POST, CMS, Some(cm("pre", json!({"app": "x"}))))
        .await;
    let mut all = a.watch(&format!("{CMS}?watch=1")).await;
    let mut sel = a
        .watch(&format!("{CMS}?watch=1&labelSelector=app%3Dx"))
        .await;
    let e = next_event(&mut all).await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("pre"))
    );
    assert_eq!(next_event(&mut sel).await["type"], "ADDED");

    let (_, created) = a
        .call(Method::POST, CMS, Some(cm("w", json!({"app": "x"}))))
        .await;
    let e = next_event(&mut all).await;
    assert_eq!(e["type"], "ADDED");
    assert_eq!(
        e["object"]["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
    assert_eq!(next_event(&mut sel).await["type"], "ADDED");

    // Relabelling out of the selector is DELETED for the selective watch, MODIFIED for the other.
    let (code, _) = a
        .patch(
            &format!("{CMS}/w"),
            "application/merge-patch+json",
            json!({"metadata": {"labels": {"app": "y"}}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(next_event(&mut all).await["type"], "MODIFIED");
    let e = next_event(&mut sel).await;
    assert_eq!(
        (
            e["type"].as_str(),
            e["object"]["metadata"]["labels"]["app"].as_str()
        ),
        (Some("DELETED"), Some("y"))
    );

    let (code, _) = a.call(Method::DELETE, &format!("{CMS}/w"), None).await;
    assert_eq!(code, 200);
    let e = next_event(&mut all).await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("w"))
    );

    // A watch from a resourceVersion replays what came after it.
    let rv = created["metadata"]["resourceVersion"].as_str().unwrap();
    let mut from = a
        .watch(&format!("{CMS}?watch=true&resourceVersion={rv}"))
        .await;
    assert_eq!(next_event(&mut from).await["type"], "MODIFIED");
    assert_eq!(next_event(&mut from).await["type"], "DELETED");
}

#[tokio::test]
async fn watch_bookmarks_timeout_and_expired() {
    let a = api().await;
    let (_, c) = a.call(Method::POST, CMS, Some(cm("b", json!({})))).await;
    let rv = c["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut w = a
        .watch(&format!(
            "{CMS}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2"
        ))
        .await;
    let e = next_event(&mut w).await;
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(e["object"]["kind"], "ConfigMap");
    assert_eq!(e["object"]["metadata"]["resourceVersion"], rv.as_str());
    // timeoutSeconds ends the stream.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while w.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "watch did not end after timeoutSeconds");

    // Compacted history: 410 Expired inside the stream.
    for i in 0..3 {
        a.call(Method::POST, CMS, Some(cm(&format!("x{i}"), json!({}))))
            .await;
    }
    let cur = a.store.current_revision().await.unwrap();
    a.store.compact(cur).await.unwrap();
    let mut w = a.watch(&format!("{CMS}?watch=1&resourceVersion=1")).await;
    let e = next_event(&mut w).await;
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
}

#[tokio::test]
async fn finalizers_hold_objects_and_namespaces_terminate() {
    let a = api().await;
    let mut obj = cm("f", json!({}));
    obj["metadata"]["finalizers"] = json!(["example.com/hold"]);
    a.call(Method::POST, CMS, Some(obj)).await;
    let (code, del) = a.call(Method::DELETE, &format!("{CMS}/f"), None).await;
    assert_eq!(code, 200);
    assert!(del["metadata"]["deletionTimestamp"].is_string());
    let (code, _) = a.call(Method::GET, &format!("{CMS}/f"), None).await;
    assert_eq!(code, 200, "a finalizer holds the object");
    let (code, _) = a
        .patch(
            &format!("{CMS}/f"),
            "application/json-patch+json",
            json!([{"op": "remove", "path": "/metadata/finalizers"}]),
        )
        .await;
    assert_eq!(code, 200);
    let (code, _) = a.call(Method::GET, &format!("{CMS}/f"), None).await;
    assert_eq!(code, 404, "removing the last finalizer deletes the object");

    a.call(
        Method::POST,
        "/api/v1/namespaces",
        Some(json!({"metadata": {"name": "tmp"}})),
    )
    .await;
    a.call(
        Method::POST,
        "/api/v1/namespaces/tmp/configmaps",
        Some(cm("in-tmp", json!({}))),
    )
    .await;
    let (code, ns) = a.call(Method::DELETE, "/api/v1/namespaces/tmp", None).await;
    assert_eq!(code, 200);
    assert_eq!(ns["status"]["phase"], "Terminating");
    let mut gone = false;
    for _ in 0..50 {
        if a.call(Method::GET, "/api/v1/namespaces/tmp", None).await.0 == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "namespace was not finalized");
    let (code, _) = a
        .call(
            Method::GET,
            "/api/v1/namespaces/tmp/configmaps/in-tmp",
            None,
        )
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn deployments_scale_status_generation_and_smp() {
    let a = api().await;
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}]}]}}}});
    let path = "/apis/apps/v1/namespaces/default/deployments";
    let (code, obj) = a.call(Method::POST, path, Some(d)).await;
    assert_eq!(code, 201, "{obj}");
    assert_eq!(obj["metadata"]["generation"], 1);
    assert_eq!(obj["spec"]["replicas"], 1);
    assert_eq!(obj["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");

    let (code, scale) = a
        .call(Method::GET, &format!("{path}/web/scale"), None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        (scale["kind"].as_str(), scale["spec"]["replicas"].as_i64()),
        (Some("Scale"), Some(1))
    );
    assert_eq!(scale["status"]["selector"], "app=web");
    let (code, _) = a
        .patch(
            &format!("{path}/web/scale"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 4}}),
        )
        .await;
    assert_eq!(code, 200);
    let (_, obj) = a.call(Method::GET, &format!("{path}/web"), None).await;
    assert_eq!(
        (
            obj["spec"]["replicas"].as_i64(),
            obj["metadata"]["generation"].as_i64()
        ),
        (Some(4), Some(2))
    );

    // Strategic merge: containers merge by name, env by name.
    let (code, obj) = a
        .patch(&format!("{path}/web"), "application/strategic-merge-patch+json",
            json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "env": [{"name": "B", "value": "2"}]}]}}}}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        obj["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1"
    );
    assert_eq!(
        obj["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Status writes through the main resource are ignored; /status changes only status.
    let mut with_status = obj.clone();
    with_status["status"] = json!({"replicas": 9});
    let (_, after) = a
        .call(Method::PUT, &format!("{path}/web"), Some(with_status))
        .await;
    assert!(after["status"].get("replicas").is_none());
    let mut st = after.clone();
    st["status"] = json!({"replicas": 3, "readyReplicas": 3});
    st["spec"]["replicas"] = json!(100);
    let (code, after) = a
        .call(Method::PUT, &format!("{path}/web/status"), Some(st))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        (
            after["status"]["readyReplicas"].as_i64(),
            after["spec"]["replicas"].as_i64()
        ),
        (Some(3), Some(4))
    );

    // Table output with the real columns.
    let (_, _, body) = a
        .send(
            Method::GET,
            path,
            "",
            "application/json;as=Table;v=v1;g=meta.k8s.io",
            vec![],
        )
        .await;
    let table: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(table["kind"], "Table");
    let cols: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        &cols[..5],
        ["Name", "Ready", "Up-to-date", "Available", "Age"]
    );
    assert_eq!(table["rows"][0]["cells"][1], "3/4");
    assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
}

#[tokio::test]
async fn discovery_documents() {
    let a = api().await;
    let (_, apis) = a.call(Method::GET, "/apis", None).await;
    assert_eq!(apis["kind"], "APIGroupList");
    assert!(
        apis["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "apps")
    );
    let (_, apps) = a.call(Method::GET, "/apis/apps/v1", None).await;
    let d = apps["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "deployments")
        .unwrap();
    assert_eq!(d["shortNames"], json!(["deploy"]));
    assert_eq!(d["categories"], json!(["all"]));
    assert!(
        apps["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "deployments/scale" && r["group"] == "autoscaling")
    );

    let accept =
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
    let (code, headers, body) = a.send(Method::GET, "/apis", "", accept, vec![]).await;
    assert_eq!(code, 200);
    assert_eq!(
        headers["content-type"],
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    );
    let agg: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(agg["kind"], "APIGroupDiscoveryList");
    let apps = agg["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["metadata"]["name"] == "apps")
        .unwrap();
    let dep = apps["versions"][0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == "deployments")
        .unwrap();
    assert_eq!(dep["scope"], "Namespaced");
    assert_eq!(dep["responseKind"]["kind"], "Deployment");
    let (_, _, body) = a.send(Method::GET, "/api", "", accept, vec![]).await;
    let core: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(core["items"][0]["versions"][0]["version"], "v1");

    let (code, v) = a.call(Method::GET, "/version", None).await;
    assert_eq!(
        (code, v["major"].as_str(), v["minor"].as_str()),
        (200, Some("1"), Some("35"))
    );
    let (code, _, body) = a.send(Method::GET, "/readyz?verbose", "", "", vec![]).await;
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("readyz check passed"));

    let (_, review) = a
        .call(
            Method::POST,
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            Some(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})),
        )
        .await;
    assert_eq!(review["status"]["userInfo"]["username"], "system:admin");
}

#[tokio::test]
async fn services_get_cluster_ips_and_node_ports() {
    let a = api().await;
    let svcs = "/api/v1/namespaces/default/services";
    let (code, k) = a
        .call(Method::GET, &format!("{svcs}/kubernetes"), None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(k["spec"]["clusterIP"], "10.43.0.1");
    assert_eq!(k["spec"]["ports"][0]["port"], 443);
    let svc = |name: &str, extra: Value| {
        let mut s = json!({"metadata": {"name": name}, "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}});
        if let (Some(spec), Some(extra)) = (s["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        s
    };
    let (code, s1) = a
        .call(Method::POST, svcs, Some(svc("one", json!({}))))
        .await;
    assert_eq!(code, 201);
    assert_eq!(s1["spec"]["clusterIP"], "10.43.0.2");
    assert_eq!(s1["spec"]["ports"][0]["targetPort"], 80);
    let (code, s2) = a
        .call(
            Method::POST,
            svcs,
            Some(svc("two", json!({"type": "NodePort"}))),
        )
        .await;
    assert_eq!(code, 201);
    assert_eq!(s2["spec"]["clusterIP"], "10.43.0.3");
    let np = s2["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
    assert!((30000..=32767).contains(&np));
    let (code, st) = a
        .call(
            Method::POST,
            svcs,
            Some(svc("dup", json!({"clusterIP": "10.43.0.2"}))),
        )
        .await;
    assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")));
    // Released on delete: the address is handed out again.
    a.call(Method::DELETE, &format!("{svcs}/one"), None).await;
    let (_, s3) = a
        .call(Method::POST, svcs, Some(svc("three", json!({}))))
        .await;
    assert_eq!(s3["spec"]["clusterIP"], "10.43.0.2");
}

#[tokio::test]
async fn field_validation_strict_warn_ignore() {
    let a = api().await;
    let mut obj = cm("fv", json!({}));
    obj["spec"] = json!({"oops": 1});
    let body = serde_json::to_vec(&obj).unwrap();
    let (code, _, b) = a
        .send(
            Method::POST,
            &format!("{CMS}?fieldValidation=Strict"),
            "application/json",
            "",
            body.clone(),
        )
        .await;
    assert_eq!(code, 400);
    let st: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        st["message"],
        "ConfigMap in version \"v1\" cannot be handled as a ConfigMap: strict decoding error: unknown field \"spec\""
    );
    let (code, headers, _) = a
        .send(Method::POST, CMS, "application/json", "", body.clone())
        .await;
    assert_eq!(code, 201);
    assert_eq!(headers["warning"], "299 - \"unknown field \\\"spec\\\"\"");
    let (code, headers, _) = a
        .send(
            Method::PUT,
            &format!("{CMS}/fv?fieldValidation=Ignore"),
            "application/json",
            "",
            body,
        )
        .await;
    assert_eq!(code, 200);
    assert!(headers.get("warning").is_none());
    let (code, st) = a
        .patch(
            &format!("{CMS}/fv?fieldValidation=Strict"),
            "application/merge-patch+json",
            json!({"metadata": {"labelz": {"a": "b"}}}),
        )
        .await;
    assert_eq!(
        (code, st["message"].as_str()),
        (
            400,
            Some(
                "ConfigMap in version \"v1\" cannot be handled as a ConfigMap: strict decoding error: unknown field \"metadata.labelz\", unknown field \"spec\""
            )
        )
    );
    // Duplicate fields: serde keeps the last; the API reports them as kube-apiserver does.
    let dup = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"dup"},"data":{"a":"1","a":"2"}}"#;
    let (code, _, b) = a
        .send(
            Method::POST,
            &format!("{CMS}?fieldValidation=Strict"),
            "application/json",
            "",
            dup.to_vec(),
        )
        .await;
    assert_eq!(code, 400);
    let st: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        st["message"],
        "ConfigMap in version \"v1\" cannot be handled as a ConfigMap: strict decoding error: duplicate field \"data.a\""
    );
    let (code, headers, b) = a
        .send(Method::POST, CMS, "application/json", "", dup.to_vec())
        .await;
    assert_eq!(code, 201);
    assert_eq!(
        headers["warning"],
        "299 - \"duplicate field \\\"data.a\\\"\""
    );
    let created: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        created["data"]["a"], "2",
        "the last of duplicate keys wins, as in kube-apiserver"
    );
}

#[tokio::test]
async fn yaml_bodies_and_unsupported_media_types() {
    let a = api().await;
    let yaml =
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\ndata:\n  k: \"1\"\n"
            .to_vec();
    let (code, _, body) = a
        .send(Method::POST, CMS, "application/yaml", "", yaml)
        .await;
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let obj: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(obj["data"]["k"], "1");
    let (code, _, body) = a
        .send(
            Method::POST,
            CMS,
            "application/yaml",
            "",
            b"a: [unclosed".to_vec(),
        )
        .await;
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    let (code, _, body) = a
        .send(Method::POST, CMS, "text/plain", "", b"x".to_vec())
        .await;
    assert_eq!(code, 415);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["reason"],
        "UnsupportedMediaType"
    );
}

#[tokio::test]
async fn server_side_apply_creates_updates_and_conflicts() {
    let a = api().await;
    let ssa = |data: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: s\ndata:\n{data}").into_bytes()
    };
    let url = |mgr: &str, force: bool| format!("{CMS}/s?fieldManager={mgr}&force={force}");
    let ct = "application/apply-patch+yaml";
    let (code, _, body) = a
        .send(
            Method::PATCH,
            &url("alice", false),
            ct,
            "",
            ssa("  a: \"1\"\n  b: \"2\"\n"),
        )
        .await;
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let obj: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(obj["metadata"]["managedFields"][0]["manager"], "alice");
    assert_eq!(
        obj["metadata"]["managedFields"][0]["fieldsV1"]["f:data"]["f:a"],
        json!({})
    );
    // Dropping b from alice's configuration removes it.
    let (code, _, body) = a
        .send(
            Method::PATCH,
            &url("alice", false),
            ct,
            "",
            ssa("  a: \"1\"\n"),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["data"],
        json!({"a": "1"})
    );
    // bob changing alice's field conflicts, unless forced.
    let (code, _, body) = a
        .send(
            Method::PATCH,
            &url("bob", false),
            ct,
            "",
            ssa("  a: \"9\"\n"),
        )
        .await;
    assert_eq!(code, 409);
    let st: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        st["message"],
        "Apply failed with 1 conflict: conflict with \"alice\" using v1: .data.a"
    );
    assert_eq!(st["details"]["causes"][0]["field"], ".data.a");
    let (code, _, body) = a
        .send(
            Method::PATCH,
            &url("bob", true),
            ct,
            "",
            ssa("  a: \"9\"\n"),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["data"]["a"],
        "9"
    );
    let (code, _, _) = a
        .send(
            Method::PATCH,
            &format!("{CMS}/s"),
            ct,
            "",
            ssa("  a: \"1\"\n"),
        )
        .await;
    assert_eq!(code, 400, "fieldManager is required");
}

#[tokio::test]
async fn node_status_is_kept_on_create_but_deployment_status_is_not() {
    let api = api().await;
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1"},
        "status": {"capacity": {"cpu": "2", "pods": "110"}, "allocatable": {"cpu": "2", "pods": "110"}}
    });
    let (code, created) = api.call(Method::POST, "/api/v1/nodes", Some(node)).await;
    assert_eq!(code, 201, "{created}");
    let (code, got) = api.call(Method::GET, "/api/v1/nodes/n1", None).await;
    assert_eq!(code, 200);
    assert_eq!(got["status"]["capacity"]["cpu"], "2", "{got}");
    assert_eq!(got["status"]["allocatable"]["pods"], "110", "{got}");

    let deploy = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
        "status": {"replicas": 7}
    });
    let (code, created) = api
        .call(
            Method::POST,
            "/apis/apps/v1/namespaces/default/deployments",
            Some(deploy),
        )
        .await;
    assert_eq!(code, 201, "{created}");
    assert!(created["status"].get("replicas").is_none(), "{created}");
}
