//! Streaming proxy from the API to kubelets: `pods/log`, `pods/exec`, `pods/attach`,
//! `pods/portforward` and `nodes/proxy` are forwarded over mutual TLS to the kubelet of the node,
//! and HTTP upgrades (WebSocket, SPDY/3.1) are relayed byte for byte in both directions.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, HeaderName, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use skiff_api::ApiError;
use skiff_api::resources::find;

use crate::ApiState;

/// Default kubelet port when a Node does not report `status.daemonEndpoints`.
pub const DEFAULT_KUBELET_PORT: u16 = 10250;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Credentials the API server uses towards kubelets: the CA that signed the kubelets' serving
/// certificates and the client certificate the API server presents.
#[derive(Clone)]
pub struct KubeletClientTls {
    /// CA certificate(s) (PEM) that kubelet serving certificates must chain to.
    pub ca_pem: String,
    /// Client certificate (PEM) presented to kubelets.
    pub cert_pem: String,
    /// Private key (PEM, PKCS#8) of `cert_pem`.
    pub key_pem: String,
}

impl std::fmt::Debug for KubeletClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletClientTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("cert_pem_bytes", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Builds the rustls client configuration from the PEMs.
pub(crate) fn client_config(tls: &KubeletClientTls) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = skiff_pki::pem_certs_der(&tls.ca_pem);
    if ca.is_empty() {
        return Err("the kubelet client CA holds no PEM certificate".into());
    }
    for der in ca {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| format!("adding the kubelet CA: {e}"))?;
    }
    let certs: Vec<CertificateDer<'static>> = skiff_pki::pem_certs_der(&tls.cert_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    if certs.is_empty() {
        return Err("the kubelet client certificate holds no PEM certificate".into());
    }
    let key = skiff_pki::pem_key_der(&tls.key_pem)
        .ok_or("the kubelet client key is not a PEM private key")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("kubelet client certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Picks the container a pod subresource targets, with kube-apiserver's errors.
pub(crate) fn pick_container(pod: &Value, requested: Option<&str>) -> Result<String, ApiError> {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let names = |field: &str| -> Vec<String> {
        pod.pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let containers = names("containers");
    let init = names("initContainers");
    let ephemeral = names("ephemeralContainers");
    let requested = requested.filter(|c| !c.is_empty());
    if let Some(c) = requested {
        if containers
            .iter()
            .chain(&init)
            .chain(&ephemeral)
            .any(|n| n == c)
        {
            return Ok(c.to_string());
        }
        return Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        )));
    }
    if let Some(d) = pod
        .pointer("/metadata/annotations/kubectl.kubernetes.io~1default-container")
        .and_then(Value::as_str)
        .filter(|d| containers.iter().any(|n| n == d))
    {
        return Ok(d.to_string());
    }
    match containers.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(ApiError::bad_request(format!(
            "pod {name} has no containers"
        ))),
        many => {
            let mut msg = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                many.join(" ")
            );
            if !init.is_empty() {
                msg.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init.join(" ")
                ));
            }
            Err(ApiError::bad_request(msg))
        }
    }
}

/// The kubelet's `host` and port for a Node object.
pub(crate) fn kubelet_endpoint(node: &Value) -> Result<(String, u16), ApiError> {
    let name = node
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let addrs = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let of_type = |t: &str| {
        addrs
            .iter()
            .filter(|a| a.get("type").and_then(Value::as_str) == Some(t))
            .find_map(|a| a.get("address").and_then(Value::as_str))
            .filter(|a| !a.is_empty())
            .map(str::to_string)
    };
    let host = of_type("InternalIP")
        .or_else(|| of_type("Hostname"))
        .ok_or_else(|| {
            ApiError::internal(format!(
                "node {name} reports no InternalIP or Hostname address in status.addresses; \
                 its kubelet cannot be reached"
            ))
        })?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_KUBELET_PORT);
    Ok((host, port))
}

/// Drops `container` from a raw query string (the container moves into the kubelet path).
fn query_without_container(query: Option<&str>) -> String {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("container=") && *p != "container")
        .collect::<Vec<_>>()
        .join("&")
}

/// Proxies a pod streaming subresource (`log`, `exec`, `attach`, `portforward`) to the kubelet.
pub(crate) async fn pod_subresource(
    st: &ApiState,
    pod: &Value,
    sub: &str,
    requested_container: Option<&str>,
    req: Request,
) -> Result<Response, ApiError> {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let ns = pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("");
    let path = match sub {
        "portforward" => format!("/portForward/{ns}/{name}"),
        _ => {
            let container = pick_container(pod, requested_container)?;
            let prefix = match sub {
                "log" => "containerLogs",
                "exec" => "exec",
                _ => "attach",
            };
            format!("/{prefix}/{ns}/{name}/{container}")
        }
    };
    if node.is_empty() {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let query = query_without_container(req.uri().query());
    let path_q = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    let node_obj = get_node(st, node).await?;
    forward(st, &node_obj, path_q, req).await
}

/// Proxies `nodes/{name}/proxy/{tail}` to `/{tail}` on the node's kubelet.
pub(crate) async fn node_proxy(
    st: &ApiState,
    node: &str,
    tail: &[&str],
    req: Request,
) -> Result<Response, ApiError> {
    let node_obj = get_node(st, node).await?;
    let mut path = format!("/{}", tail.join("/"));
    if req.uri().path().ends_with('/') && !path.ends_with('/') {
        path.push('/');
    }
    let path_q = match req.uri().query() {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path,
    };
    forward(st, &node_obj, path_q, req).await
}

async fn get_node(st: &ApiState, node: &str) -> Result<Value, ApiError> {
    let r = find("", "v1", "nodes").ok_or_else(ApiError::path_not_found)?;
    let kv = st
        .store
        .get(&r.key(None, node))
        .await
        .map_err(crate::handlers::store_err)?
        .ok_or_else(|| ApiError::not_found(r, node))?;
    crate::handlers::decode(&kv)
}

/// Whether the request asks to switch protocols (`Connection: Upgrade` + `Upgrade: ...`).
fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Headers never forwarded to the kubelet: credentials and hop-by-hop headers (the upgrade
/// headers are re-added for upgrade requests).
const DROP_REQUEST: &[&str] = &[
    "authorization",
    "host",
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

const DROP_RESPONSE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn backend_error(node: &str, addr: &str, what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!(
        "error dialing backend: {what} the kubelet of node {node} at {addr}: {e}; \
         check that the node's kubelet is running and reachable from the API server"
    ))
}

async fn forward(
    st: &ApiState,
    node: &Value,
    path_q: String,
    req: Request,
) -> Result<Response, ApiError> {
    let node_name = node
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let tls = st.kubelet_tls.clone().ok_or_else(|| {
        ApiError::unavailable(format!(
            "this API server has no kubelet client credentials; it cannot reach the kubelet of node {node_name}"
        ))
    })?;
    let (host, port) = kubelet_endpoint(node)?;
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let (mut parts, body) = req.into_parts();
    let upgrade = is_upgrade(&parts.headers);
    let client_upgrade = if upgrade {
        Some(
            parts
                .extensions
                .remove::<hyper::upgrade::OnUpgrade>()
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "this connection cannot be upgraded; exec, attach and port-forward need \
                         an HTTP/1.1 connection",
                    )
                })?,
        )
    } else {
        None
    };

    let server_name = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone())
            .map_err(|e| backend_error(&node_name, &addr, "naming", e))?,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| backend_error(&node_name, &addr, "connecting to", "timed out"))?
        .map_err(|e| backend_error(&node_name, &addr, "connecting to", e))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
    )
    .await
    .map_err(|_| backend_error(&node_name, &addr, "TLS handshake with", "timed out"))?
    .map_err(|e| backend_error(&node_name, &addr, "TLS handshake with", e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| backend_error(&node_name, &addr, "talking HTTP to", e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "kubelet connection ended with an error");
        }
    });

    let mut out = http::Request::builder()
        .method(parts.method.clone())
        .uri(path_q.as_str());
    for (k, v) in &parts.headers {
        let n = k.as_str();
        if DROP_REQUEST.contains(&n) || n.starts_with("impersonate-") {
            continue;
        }
        out = out.header(k, v);
    }
    out = out.header(header::HOST, addr.as_str());
    if upgrade {
        out = out.header(header::CONNECTION, "Upgrade");
        for v in parts.headers.get_all(header::UPGRADE) {
            out = out.header(header::UPGRADE, v);
        }
    }
    let kreq = out
        .body(body)
        .map_err(|e| ApiError::internal(format!("building the kubelet request: {e}")))?;
    let mut resp = tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(kreq))
        .await
        .map_err(|_| backend_error(&node_name, &addr, "waiting for", "no response"))?
        .map_err(|e| backend_error(&node_name, &addr, "requesting from", e))?;
    tracing::debug!(node = %node_name, %addr, path = %path_q, status = resp.status().as_u16(), "kubelet proxy");

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::internal(format!(
                "the kubelet of node {node_name} switched protocols on a request that asked for none"
            )));
        };
        let kubelet_upgrade = hyper::upgrade::on(&mut resp);
        let node_for_task = node_name.clone();
        tokio::spawn(async move {
            let (client, kubelet) = match (client_upgrade.await, kubelet_upgrade.await) {
                (Ok(c), Ok(k)) => (c, k),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(node = %node_for_task, error = %e, "stream upgrade failed");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut kubelet = TokioIo::new(kubelet);
            match tokio::io::copy_bidirectional(&mut client, &mut kubelet).await {
                Ok((up, down)) => {
                    tracing::debug!(node = %node_for_task, up, down, "stream closed");
                }
                Err(e) => {
                    tracing::debug!(node = %node_for_task, error = %e, "stream ended with an error");
                }
            }
        });
        let mut out = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (k, v) in resp.headers() {
            out = out.header(k, v);
        }
        return out
            .body(Body::empty())
            .map_err(|e| ApiError::internal(format!("building the upgrade response: {e}")));
    }

    let (mut rparts, rbody) = resp.into_parts();
    let drop: Vec<HeaderName> = rparts
        .headers
        .keys()
        .filter(|k| DROP_RESPONSE.contains(&k.as_str()))
        .cloned()
        .collect();
    for k in drop {
        rparts.headers.remove(k);
    }
    Ok(Response::from_parts(rparts, Body::new(rbody)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(containers: &[&str], init: &[&str]) -> Value {
        json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {
            "containers": containers.iter().map(|c| json!({"name": c})).collect::<Vec<_>>(),
            "initContainers": init.iter().map(|c| json!({"name": c})).collect::<Vec<_>>(),
        }})
    }

    #[test]
    fn container_choice() {
        assert_eq!(pick_container(&pod(&["a"], &[]), None).unwrap(), "a");
        let e = pick_container(&pod(&["a", "b"], &[]), None).unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [a b]"
        );
        let e = pick_container(&pod(&["a", "b"], &["i"]), None).unwrap_err();
        assert!(e.message.ends_with("or one of the init containers: [i]"));
        assert_eq!(
            pick_container(&pod(&["a"], &["i"]), Some("i")).unwrap(),
            "i"
        );
        let e = pick_container(&pod(&["a"], &[]), Some("x")).unwrap_err();
        assert_eq!(e.message, "container x is not valid for pod p");
        let mut p = pod(&["a", "b"], &[]);
        p["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/default-container": "b"});
        assert_eq!(pick_container(&p, None).unwrap(), "b");
    }

    #[test]
    fn endpoint_prefers_internal_ip() {
        let n = json!({"metadata": {"name": "n"}, "status": {
            "addresses": [{"type": "Hostname", "address": "h"}, {"type": "InternalIP", "address": "10.0.0.2"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 11250}}}});
        assert_eq!(kubelet_endpoint(&n).unwrap(), ("10.0.0.2".into(), 11250));
        let n = json!({"metadata": {"name": "n"}, "status": {"addresses": [{"type": "Hostname", "address": "h"}]}});
        assert_eq!(kubelet_endpoint(&n).unwrap(), ("h".into(), 10250));
        let n = json!({"metadata": {"name": "n"}, "status": {}});
        assert_eq!(kubelet_endpoint(&n).unwrap_err().code, 500);
    }

    #[test]
    fn query_drops_container() {
        assert_eq!(
            query_without_container(Some("container=a&command=ls&command=-l&stdout=true")),
            "command=ls&command=-l&stdout=true"
        );
        assert_eq!(query_without_container(None), "");
    }

    #[test]
    fn debug_hides_key() {
        let t = KubeletClientTls {
            ca_pem: "CA".into(),
            cert_pem: "CERT".into(),
            key_pem: "SECRETKEY".into(),
        };
        assert!(!format!("{t:?}").contains("SECRETKEY"));
    }
}
