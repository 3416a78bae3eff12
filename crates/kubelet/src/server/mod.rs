//! The kubelet's HTTPS server (port 10250): `/healthz`, `/pods`, `/containerLogs`, `/exec`,
//! `/attach`, `/portForward`, `/stats/summary`, `/metrics/resource`, with the WebSocket channel
//! protocols and SPDY/3.1 that kubectl speaks through the API server's proxy.
//!
//! The server knows pods only through [`PodLookup`], which the pod manager implements, and
//! containers only through the runtime trait.

pub mod logs;
pub mod portforward;
pub mod remotecommand;
pub mod routes;
pub mod spdy;
pub mod stats;
pub mod stream_proxy;
mod tls;
pub mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

/// One container of a pod as the server needs it.
#[derive(Debug, Clone)]
pub struct ContainerRef {
    /// Container name from the pod spec.
    pub name: String,
    /// Runtime id of the current instance, if one exists.
    pub id: Option<String>,
    /// Runtime id of the previous (terminated) instance, for `--previous` logs.
    pub previous_id: Option<String>,
}

/// One pod on this node as the server needs it.
#[derive(Debug, Clone)]
pub struct PodRef {
    /// The pod object as last seen by the kubelet (with its current status).
    pub pod: Arc<Pod>,
    /// Runtime id of the pod sandbox, if it exists.
    pub sandbox_id: Option<String>,
    /// Init containers and app containers, in spec order.
    pub containers: Vec<ContainerRef>,
}

/// What the server asks the pod manager.
pub trait PodLookup: Send + Sync {
    /// The pod `namespace/name`, if it runs on this node.
    fn pod(&self, namespace: &str, name: &str) -> Option<PodRef>;
    /// Every pod on this node.
    fn pods(&self) -> Vec<PodRef>;
}

/// Where and how the kubelet server listens.
#[derive(Clone)]
pub struct ServerConfig {
    /// Listen address (port 10250 by default; 0 picks a free one).
    pub listen: SocketAddr,
    /// Serving certificate chain (PEM).
    pub serving_cert_pem: String,
    /// Serving key (PEM).
    pub serving_key_pem: String,
    /// CA whose client certificates are accepted (the cluster CA; the API server's
    /// kubelet-client certificate is signed by it).
    pub client_ca_pem: String,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Errors of the kubelet server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Listening failed.
    #[error("kubelet server: listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS material is unusable.
    #[error("kubelet server: tls: {0}")]
    Tls(String),
}

/// Serves the kubelet API until `shutdown` completes. `ready` receives the bound address.
pub async fn serve(
    cfg: ServerConfig,
    runtime: Arc<dyn skiff_runtime::Runtime>,
    pods: Arc<dyn PodLookup>,
    ready: impl FnOnce(SocketAddr) + Send,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let acceptor = tls::acceptor(&cfg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let router = routes::router(routes::AppState {
        runtime,
        pods,
        samples: Arc::new(stats::CpuSamples::default()),
    });
    ready(addr);
    tracing::info!(%addr, "kubelet server listening");
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "kubelet server: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
                    tracing::debug!(%peer, error = %e, "kubelet server: TLS handshake failed");
                    return;
                }
            };
            let authenticated = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let svc = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let router = router.clone();
                async move {
                    if !authenticated && req.uri().path() != "/healthz" {
                        return Ok::<_, std::convert::Infallible>(routes::status(
                            http::StatusCode::UNAUTHORIZED,
                            "Unauthorized",
                            "the kubelet API needs a client certificate signed by the cluster CA",
                        ));
                    }
                    router.oneshot(req.map(axum::body::Body::new)).await
                }
            });
            let result = auto::Builder::new(TokioExecutor::new())
                .http1_only()
                .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(svc))
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "kubelet server: connection ended with an error");
            }
        });
    }
    Ok(())
}
