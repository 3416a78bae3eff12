//! The Kubernetes API over HTTP as an axum `Router` (testable without a socket): authentication,
//! discovery, OpenAPI stubs, CRUD/list/watch/patch for every built-in resource over the store,
//! and `/metrics`.

mod admission;
mod auth;
mod discovery;
mod field_index;
mod handlers;
mod http_util;
mod join;
mod kubelet_proxy;
mod metrics;
mod openapi_v2;
mod proto;
mod proto_schema;
mod satoken;
mod schemas;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::json;
use skiff_api::resources::find;
use skiff_store::Store;

pub use auth::{Identity, parse_token_file};
use http_util::error_response;
pub use join::{CACERTS_PATH, NODE_CERTS_PATH, NodeCredentialIssuer, NodeJoin};
pub use kubelet_proxy::KubeletClientTls;
pub use satoken::{API_AUDIENCE, ServiceAccountKey};

/// (group, version, kind, schema name) of a kind with an OpenAPI schema.
pub type SchemaRoot = (&'static str, &'static str, &'static str, String);

/// The OpenAPI component schemas of the built-in kinds and their (group, version, kind, schema
/// name) roots; used by the protobuf schema generator (`examples/gen_proto_schema.rs`).
#[doc(hidden)]
pub fn openapi_components() -> (serde_json::Map<String, serde_json::Value>, Vec<SchemaRoot>) {
    schemas::components()
}

/// The Rust source of the generated field index (`src/field_index.rs`); used by
/// `examples/gen_field_index.rs`.
#[doc(hidden)]
pub fn field_index_source() -> String {
    schemas::field_index_source()
}

/// Errors when building the API server state.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The store failed while creating the built-in namespaces.
    #[error("apiserver: store error while bootstrapping {what}: {source}")]
    Bootstrap {
        /// What was being created.
        what: String,
        /// The store error.
        source: skiff_store::StoreError,
    },
    /// The service-account signing key could not be loaded.
    #[error("apiserver: {0}; remove the key file to make a new one")]
    ServiceAccountKey(String),
    /// The kubelet client credentials could not be loaded.
    #[error(
        "apiserver: kubelet client TLS: {0}; check the CA and the apiserver-kubelet-client certificate and key"
    )]
    KubeletTls(String),
}

/// Configuration of the API server.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Bearer token → identity.
    pub tokens: HashMap<String, Identity>,
    /// The address clients should use (`host:port`), for `/api` serverAddressByClientCIDRs.
    pub advertise_address: String,
    /// How often watches that asked for bookmarks get one (zero = 10 s).
    pub bookmark_interval: std::time::Duration,
    /// Service CIDR (IPv4 network, prefix length); None = 10.43.0.0/16.
    pub service_cidr: Option<(std::net::Ipv4Addr, u8)>,
    /// Port of the API server, for the `kubernetes` Service's targetPort (0 = 6443).
    pub api_port: u16,
    /// Credentials for kubelets (logs, exec, attach, port-forward, node proxy); None = those
    /// requests get 503.
    pub kubelet_client: Option<KubeletClientTls>,
    /// Joining nodes (`GET /cacerts`, `POST /v1-skiff/node-certs`); None = those paths are 404.
    pub node_join: Option<NodeJoin>,
    /// Service-account token signing key. Some = TokenRequest issues tokens, bearer JWTs signed
    /// by it authenticate, and the ServiceAccount admission plugin runs on pod creation; None =
    /// TokenRequest gets 503 and pods are admitted without a service account.
    pub service_account_key: Option<ServiceAccountKey>,
}

impl Config {
    /// The `i`-th address of the service CIDR (1 = the `kubernetes` Service), if in range.
    pub fn service_ip(&self, i: u32) -> Option<String> {
        let (base, prefix) = self
            .service_cidr
            .unwrap_or((std::net::Ipv4Addr::new(10, 43, 0, 0), 16));
        let size = 1u64 << (32 - u32::from(prefix.min(32)));
        if u64::from(i) + 1 >= size {
            return None;
        }
        Some(std::net::Ipv4Addr::from(u32::from(base).wrapping_add(i)).to_string())
    }
}

/// Shared state of all handlers.
pub struct ApiState {
    store: Arc<dyn Store>,
    config: Config,
    hub: watch::Hub,
    /// Serializes service IP / node port allocation with the create that records it.
    alloc_lock: tokio::sync::Mutex<()>,
    /// TLS client configuration towards kubelets, built from [`Config::kubelet_client`].
    kubelet_tls: Option<Arc<rustls::ClientConfig>>,
    /// Request counters and latencies for `/metrics`.
    metrics: metrics::Metrics,
    /// Signs and verifies service-account tokens, from [`Config::service_account_key`].
    sa_signer: Option<satoken::Signer>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// The namespaces that exist from the first start.
pub const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

impl ApiState {
    /// Builds the state and creates the default namespaces if missing.
    pub async fn new(store: Arc<dyn Store>, config: Config) -> Result<Arc<Self>, ApiServerError> {
        let kubelet_tls = match &config.kubelet_client {
            Some(t) => Some(kubelet_proxy::client_config(t).map_err(ApiServerError::KubeletTls)?),
            None => None,
        };
        let sa_signer = match &config.service_account_key {
            Some(k) => Some(satoken::Signer::new(k).map_err(ApiServerError::ServiceAccountKey)?),
            None => None,
        };
        let state = Arc::new(ApiState {
            kubelet_tls,
            sa_signer,
            metrics: metrics::Metrics::default(),
            hub: watch::Hub::new(store.clone()),
            alloc_lock: tokio::sync::Mutex::new(()),
            store,
            config,
        });
        let Some(ns) = find("", "v1", "namespaces") else {
            return Ok(state);
        };
        for name in DEFAULT_NAMESPACES {
            let key = ns.key(None, name);
            let exists =
                state
                    .store
                    .get(&key)
                    .await
                    .map_err(|source| ApiServerError::Bootstrap {
                        what: format!("namespace {name}"),
                        source,
                    })?;
            if exists.is_some() {
                continue;
            }
            let mut obj =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            handlers::prepare_new(ns, &mut obj, None);
            let bytes = bytes::Bytes::from(serde_json::to_vec(&obj).unwrap_or_default());
            match state.store.create(&key, bytes).await {
                Ok(_) | Err(skiff_store::StoreError::AlreadyExists { .. }) => {}
                Err(source) => {
                    return Err(ApiServerError::Bootstrap {
                        what: format!("namespace {name}"),
                        source,
                    });
                }
            }
        }
        state.bootstrap_kubernetes_service().await?;
        admission::bootstrap_priority_classes(&state).await?;
        if state.sa_signer.is_some() {
            // The ServiceAccount admission plugin refuses pods without their service account:
            // the built-in namespaces have theirs from the first request on, not only once the
            // service-account controller has run.
            admission::bootstrap_default_service_accounts(&state).await?;
        }
        Ok(state)
    }

    /// Creates `default/kubernetes` (the first service IP, port 443 → the API port) if missing.
    async fn bootstrap_kubernetes_service(&self) -> Result<(), ApiServerError> {
        let Some(svc) = find("", "v1", "services") else {
            return Ok(());
        };
        let key = svc.key(Some("default"), "kubernetes");
        let err = |source| ApiServerError::Bootstrap {
            what: "service default/kubernetes".into(),
            source,
        };
        if self.store.get(&key).await.map_err(err)?.is_some() {
            return Ok(());
        }
        let ip = self
            .config
            .service_ip(1)
            .unwrap_or_else(|| "10.43.0.1".into());
        let port = if self.config.api_port == 0 {
            6443
        } else {
            self.config.api_port
        };
        let mut obj = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP", "sessionAffinity": "None",
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]},
        });
        handlers::prepare_new(svc, &mut obj, Some("default"));
        let bytes = bytes::Bytes::from(serde_json::to_vec(&obj).unwrap_or_default());
        match self.store.create(&key, bytes).await {
            Ok(_) | Err(skiff_store::StoreError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

/// The API router. Requests must carry an [`Identity`] extension (set by the TLS layer from the
/// client certificate) or a bearer token, except health checks and `/version`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

async fn dispatch(State(st): State<Arc<ApiState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if join::is_join_path(&path) {
        return join::handle(st.config.node_join.as_ref(), req, &path).await;
    }
    let public = matches!(
        path.as_str(),
        "/healthz" | "/livez" | "/readyz" | "/version" | "/version/"
    ) || path.starts_with("/healthz/")
        || path.starts_with("/livez/")
        || path.starts_with("/readyz/");
    let identity = match auth::authenticate(&st, auth::credentials(&req)).await {
        Some(id) => id,
        None if public => Identity::anonymous(),
        None => return error_response(&skiff_api::ApiError::unauthorized()),
    };
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let verb = metrics::verb(&method, &path, req.uri().query());
    let resp = route(st.clone(), identity, req, &path).await;
    st.metrics.observe(
        verb,
        &metrics::resource(&path),
        resp.status().as_u16(),
        started.elapsed(),
    );
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    resp
}

async fn route(st: Arc<ApiState>, identity: Identity, req: Request, path: &str) -> Response {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segs.as_slice() {
        ["healthz" | "livez" | "readyz", rest @ ..] => {
            let verbose = req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|p| p == "verbose" || p.starts_with("verbose="))
            });
            drop(req);
            discovery::health(&st, verbose, segs[0], rest).await
        }
        ["version"] => discovery::version(),
        ["metrics"] => {
            let mut resp = Response::new(axum::body::Body::from(st.metrics.render()));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        ["api"] => discovery::api_versions(&st, &req),
        ["apis"] => discovery::api_groups(&req),
        ["api", "v1"] => discovery::resource_list("", "v1"),
        ["apis", g] => discovery::api_group(g),
        ["apis", g, v] => discovery::resource_list(g, v),
        ["openapi", rest @ ..] => discovery::openapi(rest, &req),
        ["api", "v1", rest @ ..] => {
            handlers::resource_request(st, identity, req, "", "v1", rest).await
        }
        ["apis", g, v, rest @ ..] => {
            let (g, v) = (g.to_string(), v.to_string());
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            handlers::resource_request(st, identity, req, &g, &v, &rest).await
        }
        _ => error_response(&skiff_api::ApiError::path_not_found()),
    }
}
