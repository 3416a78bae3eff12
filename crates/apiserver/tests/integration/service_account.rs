//! Service-account tokens through the router: TokenRequest (defaults, limits, bound objects,
//! errors), bearer authentication of the issued JWTs (and its end when the service account or
//! the bound pod goes), TokenReview, and the ServiceAccount admission plugin on pod creation.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use http::{Method, Request};
use serde_json::{Value, json};
use skiff_apiserver::{ApiState, Config, Identity, ServiceAccountKey, router};
use tower::ServiceExt;

const AUD: &str = "https://kubernetes.default.svc.cluster.local";

async fn api() -> axum::Router {
    let pair = rcgen::KeyPair::generate().unwrap();
    let config = Config {
        service_account_key: Some(ServiceAccountKey {
            private_pem: pair.serialize_pem(),
            public_pem: pair.public_key_pem(),
        }),
        ..Config::default()
    };
    router(ApiState::new(skiff_store::memory(), config).await.unwrap())
}

/// A request as the admin (TLS identity) or, with `token`, with that bearer token.
async fn call_as(
    r: &axum::Router,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut req = req
        .body(Body::from(if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&body).unwrap()
        }))
        .unwrap();
    if token.is_none() {
        req.extensions_mut().insert(Identity {
            user: "admin".into(),
            groups: vec!["system:masters".into()],
            uid: String::new(),
        });
    }
    let resp = r.clone().oneshot(req).await.unwrap();
    let code = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn call(r: &axum::Router, method: Method, path: &str, body: Value) -> (u16, Value) {
    call_as(r, None, method, path, body).await
}

async fn create_sa(r: &axum::Router, ns: &str, name: &str) -> Value {
    let (code, sa) = call(
        r,
        Method::POST,
        &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
    )
    .await;
    assert_eq!(code, 201, "{sa}");
    sa
}

async fn token(r: &axum::Router, ns: &str, sa: &str, spec: Value) -> (u16, Value) {
    call(
        r,
        Method::POST,
        &format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"),
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
    )
    .await
}

fn claims(tok: &str) -> Value {
    use base64::Engine as _;
    let part = tok.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

async fn whoami(r: &axum::Router, tok: &str) -> (u16, Value) {
    call_as(
        r,
        Some(tok),
        Method::POST,
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}),
    )
    .await
}

#[tokio::test]
async fn token_request_issues_a_token_that_authenticates() {
    let r = api().await;
    let sa = create_sa(&r, "default", "robot").await;
    let (code, tr) = token(&r, "default", "robot", json!({})).await;
    assert_eq!(code, 201, "{tr}");
    assert_eq!(tr["kind"], "TokenRequest");
    assert_eq!(tr["spec"]["audiences"], json!([AUD]));
    assert_eq!(tr["spec"]["expirationSeconds"], 3600);
    let tok = tr["status"]["token"].as_str().unwrap();
    let exp = skiff_api::meta::parse_time(tr["status"]["expirationTimestamp"].as_str().unwrap())
        .unwrap()
        .unix_timestamp();
    let c = claims(tok);
    assert_eq!(c["iss"], AUD);
    assert_eq!(c["sub"], "system:serviceaccount:default:robot");
    assert_eq!(c["aud"], json!([AUD]));
    assert_eq!(c["exp"].as_i64().unwrap(), exp);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    assert_eq!(c["kubernetes.io"]["namespace"], "default");
    assert_eq!(
        c["kubernetes.io"]["serviceaccount"],
        json!({"name": "robot", "uid": sa["metadata"]["uid"]})
    );

    let (code, who) = whoami(&r, tok).await;
    assert_eq!(code, 201, "{who}");
    assert_eq!(
        who["status"]["userInfo"]["username"],
        "system:serviceaccount:default:robot"
    );
    assert_eq!(who["status"]["userInfo"]["uid"], sa["metadata"]["uid"]);
    assert_eq!(
        who["status"]["userInfo"]["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:default",
            "system:authenticated"
        ])
    );
    let (code, _) = call_as(
        &r,
        Some(tok),
        Method::GET,
        "/api/v1/namespaces/default/pods",
        Value::Null,
    )
    .await;
    assert_eq!(code, 200);

    // TokenReview agrees.
    let (code, rev) = call(
        &r,
        Method::POST,
        "/apis/authentication.k8s.io/v1/tokenreviews",
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": tok}}),
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(rev["status"]["authenticated"], true, "{rev}");
    assert_eq!(
        rev["status"]["user"]["username"],
        "system:serviceaccount:default:robot"
    );

    // A token for another audience is not accepted by the API.
    let (_, other) = token(
        &r,
        "default",
        "robot",
        json!({"audiences": ["vault"], "expirationSeconds": 600}),
    )
    .await;
    let other = other["status"]["token"].as_str().unwrap();
    assert_eq!(claims(other)["aud"], json!(["vault"]));
    let (code, st) = whoami(&r, other).await;
    assert_eq!(code, 401);
    assert_eq!(st["reason"], "Unauthorized");

    // Garbage and tampered tokens are 401 Unauthorized.
    assert_eq!(whoami(&r, "eyJhbGciOiJFUzI1NiJ9.e30.c2ln").await.0, 401);
    let mut parts: Vec<String> = tok.split('.').map(str::to_string).collect();
    let flipped = if &parts[2][10..11] == "A" { "B" } else { "A" };
    parts[2].replace_range(10..11, flipped);
    let (code, st) = whoami(&r, &parts.join(".")).await;
    assert_eq!(code, 401);
    assert_eq!(st["message"], "Unauthorized");

    // Deleting the service account ends the token; a new one of the same name does not revive it.
    let (code, _) = call(
        &r,
        Method::DELETE,
        "/api/v1/namespaces/default/serviceaccounts/robot",
        Value::Null,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(whoami(&r, tok).await.0, 401);
    create_sa(&r, "default", "robot").await;
    assert_eq!(whoami(&r, tok).await.0, 401);
}

#[tokio::test]
async fn token_request_errors_are_kube_apiservers() {
    let r = api().await;
    let (code, st) = token(&r, "default", "ghost", json!({})).await;
    assert_eq!(code, 404, "{st}");
    assert_eq!(st["message"], "serviceaccounts \"ghost\" not found");

    create_sa(&r, "default", "robot").await;
    let (code, st) = token(&r, "default", "robot", json!({"expirationSeconds": 60})).await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(st["reason"], "Invalid");
    assert_eq!(
        st["message"],
        "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: 60: may not specify a duration less than 10 minutes"
    );
    assert_eq!(
        token(&r, "default", "robot", json!({"expirationSeconds": 600}))
            .await
            .0,
        201
    );

    let (code, st) = token(
        &r,
        "default",
        "robot",
        json!({"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "nope"}}),
    )
    .await;
    assert_eq!(code, 404, "{st}");
    assert_eq!(st["message"], "pods \"nope\" not found");
    let (code, st) = token(
        &r,
        "default",
        "robot",
        json!({"boundObjectRef": {"kind": "ConfigMap", "apiVersion": "v1", "name": "x"}}),
    )
    .await;
    assert_eq!(code, 400, "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("cannot bind token to object of type"),
        "{st}"
    );
}

#[tokio::test]
async fn bound_tokens_end_with_their_object() {
    let r = api().await;
    let (code, pod) = call(
        &r,
        Method::POST,
        "/api/v1/namespaces/default/pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
    )
    .await;
    assert_eq!(code, 201, "{pod}");
    let (code, tr) = token(
        &r,
        "default",
        "default",
        json!({"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p"}}),
    )
    .await;
    assert_eq!(code, 201, "{tr}");
    assert_eq!(tr["spec"]["boundObjectRef"]["name"], "p");
    let tok = tr["status"]["token"].as_str().unwrap().to_string();
    assert_eq!(
        claims(&tok)["kubernetes.io"]["pod"],
        json!({"name": "p", "uid": pod["metadata"]["uid"]})
    );
    assert_eq!(whoami(&r, &tok).await.0, 201);
    // A token for another service account cannot be bound to this pod.
    create_sa(&r, "default", "robot").await;
    let (code, st) = token(
        &r,
        "default",
        "robot",
        json!({"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p"}}),
    )
    .await;
    assert_eq!(code, 400, "{st}");
    // A wrong uid in the reference is a conflict.
    let (code, _) = token(
        &r,
        "default",
        "default",
        json!({"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "other"}}),
    )
    .await;
    assert_eq!(code, 409);
    // The pod is not bound to a node: deleting it removes it at once, and the token stops working.
    let (code, _) = call(
        &r,
        Method::DELETE,
        "/api/v1/namespaces/default/pods/p",
        Value::Null,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(whoami(&r, &tok).await.0, 401);

    // Secret-bound tokens likewise.
    let (code, _) = call(
        &r,
        Method::POST,
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}),
    )
    .await;
    assert_eq!(code, 201);
    let (_, tr) = token(
        &r,
        "default",
        "robot",
        json!({"boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": "s"}}),
    )
    .await;
    let tok = tr["status"]["token"].as_str().unwrap().to_string();
    assert_eq!(whoami(&r, &tok).await.0, 201);
    call(
        &r,
        Method::DELETE,
        "/api/v1/namespaces/default/secrets/s",
        Value::Null,
    )
    .await;
    assert_eq!(whoami(&r, &tok).await.0, 401);
}

#[tokio::test]
async fn service_account_admission() {
    let r = api().await;
    let pod = |name: &str, extra: Value| {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"initContainers": [{"name": "i", "image": "busybox"}],
                     "containers": [{"name": "c", "image": "busybox"}]}});
        for (k, v) in extra.as_object().unwrap() {
            p["spec"][k] = v.clone();
        }
        p
    };
    const PODS: &str = "/api/v1/namespaces/default/pods";
    // A namespace whose default service account does not exist yet: refused as kube-apiserver
    // does (the built-in namespaces get theirs at start).
    let (code, _) = call(
        &r,
        Method::POST,
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fresh"}}),
    )
    .await;
    assert_eq!(code, 201);
    let (code, st) = call(
        &r,
        Method::POST,
        "/api/v1/namespaces/fresh/pods",
        pod("early", json!({})),
    )
    .await;
    assert_eq!(code, 403, "{st}");
    assert_eq!(
        st["message"],
        "pods \"early\" is forbidden: error looking up service account fresh/default: serviceaccount \"default\" not found"
    );
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let (code, _) = call(
            &r,
            Method::GET,
            &format!("/api/v1/namespaces/{ns}/serviceaccounts/default"),
            Value::Null,
        )
        .await;
        assert_eq!(code, 200, "{ns}/default");
    }
    let (code, p) = call(&r, Method::POST, PODS, pod("a", json!({}))).await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["spec"]["serviceAccountName"], "default");
    assert_eq!(p["spec"]["serviceAccount"], "default");
    let vols = p["spec"]["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1);
    let name = vols[0]["name"].as_str().unwrap();
    assert!(name.starts_with("kube-api-access-"));
    assert_eq!(
        vols[0]["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
        3607
    );
    assert_eq!(vols[0]["projected"]["defaultMode"], 420);
    for c in ["initContainers", "containers"] {
        assert_eq!(
            p["spec"][c][0]["volumeMounts"],
            json!([{"name": name, "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]),
            "{c}"
        );
    }

    // automountServiceAccountToken: false on the pod, or on its service account.
    let (code, p) = call(
        &r,
        Method::POST,
        PODS,
        pod("b", json!({"automountServiceAccountToken": false})),
    )
    .await;
    assert_eq!(code, 201, "{p}");
    assert!(p["spec"].get("volumes").is_none(), "{p}");
    assert!(
        p["spec"]["containers"][0].get("volumeMounts").is_none(),
        "{p}"
    );
    let (code, _) = call(
        &r,
        Method::POST,
        "/api/v1/namespaces/default/serviceaccounts",
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "quiet"},
               "automountServiceAccountToken": false, "imagePullSecrets": [{"name": "regcred"}]}),
    )
    .await;
    assert_eq!(code, 201);
    let (code, p) = call(
        &r,
        Method::POST,
        PODS,
        pod("c", json!({"serviceAccountName": "quiet"})),
    )
    .await;
    assert_eq!(code, 201, "{p}");
    assert!(p["spec"].get("volumes").is_none(), "{p}");
    assert_eq!(p["spec"]["imagePullSecrets"], json!([{"name": "regcred"}]));
    // The pod's own setting wins over its service account's.
    let (_, p) = call(
        &r,
        Method::POST,
        PODS,
        pod(
            "d",
            json!({"serviceAccountName": "quiet", "automountServiceAccountToken": true}),
        ),
    )
    .await;
    assert_eq!(p["spec"]["volumes"].as_array().unwrap().len(), 1, "{p}");
    // A named service account that does not exist.
    let (code, st) = call(
        &r,
        Method::POST,
        PODS,
        pod("e", json!({"serviceAccountName": "ghost"})),
    )
    .await;
    assert_eq!(code, 403, "{st}");
}
