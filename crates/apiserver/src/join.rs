//! The join endpoints agents use before they have credentials, as k3s serves them on its API
//! port: `GET /cacerts` (the cluster CA bundle, no authentication; the agent checks it against
//! the hash in its `K10` token) and `POST /v1-skiff/node-certs` (basic auth `<user>:<cluster
//! secret>`, body `{"nodeName": "...", "nodeIP": "..."}`), which answers the node's client and
//! kubelet serving certificates. Reading the CA key and checking the secret are the caller's
//! business, behind [`NodeCredentialIssuer`].

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use base64::Engine as _;
use http::Method;
use skiff_api::ApiError;

use crate::http_util::{error_response, json_response};

/// Path of the CA bundle.
pub const CACERTS_PATH: &str = "/cacerts";
/// Path of the node-credentials endpoint.
pub const NODE_CERTS_PATH: &str = "/v1-skiff/node-certs";

/// What the server does for joining nodes.
pub trait NodeCredentialIssuer: Send + Sync {
    /// The CA bundle (PEM) served at `/cacerts`.
    fn ca_bundle(&self) -> String;
    /// Whether `user`/`password` are the cluster's join credentials (compared in constant time).
    fn check(&self, user: &str, password: &str) -> bool;
    /// Issues the certificates of node `node_name` with InternalIP `node_ip`: the JSON answered
    /// (the [`skiff_pki::join::NodeCerts`] fields, plus whatever cluster settings the caller adds).
    fn issue(&self, node_name: &str, node_ip: Option<IpAddr>) -> Result<serde_json::Value, String>;
}

/// The join endpoints' backend, set in [`crate::Config::node_join`].
#[derive(Clone)]
pub struct NodeJoin(pub Arc<dyn NodeCredentialIssuer>);

impl std::fmt::Debug for NodeJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeJoin").finish_non_exhaustive()
    }
}

/// Whether `path` is one of the join endpoints (answered before authentication).
pub(crate) fn is_join_path(path: &str) -> bool {
    path == CACERTS_PATH || path == NODE_CERTS_PATH
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeCertsRequest {
    node_name: String,
    #[serde(default, rename = "nodeIP")]
    node_ip: Option<String>,
}

/// `user:password` of a basic `Authorization` header.
fn basic_credentials(req: &Request) -> Option<(String, String)> {
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, value) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Answers a join request (`path` is one of the join paths).
pub(crate) async fn handle(join: Option<&NodeJoin>, req: Request, path: &str) -> Response {
    let Some(join) = join else {
        return error_response(&ApiError::path_not_found());
    };
    if path == CACERTS_PATH {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error_response(&ApiError::method_not_allowed());
        }
        let mut resp = Response::new(axum::body::Body::from(join.0.ca_bundle()));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return resp;
    }
    if req.method() != Method::POST {
        return error_response(&ApiError::method_not_allowed());
    }
    let authorized = basic_credentials(&req).is_some_and(|(u, p)| join.0.check(&u, &p));
    if !authorized {
        tracing::warn!(path, "join request refused: missing or wrong cluster token");
        return error_response(&ApiError::unauthorized());
    }
    let body = match axum::body::to_bytes(req.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading the body: {e}"))),
    };
    let parsed: NodeCertsRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error_response(&ApiError::bad_request(format!(
                "expected {{\"nodeName\": ..., \"nodeIP\": ...}}: {e}"
            )));
        }
    };
    let node_ip = match parsed.node_ip.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => match s.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "nodeIP {s:?} is not an IP address"
                )));
            }
        },
        None => None,
    };
    if !skiff_pki::join::valid_node_name(&parsed.node_name) {
        return error_response(&ApiError::bad_request(format!(
            "nodeName {:?} is not a valid node name (lower-case DNS subdomain)",
            parsed.node_name
        )));
    }
    match join.0.issue(&parsed.node_name, node_ip) {
        Ok(v) => {
            tracing::info!(node = %parsed.node_name, node_ip = ?node_ip, "issued node certificates");
            json_response(200, &v)
        }
        Err(e) => {
            tracing::error!(node = %parsed.node_name, error = %e, "issuing node certificates failed");
            error_response(&ApiError::internal(format!(
                "issuing node certificates: {e}"
            )))
        }
    }
}
