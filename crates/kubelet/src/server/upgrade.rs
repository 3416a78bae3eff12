//! HTTP upgrades: choosing the WebSocket subprotocol or SPDY stream protocol a client offers,
//! the 101 responses, and getting the upgraded connection from hyper.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;

/// The upgraded connection.
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// Which upgrade a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Upgrade: websocket`
    WebSocket,
    /// `Upgrade: SPDY/3.1`
    Spdy,
    /// none
    None,
}

/// The upgrade a request asks for.
pub fn kind(headers: &HeaderMap) -> Kind {
    let up = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    if up.contains("websocket") {
        Kind::WebSocket
    } else if up.contains("spdy/3.1") {
        Kind::Spdy
    } else {
        Kind::None
    }
}

/// All comma-separated values of a header, trimmed, in order.
pub fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The first protocol the client offers that we support; `Ok(None)` if the client offers none.
pub fn choose(offered: &[String], supported: &[&str]) -> Result<Option<String>, String> {
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find(|o| supported.contains(&o.as_str()))
        .cloned()
        .map(Some)
        .ok_or_else(|| {
            format!(
                "unable to upgrade: none of the requested protocols {offered:?} is supported (supported: {supported:?})"
            )
        })
}

/// The 101 response for a WebSocket upgrade, or an error response for a bad handshake.
pub fn websocket_response(headers: &HeaderMap, protocol: Option<&str>) -> Result<Response, String> {
    let key = headers
        .get("sec-websocket-key")
        .ok_or("websocket upgrade without a Sec-WebSocket-Key header")?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut b = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", accept);
    if let Some(p) = protocol {
        b = b.header("sec-websocket-protocol", p);
    }
    b.body(Body::empty()).map_err(|e| e.to_string())
}

/// The 101 response for a SPDY/3.1 upgrade with stream protocol `protocol`.
pub fn spdy_response(protocol: Option<&str>) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        h.insert("x-stream-protocol-version", p);
    }
    r
}

/// A WebSocket close frame with status 1000: client-go treats a close without a status (1005)
/// as an error ("error reading from error stream").
pub fn normal_close() -> tokio_tungstenite::tungstenite::Message {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    tokio_tungstenite::tungstenite::Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// Waits for hyper to hand over the connection after the 101 response.
pub async fn take(on: hyper::upgrade::OnUpgrade) -> Option<Upgraded> {
    match on.await {
        Ok(u) => Some(TokioIo::new(u)),
        Err(e) => {
            tracing::debug!(error = %e, "connection upgrade failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chooses_in_client_order_and_refuses_unknown() {
        let offered = vec!["v5.channel.k8s.io".to_string(), "v4.channel.k8s.io".into()];
        assert_eq!(
            choose(&offered, &["v4.channel.k8s.io", "v5.channel.k8s.io"]).unwrap(),
            Some("v5.channel.k8s.io".into())
        );
        assert_eq!(choose(&[], &["x"]).unwrap(), None);
        assert!(choose(&["nope".to_string()], &["x"]).is_err());
        let mut h = HeaderMap::new();
        h.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        h.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v3.channel.k8s.io, v2.channel.k8s.io"),
        );
        assert_eq!(list(&h, "x-stream-protocol-version").len(), 3);
        h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert_eq!(kind(&h), Kind::Spdy);
    }
}
