//! In-process API clients: components inside `skiff server` (scheduler, controllers, kubelet)
//! talk to the API router as a tower service, with no socket, TLS or serialisation of the
//! connection, and with an identity fixed here rather than a certificate.

use skiff_apiserver::Identity;
use tower::ServiceExt;

/// A `kube::Client` whose requests go straight to `router`, authenticated as `user` in `groups`.
pub fn in_process_client(router: axum::Router, user: &str, groups: &[&str]) -> kube::Client {
    let identity = Identity {
        user: user.to_string(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        uid: String::new(),
    };
    let svc = tower::service_fn(move |mut req: http::Request<kube::client::Body>| {
        req.extensions_mut().insert(identity.clone());
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    kube::Client::new(svc, "default")
}
