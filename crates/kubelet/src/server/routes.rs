//! The kubelet API's routes and handlers: pod and container resolution with kube-style errors,
//! and the dispatch of exec/attach/port-forward to the WebSocket or SPDY transport.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use http::{StatusCode, header};
use serde_json::json;
use skiff_runtime::{Runtime, StreamRequest};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::stats::CpuSamples;
use super::upgrade::{self, Kind};
use super::{
    ContainerRef, PodLookup, PodRef, logs, portforward, remotecommand, stats, stream_proxy,
};

/// Everything the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// the runtime
    pub runtime: Arc<dyn Runtime>,
    /// the pods
    pub pods: Arc<dyn PodLookup>,
    /// cpu samples for usageNanoCores
    pub samples: Arc<CpuSamples>,
}

type Q = Query<Vec<(String, String)>>;

/// A kube-style `Status` error response.
pub fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found(msg: impl Into<String>) -> Response {
    status(StatusCode::NOT_FOUND, "NotFound", msg)
}

fn bad_request(msg: impl Into<String>) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", msg)
}

/// The router of the kubelet API (authentication happens before it, in `serve`).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/pods", get(pods))
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .route("/exec/{ns}/{pod}/{container}", any(exec3))
        .route("/exec/{ns}/{pod}/{uid}/{container}", any(exec4))
        .route("/attach/{ns}/{pod}/{container}", any(attach3))
        .route("/attach/{ns}/{pod}/{uid}/{container}", any(attach4))
        .route("/portForward/{ns}/{pod}", any(port_forward2))
        .route("/portForward/{ns}/{pod}/{uid}", any(port_forward3))
        .route("/stats/summary", get(summary))
        .route("/metrics/resource", get(metrics_resource))
        .fallback(|req: Request| async move {
            not_found(format!("the kubelet serves no path {}", req.uri().path()))
        })
        .with_state(state)
}

async fn pods(State(s): State<AppState>) -> Response {
    let items: Vec<serde_json::Value> = s
        .pods
        .pods()
        .iter()
        .filter_map(|p| serde_json::to_value(p.pod.as_ref()).ok())
        .map(|mut v| {
            v["kind"] = json!("Pod");
            v["apiVersion"] = json!("v1");
            v
        })
        .collect();
    let body = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn find_pod(
    s: &AppState,
    ns: &str,
    name: &str,
    uid: Option<&str>,
) -> Result<PodRef, Box<Response>> {
    let p = s.pods.pod(ns, name).ok_or_else(|| {
        Box::new(not_found(format!(
            "pod \"{name}\" in namespace \"{ns}\" not found on this node"
        )))
    })?;
    if let Some(uid) = uid
        && p.pod.metadata.uid.as_deref() != Some(uid)
    {
        return Err(Box::new(not_found(format!(
            "pod \"{name}\" in namespace \"{ns}\" with uid {uid} not found on this node"
        ))));
    }
    Ok(p)
}

fn find_container(p: &PodRef, name: &str) -> Result<ContainerRef, Box<Response>> {
    let pod = p.pod.metadata.name.as_deref().unwrap_or_default();
    p.containers
        .iter()
        .find(|c| c.name == name)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = p.containers.iter().map(|c| c.name.as_str()).collect();
            Box::new(bad_request(format!(
                "container {name} is not valid for pod {pod}: choose one of: {names:?}"
            )))
        })
}

fn running_id(p: &PodRef, c: &ContainerRef) -> Result<String, Box<Response>> {
    let pod = p.pod.metadata.name.as_deref().unwrap_or_default();
    c.id.clone().ok_or_else(|| {
        Box::new(bad_request(format!(
            "container \"{}\" in pod \"{pod}\" is waiting to start: it has not been created yet",
            c.name
        )))
    })
}

async fn container_logs(
    State(s): State<AppState>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Q,
) -> Response {
    let opts = match logs::LogOptions::from_query(&q, time::OffsetDateTime::now_utc()) {
        Ok(o) => o,
        Err(e) => return bad_request(e),
    };
    let p = match find_pod(&s, &ns, &pod, None) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let c = match find_container(&p, &container) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let id = if opts.previous {
        match &c.previous_id {
            Some(id) => id.clone(),
            None => {
                return bad_request(format!(
                    "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                ));
            }
        }
    } else {
        // Between two instances (a crash-looping container waiting for its restart) the log of
        // the last one is the current log, as with the real kubelet.
        match running_id(&p, &c) {
            Ok(id) => id,
            Err(r) => match &c.previous_id {
                Some(id) => id.clone(),
                None => return *r,
            },
        }
    };
    let path = match s.runtime.log_path(&id).await {
        Ok(p) => p,
        Err(e) => {
            return not_found(format!(
                "the log of container \"{container}\" in pod \"{pod}\" is gone: {e}"
            ));
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(logs::stream(s.runtime.clone(), id, path, opts, tx));
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn exec3(
    State(s): State<AppState>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Q,
    req: Request,
) -> Response {
    remote(
        s,
        remotecommand::Action::Exec,
        ns,
        pod,
        None,
        container,
        q,
        req,
    )
    .await
}

async fn exec4(
    State(s): State<AppState>,
    Path((ns, pod, uid, container)): Path<(String, String, String, String)>,
    Query(q): Q,
    req: Request,
) -> Response {
    remote(
        s,
        remotecommand::Action::Exec,
        ns,
        pod,
        Some(uid),
        container,
        q,
        req,
    )
    .await
}

async fn attach3(
    State(s): State<AppState>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Q,
    req: Request,
) -> Response {
    remote(
        s,
        remotecommand::Action::Attach,
        ns,
        pod,
        None,
        container,
        q,
        req,
    )
    .await
}

async fn attach4(
    State(s): State<AppState>,
    Path((ns, pod, uid, container)): Path<(String, String, String, String)>,
    Query(q): Q,
    req: Request,
) -> Response {
    remote(
        s,
        remotecommand::Action::Attach,
        ns,
        pod,
        Some(uid),
        container,
        q,
        req,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn remote(
    s: AppState,
    action: remotecommand::Action,
    ns: String,
    pod: String,
    uid: Option<String>,
    container: String,
    q: Vec<(String, String)>,
    mut req: Request,
) -> Response {
    let opts = remotecommand::Options::from_query(&q);
    if matches!(action, remotecommand::Action::Exec) && opts.command.is_empty() {
        return bad_request("exec: give the command with one or more command= query parameters");
    }
    if !opts.stdin && !opts.stdout && !opts.stderr {
        return bad_request("you must specify at least one of stdin, stdout, stderr");
    }
    let p = match find_pod(&s, &ns, &pod, uid.as_deref()) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let c = match find_container(&p, &container) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let id = match running_id(&p, &c) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    if upgrade::kind(req.headers()) != Kind::None {
        let sreq = match action {
            remotecommand::Action::Exec => StreamRequest::Exec {
                id: id.clone(),
                argv: opts.command.clone(),
                tty: opts.tty,
                stdin: opts.stdin,
                stdout: opts.stdout,
                stderr: opts.stderr,
            },
            remotecommand::Action::Attach => StreamRequest::Attach {
                id: id.clone(),
                tty: opts.tty,
                stdin: opts.stdin,
                stdout: opts.stdout,
                stderr: opts.stderr,
            },
        };
        match s.runtime.streaming_url(sreq).await {
            Ok(Some(url)) => return stream_proxy::forward(&url, req).await,
            Ok(None) => {}
            Err(e) => {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    format!("the container runtime refused the stream: {e}"),
                );
            }
        }
    }
    let Some(on) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return bad_request("exec and attach need a connection upgrade (WebSocket or SPDY/3.1)");
    };
    let runtime = s.runtime.clone();
    match upgrade::kind(req.headers()) {
        Kind::WebSocket => {
            let offered = upgrade::list(req.headers(), "sec-websocket-protocol");
            let proto = match upgrade::choose(&offered, remotecommand::WS_PROTOCOLS) {
                Ok(p) => p,
                Err(e) => return bad_request(e),
            };
            let resp = match upgrade::websocket_response(req.headers(), proto.as_deref()) {
                Ok(r) => r,
                Err(e) => return bad_request(e),
            };
            tokio::spawn(async move {
                let Some(io) = upgrade::take(on).await else {
                    return;
                };
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                remotecommand::serve_websocket(
                    ws,
                    proto.unwrap_or_default(),
                    action,
                    runtime,
                    id,
                    opts,
                )
                .await;
            });
            resp
        }
        Kind::Spdy => {
            let offered = upgrade::list(req.headers(), "x-stream-protocol-version");
            let proto = match upgrade::choose(&offered, remotecommand::SPDY_PROTOCOLS) {
                Ok(p) => p,
                Err(e) => return status(StatusCode::FORBIDDEN, "Forbidden", e),
            };
            let resp = upgrade::spdy_response(proto.as_deref());
            tokio::spawn(async move {
                let Some(io) = upgrade::take(on).await else {
                    return;
                };
                remotecommand::serve_spdy(
                    io,
                    proto.unwrap_or_else(|| "channel.k8s.io".into()),
                    action,
                    runtime,
                    id,
                    opts,
                )
                .await;
            });
            resp
        }
        Kind::None => bad_request(
            "exec and attach need a connection upgrade: Upgrade: websocket or Upgrade: SPDY/3.1",
        ),
    }
}

async fn port_forward2(
    State(s): State<AppState>,
    Path((ns, pod)): Path<(String, String)>,
    Query(q): Q,
    req: Request,
) -> Response {
    port_forward(s, ns, pod, None, q, req).await
}

async fn port_forward3(
    State(s): State<AppState>,
    Path((ns, pod, uid)): Path<(String, String, String)>,
    Query(q): Q,
    req: Request,
) -> Response {
    port_forward(s, ns, pod, Some(uid), q, req).await
}

async fn port_forward(
    s: AppState,
    ns: String,
    pod: String,
    uid: Option<String>,
    q: Vec<(String, String)>,
    mut req: Request,
) -> Response {
    let p = match find_pod(&s, &ns, &pod, uid.as_deref()) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let Some(sandbox) = p.sandbox_id.clone() else {
        return bad_request(format!(
            "pod \"{pod}\" has no sandbox yet: wait until it is running"
        ));
    };
    if upgrade::kind(req.headers()) != Kind::None {
        let ports = q
            .iter()
            .filter(|(k, _)| k == "port")
            .filter_map(|(_, v)| v.parse::<u16>().ok())
            .collect();
        let sreq = StreamRequest::PortForward {
            sandbox_id: sandbox.clone(),
            ports,
        };
        match s.runtime.streaming_url(sreq).await {
            Ok(Some(url)) => return stream_proxy::forward(&url, req).await,
            Ok(None) => {}
            Err(e) => {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    format!("the container runtime refused the port-forward: {e}"),
                );
            }
        }
    }
    let Some(on) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return bad_request("port-forward needs a connection upgrade (SPDY/3.1 or WebSocket)");
    };
    let runtime = s.runtime.clone();
    match upgrade::kind(req.headers()) {
        Kind::Spdy => {
            let offered = upgrade::list(req.headers(), "x-stream-protocol-version");
            let proto = match upgrade::choose(&offered, &[portforward::SPDY_PROTOCOL]) {
                Ok(p) => p,
                Err(e) => return status(StatusCode::FORBIDDEN, "Forbidden", e),
            };
            let resp = upgrade::spdy_response(proto.as_deref());
            tokio::spawn(async move {
                let Some(io) = upgrade::take(on).await else {
                    return;
                };
                portforward::serve_spdy(io, runtime, sandbox).await;
            });
            resp
        }
        Kind::WebSocket => {
            let offered = upgrade::list(req.headers(), "sec-websocket-protocol");
            let mut supported = vec![portforward::WS_SPDY_TUNNEL];
            supported.extend_from_slice(portforward::WS_CHANNEL_PROTOCOLS);
            let proto = match upgrade::choose(&offered, &supported) {
                Ok(p) => p,
                Err(e) => return bad_request(e),
            };
            let tunnel = proto.as_deref() == Some(portforward::WS_SPDY_TUNNEL);
            let mut ports = Vec::new();
            if !tunnel {
                for (k, v) in &q {
                    if k == "port" {
                        match v.parse::<u16>() {
                            Ok(p) if p > 0 => ports.push(p),
                            _ => {
                                return bad_request(format!(
                                    "port {v:?} is not a valid port number"
                                ));
                            }
                        }
                    }
                }
                if ports.is_empty() {
                    return bad_request(
                        "port-forward over WebSocket channels needs port= query parameters",
                    );
                }
            }
            let resp = match upgrade::websocket_response(req.headers(), proto.as_deref()) {
                Ok(r) => r,
                Err(e) => return bad_request(e),
            };
            tokio::spawn(async move {
                let Some(io) = upgrade::take(on).await else {
                    return;
                };
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                if tunnel {
                    portforward::serve_ws_tunnel(ws, runtime, sandbox).await;
                } else {
                    portforward::serve_ws_channels(ws, runtime, sandbox, ports).await;
                }
            });
            resp
        }
        Kind::None => bad_request(
            "port-forward needs a connection upgrade: Upgrade: SPDY/3.1 or Upgrade: websocket",
        ),
    }
}

fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn summary(State(s): State<AppState>) -> Response {
    let name = s
        .pods
        .pods()
        .iter()
        .find_map(|p| p.pod.spec.as_ref().and_then(|sp| sp.node_name.clone()))
        .unwrap_or_else(node_name);
    let doc = stats::summary(&s.runtime, &s.pods, &s.samples, &name).await;
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_string(),
    )
        .into_response()
}

async fn metrics_resource(State(s): State<AppState>) -> Response {
    let text = stats::resource_metrics(&s.runtime, &s.pods).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
