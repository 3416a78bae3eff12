//! The server's TLS: serving certificate from [`ServerConfig`], client certificates verified
//! against the cluster CA (optional at the handshake, required by every path but `/healthz`).

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use super::{ServerConfig, ServerError};

/// Builds the acceptor; HTTP/1.1 only (upgrades for exec/attach/port-forward need it).
pub fn acceptor(cfg: &ServerConfig) -> Result<TlsAcceptor, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = skiff_pki::pem_certs_der(&cfg.serving_cert_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    if certs.is_empty() {
        return Err(ServerError::Tls(
            "the serving certificate is not PEM: pass the kubelet serving certificate chain".into(),
        ));
    }
    let key_der = skiff_pki::pem_key_der(&cfg.serving_key_pem).ok_or_else(|| {
        ServerError::Tls("the serving key is not a PEM private key (PKCS#8 expected)".into())
    })?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    let mut roots = rustls::RootCertStore::empty();
    for der in skiff_pki::pem_certs_der(&cfg.client_ca_pem) {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| ServerError::Tls(format!("adding the client CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ServerError::Tls(
            "the client CA is not PEM: pass the cluster CA certificate".into(),
        ));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
