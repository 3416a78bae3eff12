//! `skiff agent`: joins a server and runs the node half. As k3s's agent does, it fetches the
//! cluster CA from `<server>/cacerts`, checks it against the hash in a `K10` token (a bare
//! secret is accepted with a warning: the CA is then trusted on first use), asks
//! `<server>/v1-skiff/node-certs` (basic auth with the token's credentials, over TLS verified
//! with that CA) for its certificates, keeps them under `<data-dir>/agent/tls` (0600, reused on
//! restart), and runs the same runtime, kubelet, overlay, service proxy and DNS as a server's
//! node half, with API clients over HTTPS.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use skiff_pki::join::{JoinToken, NodeCerts};

use crate::join::JoinResponse;
use crate::node::{NodeClients, NodeConfig, NodeTls};
use crate::server::{AppError, NodeFlags};

/// Configuration of `skiff agent`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Everything lives under this directory (`agent/` inside it).
    pub data_dir: PathBuf,
    /// The server's URL (`https://host:6443`).
    pub server: String,
    /// The join token (`K10<hash>::server:<secret>`, or the bare secret).
    pub token: String,
    /// Node name (default: hostname).
    pub node_name: Option<String>,
    /// Node flags (the same as the server's).
    pub node: NodeFlags,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's address parts.
#[derive(Debug, Clone)]
struct ServerUrl {
    url: String,
    host: String,
    port: u16,
}

fn parse_server_url(s: &str) -> Result<ServerUrl, AppError> {
    let bad = |why: &str| {
        AppError::Config(format!(
            "--server {s:?}: {why} (expected https://<server address>:6443)"
        ))
    };
    let uri: http::Uri = s.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad("no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(6443);
    let shown = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    Ok(ServerUrl {
        url: format!("https://{shown}:{port}"),
        host,
        port,
    })
}

/// Accepts any server certificate: only for `GET /cacerts`, whose answer is then checked
/// against the token's hash (k3s does the same).
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_any() -> Result<Arc<rustls::ClientConfig>, AppError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| AppError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn tls_with_ca(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, AppError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in skiff_pki::pem_certs_der(ca_pem) {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| AppError::Tls(format!("the server's CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(AppError::Config(
            "the server's /cacerts answer holds no PEM certificate".into(),
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AppError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One HTTP/1.1 request over TLS; returns (status, body). Errors are connection failures.
async fn request(
    server: &ServerUrl,
    tls: Arc<rustls::ClientConfig>,
    req: http::Request<axum::body::Body>,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((server.host.as_str(), server.port)),
    )
    .await
    .map_err(|_| format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
    .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(server.host.clone()).map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| "no answer within 30s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), 4 * 1024 * 1024)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_vec()))
}

fn unreachable(server: &ServerUrl, e: &str) -> AppError {
    AppError::Config(format!(
        "cannot reach the server at {}: {e}; check --server and that `skiff server` runs there and is reachable from this machine",
        server.url
    ))
}

/// Fetches and checks the CA bundle.
async fn fetch_ca(server: &ServerUrl, token: &JoinToken) -> Result<String, AppError> {
    let req = http::Request::get("/cacerts")
        .header(http::header::HOST, &server.host)
        .body(axum::body::Body::empty())
        .map_err(|e| AppError::Config(e.to_string()))?;
    let (code, body) = request(server, tls_any()?, req)
        .await
        .map_err(|e| unreachable(server, &e))?;
    if code != 200 {
        return Err(AppError::Config(format!(
            "{}/cacerts answered HTTP {code}: is this a skiff server?",
            server.url
        )));
    }
    let ca = String::from_utf8(body)
        .map_err(|_| AppError::Config(format!("{}/cacerts is not a PEM bundle", server.url)))?;
    let got = skiff_pki::join::sha256_hex(ca.as_bytes());
    match &token.ca_hash {
        Some(want) if *want != got => Err(AppError::Config(format!(
            "the CA of {} (sha256 {got}) does not match the CA hash in --token ({want}): the token belongs to another cluster or this is not its server; copy the token again from <data-dir>/server/node-token on the server",
            server.url
        ))),
        Some(_) => Ok(ca),
        None => {
            tracing::warn!(
                server = %server.url,
                ca_sha256 = %got,
                "the token is a bare secret: the server's CA is trusted without verification; use the full K10 token from <data-dir>/server/node-token"
            );
            Ok(ca)
        }
    }
}

/// Asks the server for this node's certificates.
async fn fetch_certs(
    server: &ServerUrl,
    token: &JoinToken,
    ca: &str,
    node_name: &str,
    node_ip: IpAddr,
) -> Result<JoinResponse, AppError> {
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", token.username, token.password));
    let body = serde_json::json!({"nodeName": node_name, "nodeIP": node_ip.to_string()});
    let req = http::Request::post("/v1-skiff/node-certs")
        .header(http::header::HOST, &server.host)
        .header(http::header::AUTHORIZATION, format!("Basic {auth}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .map_err(|e| AppError::Config(e.to_string()))?;
    let (code, body) = request(server, tls_with_ca(ca)?, req)
        .await
        .map_err(|e| unreachable(server, &e))?;
    match code {
        200 => serde_json::from_slice(&body).map_err(|e| {
            AppError::Config(format!(
                "{}: the node-certs answer is not understood ({e}); are agent and server the same skiff version?",
                server.url
            ))
        }),
        401 => Err(AppError::Config(format!(
            "{} refused the token (401 Unauthorized): check --token against <data-dir>/server/node-token on the server",
            server.url
        ))),
        _ => {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            Err(AppError::Config(format!(
                "{} refused to issue certificates for node {node_name}: HTTP {code}: {msg}",
                server.url
            )))
        }
    }
}

/// The agent's stored credentials.
struct Stored {
    ca: String,
    join: JoinResponse,
}

const FILES: [&str; 7] = [
    "ca.crt",
    "node.crt",
    "node.key",
    "proxy.crt",
    "proxy.key",
    "serving.crt",
    "serving.key",
];

fn load_stored(dir: &Path) -> Option<Stored> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let files: Vec<String> = FILES.iter().map(|f| read(f)).collect::<Option<_>>()?;
    let cluster: serde_json::Value = serde_json::from_str(&read("cluster.json")?).ok()?;
    let s = |k: &str| cluster.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Some(Stored {
        ca: files[0].clone(),
        join: JoinResponse {
            certs: NodeCerts {
                node_cert_pem: files[1].clone(),
                node_key_pem: files[2].clone(),
                proxy_cert_pem: files[3].clone(),
                proxy_key_pem: files[4].clone(),
                serving_cert_pem: files[5].clone(),
                serving_key_pem: files[6].clone(),
            },
            cluster_cidr: s("clusterCIDR")?,
            service_cidr: s("serviceCIDR")?,
        },
    })
}

fn store(dir: &Path, st: &Stored) -> Result<(), AppError> {
    std::fs::create_dir_all(dir).map_err(|source| AppError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let c = &st.join.certs;
    let contents = [
        &st.ca,
        &c.node_cert_pem,
        &c.node_key_pem,
        &c.proxy_cert_pem,
        &c.proxy_key_pem,
        &c.serving_cert_pem,
        &c.serving_key_pem,
    ];
    for (f, text) in FILES.iter().zip(contents) {
        skiff_pki::write_file(&dir.join(f), text.as_bytes(), 0o600)?;
    }
    let cluster = serde_json::json!({
        "clusterCIDR": st.join.cluster_cidr,
        "serviceCIDR": st.join.service_cidr,
    });
    skiff_pki::write_file(
        &dir.join("cluster.json"),
        cluster.to_string().as_bytes(),
        0o600,
    )?;
    Ok(())
}

/// Whether stored credentials fit this token, node name and IP and are not about to expire.
fn reusable(st: &Stored, token: &JoinToken, node_name: &str, node_ip: IpAddr) -> bool {
    if let Some(h) = &token.ca_hash
        && *h != skiff_pki::join::sha256_hex(st.ca.as_bytes())
    {
        return false;
    }
    let horizon = time_now() + skiff_pki::RENEW_BEFORE.whole_seconds();
    let node = skiff_pki::cert_info_pem(&st.join.certs.node_cert_pem);
    let serving = skiff_pki::cert_info_pem(&st.join.certs.serving_cert_pem);
    let proxy = skiff_pki::cert_info_pem(&st.join.certs.proxy_cert_pem);
    match (node, serving, proxy) {
        (Ok(n), Ok(s), Ok(p)) => {
            n.common_name == format!("system:node:{node_name}")
                && s.sans.contains(&node_ip.to_string())
                && s.sans.contains(&node_name.to_string())
                && [n.not_after, s.not_after, p.not_after]
                    .iter()
                    .all(|t| *t > horizon)
        }
        _ => false,
    }
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn client_from(
    path: &Path,
    server: &ServerUrl,
    ca: &str,
    cert: &str,
    key: &str,
) -> Result<kube::Client, AppError> {
    let yaml = skiff_pki::kubeconfig_yaml(&server.url, ca, cert, key);
    skiff_pki::write_file(path, yaml.as_bytes(), 0o600)?;
    let bad = |e: String| AppError::Config(format!("{}: {e}", path.display()));
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| bad(e.to_string()))
}

/// Joins the server and runs the node half until `shutdown` completes. `ready` is called once
/// with the node name when the kubelet serves.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&str, &str),
) -> Result<(), AppError> {
    let server = parse_server_url(&cfg.server)?;
    let token = skiff_pki::join::parse_token(&cfg.token)
        .map_err(|e| AppError::Config(format!("--token: {e}")))?;
    let node_name = cfg
        .node_name
        .clone()
        .or_else(crate::server::hostname)
        .ok_or_else(|| AppError::Config("no --node-name and no hostname to use".into()))?;
    if !skiff_pki::join::valid_node_name(&node_name) {
        return Err(AppError::Config(format!(
            "node name {node_name:?} is not valid (lower-case letters, digits, '-' and '.'): give --node-name"
        )));
    }
    let node_ip = match cfg.node.node_ip {
        Some(ip) => ip,
        None => IpAddr::V4(skiff_kubelet::node::detect_node_ip(None)),
    };
    let agent_dir = cfg.data_dir.join("agent");
    let tls_dir = agent_dir.join("tls");
    let stored = match load_stored(&tls_dir) {
        Some(st) if reusable(&st, &token, &node_name, node_ip) => {
            tracing::info!(dir = %tls_dir.display(), "reusing the stored node credentials");
            st
        }
        _ => {
            let ca = fetch_ca(&server, &token).await?;
            let join = fetch_certs(&server, &token, &ca, &node_name, node_ip).await?;
            let st = Stored { ca, join };
            store(&tls_dir, &st)?;
            tracing::info!(server = %server.url, node = %node_name, dir = %tls_dir.display(), "joined: node credentials stored");
            st
        }
    };
    let c = &stored.join.certs;
    let kubelet = client_from(
        &agent_dir.join("kubelet.kubeconfig"),
        &server,
        &stored.ca,
        &c.node_cert_pem,
        &c.node_key_pem,
    )
    .await?;
    let proxy = client_from(
        &agent_dir.join("kubeproxy.kubeconfig"),
        &server,
        &stored.ca,
        &c.proxy_cert_pem,
        &c.proxy_key_pem,
    )
    .await?;
    let clients = NodeClients {
        dns: kubelet.clone(),
        kubelet,
        proxy,
    };
    let node_cfg = NodeConfig {
        node_name: node_name.clone(),
        node_ip: Some(node_ip),
        labels: cfg.node.labels.clone(),
        taints: cfg.node.taints.clone(),
        cluster_dns: cfg.node.cluster_dns.clone(),
        pod_cidr: cfg.node.pod_cidr.clone(),
        service_cidr: Some(stored.join.service_cidr.clone()),
        kubelet_port: cfg.node.kubelet_port,
        bind_address: IpAddr::from([0, 0, 0, 0]),
        control_plane: false,
        cluster_cidr: Some(stored.join.cluster_cidr.clone()),
        resolv_conf: cfg.node.resolv_conf.clone(),
        network_backend: cfg.node.network_backend,
        kubelet_args: cfg.node.kubelet_args.clone(),
        container_runtime_endpoint: cfg.node.container_runtime_endpoint.clone(),
        cni_conf_dir: cfg.node.cni_conf_dir.clone(),
        cni_bin_dirs: cfg.node.cni_bin_dirs.clone(),
    };
    let tls = NodeTls {
        serving_cert_pem: c.serving_cert_pem.clone(),
        serving_key_pem: c.serving_key_pem.clone(),
        client_ca_pem: stored.ca.clone(),
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (task, addr) = crate::node::start(&cfg.data_dir, &node_cfg, clients, &tls, stop_rx).await?;
    ready(&node_name, &server.url);
    tracing::info!(node = %node_name, server = %server.url, kubelet = %addr, "agent ready");
    crate::memory::release_startup_pages_later();
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    if tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .is_err()
    {
        tracing::warn!("the node did not stop within 15s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let u = parse_server_url("https://10.0.0.1:6444").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("10.0.0.1", 6444));
        let u = parse_server_url("https://example.test").unwrap();
        assert_eq!(u.port, 6443);
        assert_eq!(u.url, "https://example.test:6443");
        for bad in ["http://10.0.0.1:6443", "10.0.0.1", ""] {
            let e = parse_server_url(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn stored_credentials_round_trip_and_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = skiff_pki::ensure_server_pki(&tmp.path().join("srv"), &[]).unwrap();
        let ip: IpAddr = "192.0.2.4".parse().unwrap();
        let certs = skiff_pki::join::issue_node_certs(&pki.dir, "w1", Some(ip)).unwrap();
        let st = Stored {
            ca: pki.ca_cert_pem.clone(),
            join: JoinResponse {
                certs,
                cluster_cidr: "10.42.0.0/16".into(),
                service_cidr: "10.43.0.0/16".into(),
            },
        };
        let dir = tmp.path().join("agent").join("tls");
        store(&dir, &st).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for f in FILES.iter().chain(&["cluster.json"]) {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let back = load_stored(&dir).unwrap();
        let token =
            skiff_pki::join::parse_token(&skiff_pki::join::format_token(&pki.ca_cert_pem, "x"))
                .unwrap();
        assert!(reusable(&back, &token, "w1", ip));
        assert!(!reusable(&back, &token, "w2", ip), "another node name");
        assert!(
            !reusable(&back, &token, "w1", "192.0.2.5".parse().unwrap()),
            "another node IP"
        );
        let other =
            skiff_pki::join::parse_token(&format!("K10{}::server:x", "0".repeat(64))).unwrap();
        assert!(!reusable(&back, &other, "w1", ip), "another CA");
    }
}
