//! The join endpoints (`/cacerts`, `/v1-skiff/node-certs`) driven in-process: the CA bundle
//! without credentials, certificates only with the cluster secret (basic auth), a 401 Status
//! otherwise, 400 for a bad node name, 404 when the server has no join backend.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use base64::Engine as _;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use skiff_apiserver::{ApiState, Config, NodeCredentialIssuer, NodeJoin, router};
use skiff_pki::join::NodeCerts;
use tower::ServiceExt;

/// A join backend over a real PKI in a temp dir.
struct Issuer {
    dir: tempfile::TempDir,
    ca: String,
}

impl NodeCredentialIssuer for Issuer {
    fn ca_bundle(&self) -> String {
        self.ca.clone()
    }
    fn check(&self, user: &str, password: &str) -> bool {
        (user == "server" || user == "node")
            && skiff_pki::join::constant_time_eq(password.as_bytes(), b"s3cret")
    }
    fn issue(&self, node_name: &str, node_ip: Option<IpAddr>) -> Result<Value, String> {
        let certs = skiff_pki::join::issue_node_certs(self.dir.path(), node_name, node_ip)
            .map_err(|e| e.to_string())?;
        serde_json::to_value(certs).map_err(|e| e.to_string())
    }
}

async fn app(join: bool) -> (axum::Router, String) {
    let dir = tempfile::tempdir().unwrap();
    let pki = skiff_pki::ensure_server_pki(dir.path(), &[]).unwrap();
    let ca = pki.ca_cert_pem.clone();
    let config = Config {
        node_join: join.then(|| {
            NodeJoin(Arc::new(Issuer {
                dir,
                ca: ca.clone(),
            }))
        }),
        ..Default::default()
    };
    let state = ApiState::new(skiff_store::memory(), config).await.unwrap();
    (router(state), ca)
}

async fn send(
    r: &axum::Router,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Value,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(a) = auth {
        let enc = base64::engine::general_purpose::STANDARD.encode(a);
        req = req.header("authorization", format!("Basic {enc}"));
    }
    let req = req.body(Body::from(body.to_string())).unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

#[tokio::test]
async fn cacerts_needs_no_credentials_and_node_certs_need_the_secret() {
    let (r, ca) = app(true).await;
    let (code, body) = send(&r, Method::GET, "/cacerts", None, Value::Null).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(String::from_utf8(body).unwrap(), ca);

    let req = json!({"nodeName": "worker-1", "nodeIP": "192.0.2.5"});
    for auth in [None, Some("server:wrong"), Some("server:"), Some("nocolon")] {
        let (code, body) = send(&r, Method::POST, "/v1-skiff/node-certs", auth, req.clone()).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{auth:?}");
        let status: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["code"], 401);
        assert!(!String::from_utf8_lossy(&body).contains("CERTIFICATE"));
    }
    let (code, body) = send(
        &r,
        Method::POST,
        "/v1-skiff/node-certs",
        Some("server:s3cret"),
        req.clone(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let certs: NodeCerts = serde_json::from_slice(&body).unwrap();
    let node = skiff_pki::cert_info_pem(&certs.node_cert_pem).unwrap();
    assert_eq!(node.common_name, "system:node:worker-1");
    assert_eq!(node.organizations, vec!["system:nodes"]);
    let serving = skiff_pki::cert_info_pem(&certs.serving_cert_pem).unwrap();
    assert!(serving.sans.contains(&"192.0.2.5".to_string()));
    assert!(serving.sans.contains(&"worker-1".to_string()));

    // k3s agents send `node:<secret>`.
    let (code, _) = send(
        &r,
        Method::POST,
        "/v1-skiff/node-certs",
        Some("node:s3cret"),
        req,
    )
    .await;
    assert_eq!(code, StatusCode::OK);

    for bad in [
        json!({"nodeName": "Bad_Name"}),
        json!({"nodeName": "ok", "nodeIP": "not-an-ip"}),
        json!({"nope": 1}),
    ] {
        let (code, _) = send(
            &r,
            Method::POST,
            "/v1-skiff/node-certs",
            Some("server:s3cret"),
            bad.clone(),
        )
        .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (code, _) = send(
        &r,
        Method::GET,
        "/v1-skiff/node-certs",
        Some("server:s3cret"),
        Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn without_a_join_backend_the_paths_are_not_found() {
    let (r, _) = app(false).await;
    let (code, _) = send(&r, Method::GET, "/cacerts", None, Value::Null).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _) = send(
        &r,
        Method::POST,
        "/v1-skiff/node-certs",
        Some("server:s3cret"),
        json!({}),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}
