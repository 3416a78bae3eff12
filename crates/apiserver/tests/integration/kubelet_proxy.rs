//! The streaming proxy against a fake kubelet (HTTPS, client certificate required): followed logs,
//! WebSocket and raw SPDY upgrades relayed both ways, node proxy, and kube-apiserver's errors.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use serde_json::{Value, json};
use skiff_apiserver::{ApiState, Config, Identity, KubeletClientTls, router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::ServiceExt;

struct Pki {
    ca_pem: String,
    serving: (String, String),
    client: (String, String),
    other_ca_pem: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test-ca");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |cn: &str, server: bool, issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if server {
            p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let c = p.signed_by(&key, issuer).unwrap();
        (c.pem(), key.serialize_pem())
    };
    // A second, unrelated CA: a kubelet certificate from it must be refused.
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other_pem = other.self_signed(&other_key).unwrap().pem();
    Pki {
        ca_pem: ca_cert.pem(),
        serving: leaf("kubelet", true, &issuer),
        client: leaf("kube-apiserver-kubelet-client", false, &issuer),
        other_ca_pem: other_pem,
    }
}

fn der_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    skiff_pki::pem_certs_der(pem)
        .into_iter()
        .map(Into::into)
        .collect()
}

fn der_key(pem: &str) -> rustls::pki_types::PrivateKeyDer<'static> {
    rustls::pki_types::PrivateKeyDer::Pkcs8(skiff_pki::pem_key_der(pem).unwrap().into())
}

/// What the fake kubelet saw: "METHOD URI" plus selected headers, one entry per request.
type Seen = Arc<Mutex<Vec<String>>>;

/// A fake kubelet over HTTPS that requires a client certificate signed by `ca_pem`.
async fn fake_kubelet(
    ca_pem: &str,
    serving: &(String, String),
    release: Arc<Notify>,
) -> (SocketAddr, Seen) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in der_certs(ca_pem) {
        roots.add(c).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(der_certs(&serving.0), der_key(&serving.1))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            let release = release.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    let release = release.clone();
                    async move { Ok::<_, std::convert::Infallible>(kubelet(req, seen, release)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen)
}

fn kubelet(
    mut req: Request<hyper::body::Incoming>,
    seen: Seen,
    release: Arc<Notify>,
) -> Response<Body> {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    seen.lock().unwrap().push(format!(
        "{} {} upgrade={} proto={} auth={}",
        req.method(),
        req.uri(),
        h("upgrade"),
        h("sec-websocket-protocol"),
        h("authorization"),
    ));
    let path = req.uri().path().to_string();
    if path.starts_with("/containerLogs/") {
        let stream = futures::stream::unfold(0, move |i| {
            let release = release.clone();
            async move {
                match i {
                    0 => Some((Ok::<_, std::io::Error>(bytes::Bytes::from("line1\n")), 1)),
                    1 => {
                        release.notified().await;
                        Some((Ok(bytes::Bytes::from("line2\n")), 2))
                    }
                    _ => None,
                }
            }
        });
        return Response::builder()
            .header("content-type", "text/plain")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    if !h("upgrade").is_empty() {
        let upgrade = h("upgrade");
        let proto = h("sec-websocket-protocol");
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let io = on.await.unwrap();
            let mut io = TokioIo::new(io);
            let mut buf = [0u8; 1024];
            loop {
                let n = match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&buf[..n]);
                if io.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", upgrade.as_str());
        if upgrade.eq_ignore_ascii_case("websocket") {
            let first = proto.split(',').next().unwrap_or("").trim().to_string();
            resp = resp
                .header("sec-websocket-accept", "fake-accept")
                .header("sec-websocket-protocol", first);
        } else {
            resp = resp.header("x-stream-protocol-version", "portforward.k8s.io");
        }
        return resp.body(Body::empty()).unwrap();
    }
    Response::builder()
        .header("x-seen-path", req.uri().to_string())
        .body(Body::from("ok"))
        .unwrap()
}

fn admin() -> Identity {
    Identity {
        user: "system:admin".into(),
        groups: vec!["system:masters".into()],
        uid: String::new(),
    }
}

struct Setup {
    router: axum::Router,
    api: SocketAddr,
    kubelet_seen: Seen,
    release: Arc<Notify>,
}

async fn call(router: &axum::Router, method: Method, path: &str, body: Value) -> (u16, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    req.extensions_mut().insert(admin());
    let resp = router.clone().oneshot(req).await.unwrap();
    let code = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn node(router: &axum::Router, name: &str, port: u16) {
    let n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
                   "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
    let (code, body) = call(router, Method::POST, "/api/v1/nodes", n).await;
    assert_eq!(code, 201, "{body}");
}

async fn pod(router: &axum::Router, name: &str, node: &str, containers: &[&str]) {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": containers.iter().map(|c| json!({"name": c, "image": "busybox"})).collect::<Vec<_>>()}});
    if !node.is_empty() {
        p["spec"]["nodeName"] = json!(node);
    }
    let (code, body) = call(router, Method::POST, "/api/v1/namespaces/default/pods", p).await;
    assert_eq!(code, 201, "{body}");
}

async fn setup_with(client: (String, String), ca_pem: String, p: &Pki) -> Setup {
    let release = Arc::new(Notify::new());
    let (kaddr, kubelet_seen) = fake_kubelet(&p.ca_pem, &p.serving, release.clone()).await;
    let config = Config {
        kubelet_client: Some(KubeletClientTls {
            ca_pem,
            cert_pem: client.0,
            key_pem: client.1,
        }),
        ..Default::default()
    };
    let state = ApiState::new(skiff_store::memory(), config).await.unwrap();
    let router = router(state);
    node(&router, "n1", kaddr.port()).await;
    // n2's kubelet port is closed: bind a port, then drop the listener.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    node(&router, "n2", closed_port).await;
    pod(&router, "one", "n1", &["c1"]).await;
    pod(&router, "two", "n1", &["a", "b"]).await;
    pod(&router, "pending", "", &["c1"]).await;
    pod(&router, "lost", "n2", &["c1"]).await;

    // The API router served over plain HTTP/1.1 with upgrades, the way the app serves it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let r2 = router.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let router = r2.clone();
            tokio::spawn(async move {
                let svc = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(admin());
                    router.clone().oneshot(req.map(Body::new))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(
                        TokioIo::new(tcp),
                        TowerToHyperService::new(svc),
                    )
                    .await;
            });
        }
    });
    Setup {
        router,
        api,
        kubelet_seen,
        release,
    }
}

async fn setup() -> Setup {
    let p = pki();
    setup_with(p.client.clone(), p.ca_pem.clone(), &p).await
}

/// Reads from `s` until `needle` appears in what was read (10 s at most); returns all of it.
async fn read_until(s: &mut TcpStream, acc: &mut Vec<u8>, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(acc).to_string();
        if text.contains(needle) {
            return text;
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {needle:?}; got {text:?}"))
            .unwrap();
        assert!(n > 0, "connection closed before {needle:?}; got {text:?}");
        acc.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn followed_logs_stream_through() {
    let s = setup().await;
    let mut c = TcpStream::connect(s.api).await.unwrap();
    c.write_all(
        b"GET /api/v1/namespaces/default/pods/one/log?follow=true&tailLines=5&timestamps=true HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut acc = Vec::new();
    // line1 arrives while the kubelet still holds line2 back: the body is streamed.
    let head = read_until(&mut c, &mut acc, "line1").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(!head.contains("line2"));
    s.release.notify_one();
    let all = read_until(&mut c, &mut acc, "0\r\n\r\n").await;
    assert!(all.contains("line2"), "{all}");
    let seen = s.kubelet_seen.lock().unwrap().clone();
    assert_eq!(
        seen[0],
        "GET /containerLogs/default/one/c1?follow=true&tailLines=5&timestamps=true upgrade= proto= auth="
    );
}

#[tokio::test]
async fn websocket_exec_is_relayed_both_ways() {
    let s = setup().await;
    let mut c = TcpStream::connect(s.api).await.unwrap();
    c.write_all(
        b"GET /api/v1/namespaces/default/pods/two/exec?container=b&command=sh&command=-c&stdin=true&stdout=true HTTP/1.1\r\n\
          host: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          sec-websocket-version: 13\r\nsec-websocket-protocol: v5.channel.k8s.io, v4.channel.k8s.io\r\n\
          authorization: Bearer secret\r\n\r\n",
    )
    .await
    .unwrap();
    let mut acc = Vec::new();
    let head = read_until(&mut c, &mut acc, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_lowercase();
    assert!(
        lower.contains("sec-websocket-protocol: v5.channel.k8s.io"),
        "{head}"
    );
    assert!(
        lower.contains("sec-websocket-accept: fake-accept"),
        "{head}"
    );
    assert!(lower.contains("upgrade: websocket"), "{head}");
    acc.clear();
    c.write_all(b"ping-1").await.unwrap();
    read_until(&mut c, &mut acc, "echo:ping-1").await;
    c.write_all(b"ping-2").await.unwrap();
    read_until(&mut c, &mut acc, "echo:ping-2").await;
    let seen = s.kubelet_seen.lock().unwrap().clone();
    assert_eq!(
        seen[0],
        "GET /exec/default/two/b?command=sh&command=-c&stdin=true&stdout=true upgrade=websocket \
         proto=v5.channel.k8s.io, v4.channel.k8s.io auth="
    );
}

#[tokio::test]
async fn raw_spdy_portforward_and_attach_are_relayed() {
    let s = setup().await;
    for (path, kubelet_path) in [
        (
            "/api/v1/namespaces/default/pods/one/portforward?ports=80",
            "POST /portForward/default/one?ports=80",
        ),
        (
            "/api/v1/namespaces/default/pods/one/attach?stdout=true",
            "POST /attach/default/one/c1?stdout=true",
        ),
    ] {
        let mut c = TcpStream::connect(s.api).await.unwrap();
        c.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: SPDY/3.1\r\n\
                 x-stream-protocol-version: portforward.k8s.io\r\ncontent-length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut acc = Vec::new();
        let head = read_until(&mut c, &mut acc, "\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.to_lowercase().contains("upgrade: spdy/3.1"), "{head}");
        assert!(
            head.to_lowercase()
                .contains("x-stream-protocol-version: portforward.k8s.io"),
            "{head}"
        );
        acc.clear();
        c.write_all(b"\x00\x03\x00\x01frame").await.unwrap();
        read_until(&mut c, &mut acc, "echo:\u{0}\u{3}\u{0}\u{1}frame").await;
        let seen = s.kubelet_seen.lock().unwrap().clone();
        assert!(seen.iter().any(|l| l.starts_with(kubelet_path)), "{seen:?}");
    }
}

#[tokio::test]
async fn node_proxy_maps_the_path() {
    let s = setup().await;
    let mut req = Request::builder()
        .uri("/api/v1/nodes/n1/proxy/stats/summary?only_cpu_and_memory=true")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(admin());
    let resp = s.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-seen-path"],
        "/stats/summary?only_cpu_and_memory=true"
    );
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(&body[..], b"ok");
    // Discovery lists the subresource.
    let (_, list) = call(&s.router, Method::GET, "/api/v1", Value::Null).await;
    assert!(
        list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "nodes/proxy"),
        "{list}"
    );
}

fn assert_status(body: &Value, code: u16, reason: &str, message: &str) {
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(message),
        "{body}"
    );
}

#[tokio::test]
async fn kube_apiserver_errors() {
    let s = setup().await;
    let get = |p: &'static str| call(&s.router, Method::GET, p, Value::Null);
    let (code, body) = get("/api/v1/namespaces/default/pods/two/log").await;
    assert_eq!(code, 400);
    assert_status(
        &body,
        400,
        "BadRequest",
        "a container name must be specified for pod two, choose one of: [a b]",
    );
    let (code, body) = get("/api/v1/namespaces/default/pods/one/log?container=nope").await;
    assert_eq!(code, 400);
    assert_status(
        &body,
        400,
        "BadRequest",
        "container nope is not valid for pod one",
    );
    let (code, body) = get("/api/v1/namespaces/default/pods/pending/log").await;
    assert_eq!(code, 400);
    assert_status(
        &body,
        400,
        "BadRequest",
        "pod pending does not have a host assigned",
    );
    let (code, body) = get("/api/v1/namespaces/default/pods/lost/log").await;
    assert_eq!(code, 500);
    assert_status(&body, 500, "InternalError", "error dialing backend");
    assert!(
        body["message"].as_str().unwrap().contains("node n2"),
        "{body}"
    );
    let (code, body) = get("/api/v1/namespaces/default/pods/missing/log").await;
    assert_eq!(code, 404);
    assert_status(&body, 404, "NotFound", "pods \"missing\" not found");
    // An upgrade over a connection that cannot upgrade (in-process, like HTTP/2) is refused.
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/namespaces/default/pods/one/exec?command=ls")
        .header("connection", "Upgrade")
        .header("upgrade", "SPDY/3.1")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(admin());
    let resp = s.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(s.kubelet_seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn kubelet_certificate_must_chain_to_the_cluster_ca() {
    let p = pki();
    // The API server trusts only a CA that did not sign the kubelet's certificate.
    let s = setup_with(p.client.clone(), p.other_ca_pem.clone(), &p).await;
    let (code, body) = call(
        &s.router,
        Method::GET,
        "/api/v1/namespaces/default/pods/one/log",
        Value::Null,
    )
    .await;
    assert_eq!(code, 500, "{body}");
    assert_status(&body, 500, "InternalError", "TLS handshake");
    assert!(s.kubelet_seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn no_kubelet_credentials_is_503() {
    let state = ApiState::new(skiff_store::memory(), Config::default())
        .await
        .unwrap();
    let router = router(state);
    node(&router, "n1", 1).await;
    pod(&router, "one", "n1", &["c1"]).await;
    let (code, body) = call(
        &router,
        Method::GET,
        "/api/v1/namespaces/default/pods/one/log",
        Value::Null,
    )
    .await;
    assert_eq!(code, 503, "{body}");
}
