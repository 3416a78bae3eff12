//! Port-forward: SPDY/3.1 stream pairs (`streamType` data/error with `port` and `requestID`),
//! raw or tunnelled in binary WebSocket messages (`SPDY/3.1+portforward.k8s.io`), and the older
//! WebSocket channel form (`portforward.k8s.io`: channel 2i data, 2i+1 error for the i-th port).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use skiff_runtime::Runtime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::spdy;
use super::upgrade::Upgraded;

/// SPDY stream protocol of port-forward.
pub const SPDY_PROTOCOL: &str = "portforward.k8s.io";
/// WebSocket subprotocol tunnelling SPDY frames.
pub const WS_SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
/// WebSocket subprotocols of the channel form.
pub const WS_CHANNEL_PROTOCOLS: &[&str] = &["portforward.k8s.io", "v4.channel.k8s.io"];

/// Serves SPDY port-forward on any byte stream until the client closes it.
pub async fn serve_spdy<T>(io: T, runtime: Arc<dyn Runtime>, sandbox_id: String)
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut session = match spdy::Session::new(io, true) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "spdy session");
            return;
        }
    };
    // requestID -> (error stream, data stream) until both arrived
    let mut pending: HashMap<String, (Option<spdy::Stream>, Option<spdy::Stream>)> = HashMap::new();
    while let Some(s) = session.accept().await {
        let id = s.header("requestid").unwrap_or("").to_string();
        let ty = s.header("streamtype").unwrap_or("").to_string();
        let entry = pending.entry(id.clone()).or_default();
        match ty.as_str() {
            "error" => entry.0 = Some(s),
            "data" => entry.1 = Some(s),
            other => {
                tracing::debug!(stream_type = other, "port-forward: unexpected stream type");
                let mut s = s;
                s.writer.reset(spdy::frame::rst::PROTOCOL_ERROR).await;
                continue;
            }
        }
        if entry.0.is_some()
            && entry.1.is_some()
            && let Some((Some(err), Some(data))) = pending.remove(&id)
        {
            tokio::spawn(forward_pair(runtime.clone(), sandbox_id.clone(), err, data));
        }
    }
}

async fn forward_pair(
    runtime: Arc<dyn Runtime>,
    sandbox_id: String,
    mut err: spdy::Stream,
    mut data: spdy::Stream,
) {
    let port = data
        .header("port")
        .or_else(|| err.header("port"))
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0);
    let Some(port) = port else {
        let _ = err
            .writer
            .write(b"port-forward: the data stream has no valid port header")
            .await;
        return;
    };
    let conn = match runtime.port_forward(&sandbox_id, port).await {
        Ok(c) => c,
        Err(e) => {
            let msg = format!(
                "an error occurred forwarding {port} -> {port}: error forwarding port {port} to pod sandbox {sandbox_id}: {e}"
            );
            let _ = err.writer.write(msg.as_bytes()).await;
            let _ = err.writer.close().await;
            let _ = data.writer.close().await;
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(conn);
    let mut reader = data.reader;
    let mut writer = data.writer;
    let up = async move {
        while let Some(b) = reader.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if writer.write(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = writer.close().await;
    };
    tokio::join!(up, down);
    let _ = err.writer.close().await;
}

/// Serves SPDY port-forward tunnelled in binary WebSocket messages.
pub async fn serve_ws_tunnel(
    ws: WebSocketStream<Upgraded>,
    runtime: Arc<dyn Runtime>,
    sandbox_id: String,
) {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut sink, mut source) = ws.split();
    let (mut trd, mut twr) = tokio::io::split(theirs);
    let inbound = tokio::spawn(async move {
        while let Some(Ok(m)) = source.next().await {
            match m {
                Message::Binary(b) if twr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = twr.shutdown().await;
    });
    let outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match trd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = sink.send(super::upgrade::normal_close()).await;
        let _ = sink.close().await;
    });
    serve_spdy(ours, runtime, sandbox_id).await;
    let _ = outbound.await;
    inbound.abort();
}

/// Serves the WebSocket channel form for `ports` (from the `port` query parameters).
pub async fn serve_ws_channels(
    ws: WebSocketStream<Upgraded>,
    runtime: Arc<dyn Runtime>,
    sandbox_id: String,
    ports: Vec<u16>,
) {
    let (mut sink, mut source) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(32);
    let mut to_pod: HashMap<u8, mpsc::Sender<Bytes>> = HashMap::new();
    let writer = tokio::spawn(async move {
        while let Some((ch, data)) = out_rx.recv().await {
            let mut v = Vec::with_capacity(1 + data.len());
            v.push(ch);
            v.extend_from_slice(&data);
            if sink.send(Message::binary(v)).await.is_err() {
                break;
            }
        }
        let _ = sink.send(super::upgrade::normal_close()).await;
        let _ = sink.close().await;
    });
    // Every channel starts with the port number (little endian).
    for (i, port) in ports.iter().enumerate() {
        for ch in [2 * i as u8, 2 * i as u8 + 1] {
            let _ = out_tx
                .send((ch, Bytes::copy_from_slice(&port.to_le_bytes())))
                .await;
        }
    }
    for (i, &port) in ports.iter().enumerate() {
        let (tx, mut rx) = mpsc::channel::<Bytes>(16);
        to_pod.insert(2 * i as u8, tx);
        let out = out_tx.clone();
        let runtime = runtime.clone();
        let sandbox_id = sandbox_id.clone();
        tokio::spawn(async move {
            let data_ch = 2 * i as u8;
            let conn = match runtime.port_forward(&sandbox_id, port).await {
                Ok(c) => c,
                Err(e) => {
                    let msg =
                        format!("error forwarding port {port} to pod sandbox {sandbox_id}: {e}");
                    let _ = out.send((data_ch + 1, Bytes::from(msg))).await;
                    return;
                }
            };
            let (mut rd, mut wr) = tokio::io::split(conn);
            let up = async move {
                while let Some(b) = rx.recv().await {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                let _ = wr.shutdown().await;
            };
            let down = async move {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if out
                                .send((data_ch, Bytes::copy_from_slice(&buf[..n])))
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                }
            };
            tokio::join!(up, down);
        });
    }
    drop(out_tx);
    while let Some(Ok(m)) = source.next().await {
        let raw = match m {
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        if let Some((&ch, data)) = raw.split_first()
            && let Some(tx) = to_pod.get(&ch)
            && !data.is_empty()
            && tx.send(Bytes::copy_from_slice(data)).await.is_err()
        {
            to_pod.remove(&ch);
        }
    }
    drop(to_pod);
    let _ = writer.await;
}
