//! `skiff server`: opens the store, prepares the PKI and the cluster join token, serves the API
//! (and the agents' join endpoints) over HTTPS (HTTP/1.1 and HTTP/2, client certificates
//! optional) and stops cleanly on the shutdown signal.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use skiff_apiserver::{ApiState, Identity};
use skiff_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Configuration of `skiff server` (validated by [`ServerConfig::validate`]).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Everything lives under this directory.
    pub data_dir: PathBuf,
    /// HTTPS port; 0 picks a free one.
    pub https_listen_port: u16,
    /// Address to listen on.
    pub bind_address: IpAddr,
    /// Extra serving-certificate SANs.
    pub tls_sans: Vec<String>,
    /// External datastore (etcd URL); None = embedded redb.
    pub datastore_endpoint: Option<String>,
    /// Cluster token (agents join with it; with an external datastore it also seals the
    /// cluster's bootstrap data; not an API credential).
    pub token: Option<String>,
    /// Service CIDR.
    pub service_cidr: String,
    /// Cluster (pod) CIDR.
    pub cluster_cidr: String,
    /// Node name (default: hostname).
    pub node_name: Option<String>,
    /// Run without the node half.
    pub disable_agent: bool,
    /// Node flags of the kubelet (unused with `disable_agent`).
    pub node: NodeFlags,
}

/// Node flags of `skiff server` (`--node-ip`, `--node-label`, ...).
#[derive(Debug, Clone)]
pub struct NodeFlags {
    /// InternalIP of the node.
    pub node_ip: Option<IpAddr>,
    /// `k=v` labels.
    pub labels: Vec<String>,
    /// `k=v:Effect` taints.
    pub taints: Vec<String>,
    /// Cluster DNS address.
    pub cluster_dns: String,
    /// Pod CIDR override (tests).
    pub pod_cidr: Option<String>,
    /// Kubelet port (0 = free).
    pub kubelet_port: u16,
    /// resolv.conf for the cluster DNS upstreams and dnsPolicy Default pods (None:
    /// `/etc/resolv.conf`).
    pub resolv_conf: Option<PathBuf>,
    /// How pod traffic reaches other nodes (default vxlan).
    pub network_backend: crate::overlay::NetworkBackend,
    /// `--kubelet-arg name=value` (eviction and image GC settings).
    pub kubelet_args: Vec<String>,
    /// An external CRI runtime (`unix:///run/containerd/containerd.sock`) instead of the
    /// built-in one.
    pub container_runtime_endpoint: Option<String>,
    /// `--cni-conf-dir`: external CNI plugins attach pods (built-in runtime only).
    pub cni_conf_dir: Option<PathBuf>,
    /// `--cni-bin-dir` (repeatable; empty: /usr/lib/cni and /opt/cni/bin).
    pub cni_bin_dirs: Vec<PathBuf>,
}

impl Default for NodeFlags {
    fn default() -> Self {
        NodeFlags {
            node_ip: None,
            labels: Vec::new(),
            taints: Vec::new(),
            cluster_dns: "10.43.0.10".into(),
            pod_cidr: None,
            kubelet_port: 10250,
            resolv_conf: None,
            network_backend: crate::overlay::NetworkBackend::default(),
            kubelet_args: Vec::new(),
            container_runtime_endpoint: None,
            cni_conf_dir: None,
            cni_bin_dirs: Vec::new(),
        }
    }
}

/// Errors of the server. [`AppError::exit_code`] maps them to the CLI contract.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad flags or configuration (exit 2).
    #[error("{0}")]
    Config(String),
    /// The store file is not a skiff store or is damaged (exit 2).
    #[error(
        "store {path} cannot be opened: {detail}; move it away to start with an empty store, or restore a snapshot"
    )]
    CorruptStore {
        /// The store file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Certificates could not be prepared.
    #[error(transparent)]
    Pki(#[from] skiff_pki::PkiError),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The API server could not start.
    #[error(transparent)]
    Api(#[from] skiff_apiserver::ApiServerError),
}

impl AppError {
    /// Process exit code: 2 for configuration problems, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) | AppError::CorruptStore { .. } => 2,
            _ => 1,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AppError {
    let what = what.into();
    move |source| AppError::Io { what, source }
}

impl ServerConfig {
    /// Checks values that need no I/O.
    pub fn validate(&self) -> Result<(), AppError> {
        for (flag, cidr) in [
            ("--service-cidr", &self.service_cidr),
            ("--cluster-cidr", &self.cluster_cidr),
        ] {
            let ok = cidr.split_once('/').is_some_and(|(ip, len)| {
                ip.parse::<IpAddr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 128)
            });
            if !ok {
                return Err(AppError::Config(format!(
                    "{flag} {cidr:?} is not a CIDR (expected e.g. 10.43.0.0/16)"
                )));
            }
        }
        if let Some(ep) = &self.datastore_endpoint
            && !(ep.starts_with("http://") || ep.starts_with("https://"))
        {
            return Err(AppError::Config(format!(
                "--datastore-endpoint {ep:?} is not supported: give an etcd URL (http:// or https://)"
            )));
        }
        Ok(())
    }
}

async fn open_store(cfg: &ServerConfig) -> Result<Arc<dyn Store>, AppError> {
    if let Some(ep) = &cfg.datastore_endpoint {
        let endpoints: Vec<String> = ep.split(',').map(str::to_string).collect();
        return Ok(
            skiff_store::connect_etcd(&endpoints, skiff_store::EtcdOptions::default()).await?,
        );
    }
    let dir = cfg.data_dir.join("server").join("db");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join("state.redb");
    match skiff_store::open_redb(&path, skiff_store::RedbOptions::default()).await {
        Ok(s) => Ok(s),
        Err(StoreError::Corrupt { path, detail }) => Err(AppError::CorruptStore { path, detail }),
        Err(e) => Err(e.into()),
    }
}

/// Parses an IPv4 CIDR (`10.43.0.0/16`).
fn parse_v4_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), AppError> {
    let bad = || {
        AppError::Config(format!(
            "--service-cidr {s:?} is not an IPv4 CIDR (expected e.g. 10.43.0.0/16)"
        ))
    };
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&len) {
        return Err(bad());
    }
    Ok((ip, len))
}

pub(crate) fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn tls_acceptor(pki: &skiff_pki::ServerPki) -> Result<TlsAcceptor, AppError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = skiff_pki::pem_certs_der(&pki.serving_cert_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key_der = skiff_pki::pem_key_der(&pki.serving_key_pem)
        .ok_or_else(|| AppError::Tls("serving key is not a PEM private key".into()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    let mut roots = rustls::RootCertStore::empty();
    for der in skiff_pki::pem_certs_der(&pki.ca_cert_pem) {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| AppError::Tls(format!("adding the cluster CA: {e}")))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| AppError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AppError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| AppError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load_tokens(data_dir: &Path) -> Result<std::collections::HashMap<String, Identity>, AppError> {
    let path = data_dir.join("server").join("token-auth.csv");
    match std::fs::read_to_string(&path) {
        Ok(text) => skiff_apiserver::parse_token_file(&text)
            .map_err(|e| AppError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// Runs the server until `shutdown` completes. `ready` is called once with the kubeconfig path
/// when the API is serving.
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Path, &str),
) -> Result<(), AppError> {
    cfg.validate()?;
    let service_net = parse_v4_cidr(&cfg.service_cidr)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(io(format!("creating {}", cfg.data_dir.display())))?;
    let store = open_store(&cfg).await?;

    let listener = TcpListener::bind(SocketAddr::new(cfg.bind_address, cfg.https_listen_port))
        .await
        .map_err(io(format!(
            "listening on {}:{}",
            cfg.bind_address, cfg.https_listen_port
        )))?;
    let port = listener
        .local_addr()
        .map_err(io("reading the listen address"))?
        .port();

    let mut sans = cfg.tls_sans.clone();
    if let Some(h) = hostname() {
        sans.push(h);
    }
    if let Some(n) = &cfg.node_name {
        sans.push(n.clone());
    }
    if !cfg.bind_address.is_unspecified() {
        sans.push(cfg.bind_address.to_string());
    }
    if !cfg.disable_agent {
        // The API server dials the kubelet at the node's InternalIP.
        let node_ip = match cfg.node.node_ip {
            Some(ip) => ip,
            None => IpAddr::V4(skiff_kubelet::node::detect_node_ip(None)),
        };
        sans.push(node_ip.to_string());
    }
    sans.push(std::net::Ipv4Addr::from(u32::from(service_net.0).wrapping_add(1)).to_string());
    // With a shared datastore the CA and the service-account key are the cluster's: taken from
    // (or, by the first server, saved to) the datastore before this server's certificates.
    let shared_secret = match &cfg.datastore_endpoint {
        Some(_) => Some(
            crate::bootstrap::reconcile(store.as_ref(), &cfg.data_dir, cfg.token.as_deref())
                .await?,
        ),
        None => None,
    };
    let pki = skiff_pki::ensure_server_pki(&cfg.data_dir.join("server").join("tls"), &sans)?;
    let host = if cfg.bind_address.is_unspecified() || cfg.bind_address.is_loopback() {
        "127.0.0.1".to_string()
    } else {
        match cfg.bind_address {
            IpAddr::V6(a) => format!("[{a}]"),
            IpAddr::V4(a) => a.to_string(),
        }
    };
    let url = format!("https://{host}:{port}");
    let kubeconfig = cfg.data_dir.join("kubeconfig.yaml");
    skiff_pki::write_admin_kubeconfig(&kubeconfig, &url, &pki)?;
    let server_dir = cfg.data_dir.join("server");
    let secret = skiff_pki::join::ensure_server_token(
        &server_dir,
        shared_secret.as_deref().or(cfg.token.as_deref()),
        &pki.ca_cert_pem,
    )?;
    let join = crate::join::ServerJoin {
        tls_dir: pki.dir.clone(),
        ca_pem: pki.ca_cert_pem.clone(),
        secret,
        cluster_cidr: cfg.cluster_cidr.clone(),
        service_cidr: cfg.service_cidr.clone(),
    };

    let api_config = skiff_apiserver::Config {
        tokens: load_tokens(&cfg.data_dir)?,
        advertise_address: format!("{host}:{port}"),
        bookmark_interval: std::time::Duration::from_secs(10),
        service_cidr: Some(service_net),
        api_port: port,
        kubelet_client: Some(skiff_apiserver::KubeletClientTls {
            ca_pem: pki.ca_cert_pem.clone(),
            cert_pem: pki.kubelet_client_cert_pem.clone(),
            key_pem: pki.kubelet_client_key_pem.clone(),
        }),
        node_join: Some(skiff_apiserver::NodeJoin(Arc::new(join))),
        service_account_key: Some(skiff_apiserver::ServiceAccountKey {
            private_pem: pki.service_account_key_pem.clone(),
            public_pem: pki.service_account_pub_pem.clone(),
        }),
    };
    let state = ApiState::new(store, api_config).await?;
    let router = skiff_apiserver::router(state);
    let control_plane = crate::control_plane::start(router.clone(), &cfg, &pki.ca_cert_pem);
    let acceptor = tls_acceptor(&pki)?;

    let (node_stop, node_stop_rx) = tokio::sync::watch::channel(false);
    let node_task = if cfg.disable_agent {
        None
    } else {
        Some(start_node(&cfg, &router, &pki, node_stop_rx).await?)
    };

    ready(&kubeconfig, &url);
    tracing::info!(%url, kubeconfig = %kubeconfig.display(), node_token = %server_dir.join("node-token").display(), "API server ready");
    crate::memory::release_startup_pages_later();

    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| skiff_pki::client_identity(c.as_ref()))
                .map(|(user, groups)| Identity {
                    user,
                    groups,
                    uid: String::new(),
                });
            let svc = tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                if let Some(id) = &identity {
                    req.extensions_mut().insert(id.clone());
                }
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            let result = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(svc))
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down");
    let _ = node_stop.send(true);
    if let Some(t) = node_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(15), t).await;
    }
    control_plane.stop().await;
    Ok(())
}

/// Starts the node half (runtime, kubelet, kubelet server; service proxy and cluster DNS once the
/// pod CIDR is known) with in-process clients, one identity per component.
async fn start_node(
    cfg: &ServerConfig,
    router: &axum::Router,
    pki: &skiff_pki::ServerPki,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, AppError> {
    let node_name = cfg
        .node_name
        .clone()
        .or_else(hostname)
        .ok_or_else(|| AppError::Config("no --node-name and no hostname to use".into()))?;
    let user = format!("system:node:{node_name}");
    let clients = crate::node::NodeClients {
        kubelet: crate::client::in_process_client(
            router.clone(),
            &user,
            &["system:nodes", "system:masters"],
        ),
        proxy: crate::client::in_process_client(
            router.clone(),
            "system:kube-proxy",
            &["system:masters"],
        ),
        dns: crate::client::in_process_client(
            router.clone(),
            "system:kube-dns",
            &["system:masters"],
        ),
    };
    let node_cfg = crate::node::NodeConfig {
        node_name,
        node_ip: cfg.node.node_ip,
        labels: cfg.node.labels.clone(),
        taints: cfg.node.taints.clone(),
        cluster_dns: cfg.node.cluster_dns.clone(),
        pod_cidr: cfg.node.pod_cidr.clone(),
        service_cidr: Some(cfg.service_cidr.clone()),
        kubelet_port: cfg.node.kubelet_port,
        bind_address: cfg.bind_address,
        control_plane: true,
        cluster_cidr: Some(cfg.cluster_cidr.clone()),
        resolv_conf: cfg.node.resolv_conf.clone(),
        network_backend: cfg.node.network_backend,
        kubelet_args: cfg.node.kubelet_args.clone(),
        container_runtime_endpoint: cfg.node.container_runtime_endpoint.clone(),
        cni_conf_dir: cfg.node.cni_conf_dir.clone(),
        cni_bin_dirs: cfg.node.cni_bin_dirs.clone(),
    };
    let tls = crate::node::NodeTls {
        serving_cert_pem: pki.kubelet_serving_cert_pem.clone(),
        serving_key_pem: pki.kubelet_serving_key_pem.clone(),
        client_ca_pem: pki.ca_cert_pem.clone(),
    };
    let (task, _addr) = crate::node::start(&cfg.data_dir, &node_cfg, clients, &tls, stop).await?;
    Ok(task)
}
