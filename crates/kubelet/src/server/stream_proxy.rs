//! Forwarding exec/attach/port-forward to a container runtime's own streaming server, as the
//! real kubelet does with a CRI runtime: CRI `Exec`/`Attach`/`PortForward` return a URL
//! (containerd's streaming server on 127.0.0.1), the client's upgrade request is sent there with
//! its query and headers (`Upgrade`, `Connection`, `X-Stream-Protocol-Version`,
//! `Sec-WebSocket-*`), the runtime's answer goes back to the client, and after a `101` the two
//! upgraded connections are spliced byte for byte.

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use super::routes::status;

/// Headers that describe one hop of the connection (RFC 9110 §7.6.1) and are not forwarded;
/// `Connection` and `Upgrade` are, since the upgrade is what is being forwarded.
const HOP_BY_HOP: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
];

/// The largest error body read from the runtime's streaming server.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The request to send to the streaming server at `url`: same method, the URL's path and
/// query, its host, and the client's headers minus hop-by-hop ones.
pub fn upstream_request(
    method: &http::Method,
    url: &str,
    client_headers: &HeaderMap,
) -> Result<(http::Request<Body>, String), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("the runtime's streaming URL {url:?} is invalid: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "the runtime's streaming URL {url:?} is not plain http; skiff forwards only to an http streaming server (containerd's default, without enable_tls_streaming)"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("the runtime's streaming URL {url:?} has no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut b = http::Request::builder().method(method.clone()).uri(path);
    if let Some(h) = b.headers_mut() {
        for (k, v) in client_headers {
            if !HOP_BY_HOP.contains(&k.as_str()) {
                h.append(k.clone(), v.clone());
            }
        }
        let hv = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        h.insert(header::HOST, hv);
    }
    let req = b.body(Body::empty()).map_err(|e| e.to_string())?;
    Ok((req, addr))
}

fn bad_gateway(msg: String) -> Response {
    tracing::warn!(error = %msg, "forwarding to the runtime's streaming server failed");
    status(StatusCode::BAD_GATEWAY, "BadGateway", msg)
}

/// Forwards the client's upgrade request `req` to the streaming server at `url` and answers
/// with the server's response; after a `101` both connections are spliced in the background.
pub async fn forward(url: &str, mut req: Request) -> Response {
    let Some(client_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "exec, attach and port-forward need a connection upgrade (SPDY/3.1 or WebSocket)",
        );
    };
    let (up_req, addr) = match upstream_request(req.method(), url, req.headers()) {
        Ok(r) => r,
        Err(e) => return bad_gateway(e),
    };
    let tcp = match tokio::net::TcpStream::connect(&addr).await {
        Ok(t) => t,
        Err(e) => {
            return bad_gateway(format!(
                "connecting to the runtime's streaming server at {addr}: {e}"
            ));
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(x) => x,
        Err(e) => return bad_gateway(format!("streaming server at {addr}: {e}")),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "streaming server connection ended with an error");
        }
    });
    let mut up_resp = match sender.send_request(up_req).await {
        Ok(r) => r,
        Err(e) => return bad_gateway(format!("streaming server at {addr}: {e}")),
    };
    let code = up_resp.status();
    let mut resp = Response::builder().status(code);
    if let Some(h) = resp.headers_mut() {
        for (k, v) in up_resp.headers() {
            if code == StatusCode::SWITCHING_PROTOCOLS || !HOP_BY_HOP.contains(&k.as_str()) {
                h.append(k.clone(), v.clone());
            }
        }
    }
    if code != StatusCode::SWITCHING_PROTOCOLS {
        // The runtime refused (an unknown protocol, a stopped container): pass its answer on.
        let body = match http_body_util::Limited::new(up_resp.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return bad_gateway(format!("reading the streaming server's answer: {e}")),
        };
        tracing::debug!(status = %code, "the runtime's streaming server refused the upgrade");
        return resp
            .body(Body::from(body))
            .unwrap_or_else(|e| bad_gateway(e.to_string()));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut up_resp);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "stream proxy: connection upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((to_runtime, to_client)) => {
                tracing::debug!(to_runtime, to_client, "stream proxy: connection closed")
            }
            Err(e) => tracing::debug!(error = %e, "stream proxy: connection ended"),
        }
    });
    resp.body(Body::empty())
        .unwrap_or_else(|e| bad_gateway(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_request_keeps_upgrade_headers_and_sets_the_runtime_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("node1:10250"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        h.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        h.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v3.channel.k8s.io"),
        );
        h.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("v5.channel.k8s.io, v4.channel.k8s.io"),
        );
        h.insert("sec-websocket-version", HeaderValue::from_static("13"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let (r, addr) = upstream_request(
            &http::Method::POST,
            "http://127.0.0.1:43111/exec/AbCdEf?x=1",
            &h,
        )
        .unwrap();
        assert_eq!(addr, "127.0.0.1:43111");
        assert_eq!(r.method(), http::Method::POST);
        assert_eq!(r.uri().to_string(), "/exec/AbCdEf?x=1");
        let rh = r.headers();
        assert_eq!(rh[header::HOST], "127.0.0.1:43111");
        assert_eq!(rh[header::CONNECTION], "Upgrade");
        assert_eq!(rh[header::UPGRADE], "SPDY/3.1");
        let versions: Vec<_> = rh.get_all("x-stream-protocol-version").iter().collect();
        assert_eq!(versions, ["v4.channel.k8s.io", "v3.channel.k8s.io"]);
        assert_eq!(rh["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(
            rh["sec-websocket-protocol"],
            "v5.channel.k8s.io, v4.channel.k8s.io"
        );
        assert_eq!(rh["sec-websocket-version"], "13");
        assert!(rh.get(header::CONTENT_LENGTH).is_none());
    }

    #[test]
    fn upstream_request_handles_ipv6_and_refuses_what_it_cannot_reach() {
        let (r, addr) = upstream_request(
            &http::Method::GET,
            "http://[::1]:9/portforward/t",
            &HeaderMap::new(),
        )
        .unwrap();
        assert_eq!(addr, "[::1]:9");
        assert_eq!(r.uri().path(), "/portforward/t");
        let e = upstream_request(
            &http::Method::GET,
            "https://127.0.0.1:1/x",
            &HeaderMap::new(),
        )
        .unwrap_err();
        assert!(e.contains("not plain http"), "{e}");
        let e = upstream_request(&http::Method::GET, "/no/host", &HeaderMap::new()).unwrap_err();
        assert!(e.contains("/no/host"), "{e}");
    }
}
