//! Exec and attach: the transport-neutral core (pumping a process' stdio to and from the client,
//! resizes, the final status) and its two transports, WebSocket channels (`v5`/`v4`/`v1`/base64
//! `channel.k8s.io`) and SPDY/3.1 streams (`v4`..`v1`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use skiff_runtime::{AttachStream, Runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::spdy;
use super::upgrade::Upgraded;

/// The options of an exec or attach request.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// command (exec only)
    pub command: Vec<String>,
    /// the client sends stdin
    pub stdin: bool,
    /// the client wants stdout
    pub stdout: bool,
    /// the client wants stderr
    pub stderr: bool,
    /// a terminal
    pub tty: bool,
}

impl Options {
    /// Reads `command`, `input`/`stdin`, `output`/`stdout`, `error`/`stderr`, `tty`.
    pub fn from_query(q: &[(String, String)]) -> Self {
        let flag = |names: &[&str]| {
            q.iter()
                .any(|(k, v)| names.contains(&k.as_str()) && (v == "1" || v == "true"))
        };
        Self {
            command: q
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect(),
            stdin: flag(&["input", "stdin"]),
            stdout: flag(&["output", "stdout"]),
            stderr: flag(&["error", "stderr"]),
            tty: flag(&["tty"]),
        }
    }
}

/// What runs on the container.
#[derive(Debug, Clone)]
pub enum Action {
    /// a new process
    Exec,
    /// the container's own stdio
    Attach,
}

/// The client's side of the streams, transport-neutral.
pub struct Io {
    /// bytes from the client's stdin (None: no stdin); ends on the client's EOF
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// to the client's stdout
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// to the client's stderr
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// terminal sizes (cols, rows)
    pub resize: Option<mpsc::Receiver<(u16, u16)>>,
}

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// exit code (0 = success)
    Exited(i32),
    /// the runtime failed
    Error(String),
}

/// The v4+ error-channel `Status` for an outcome.
pub fn status_json(outcome: &Outcome, command: &[String]) -> Vec<u8> {
    let v = match outcome {
        Outcome::Exited(0) => {
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
        }
        Outcome::Exited(code) => json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Error(msg) => json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": msg, "reason": "InternalError", "code": 500,
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The pre-v4 error-channel text (empty on success).
fn status_text(outcome: &Outcome) -> Vec<u8> {
    match outcome {
        Outcome::Exited(0) => Vec::new(),
        Outcome::Exited(code) => format!("command terminated with exit code {code}").into_bytes(),
        Outcome::Error(msg) => msg.clone().into_bytes(),
    }
}

async fn pump_out(
    mut r: skiff_runtime::api::BoxRead,
    to: Option<mpsc::Sender<Bytes>>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if let Some(to) = &to {
            // A client that went away stops receiving; keep draining so the process never blocks.
            let _ = to.send(Bytes::copy_from_slice(&buf[..n])).await;
        }
    }
}

/// Runs an exec (a new process) with the client's streams.
pub async fn run_exec(
    runtime: Arc<dyn Runtime>,
    container_id: String,
    opts: Options,
    mut io: Io,
) -> Outcome {
    // kubectl sends the terminal size right after connecting: take it before starting the
    // process, so that it can be applied as early as possible.
    let mut first_size = None;
    if opts.tty
        && let Some(r) = io.resize.as_mut()
        && let Ok(Some(size)) = tokio::time::timeout(Duration::from_millis(500), r.recv()).await
    {
        first_size = Some(size);
    }
    let mut session = match runtime
        .exec(&container_id, opts.command.clone(), opts.tty)
        .await
    {
        Ok(s) => s,
        Err(e) => return Outcome::Error(format!("exec in container {container_id}: {e}")),
    };
    let stdin_w = session.take_stdin();
    let stdout_r = session.take_stdout();
    let stderr_r = session.take_stderr();
    let stdin_task = match (stdin_w, io.stdin.take()) {
        (Some(mut w), Some(mut rx)) => Some(tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if w.write_all(&b).await.is_err() || w.flush().await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        })),
        // No stdin from the client: the process reads end-of-file.
        _ => None,
    };
    let stdout_task = stdout_r.map(|r| tokio::spawn(pump_out(r, io.stdout.take())));
    let stderr_task = stderr_r.map(|r| {
        // With a TTY the client has one stream; merge stderr into stdout then.
        let to = io.stderr.take().or_else(|| io.stdout.clone());
        tokio::spawn(pump_out(r, to))
    });
    drop(io.stdout.take());
    let outputs = async move {
        if let Some(t) = stdout_task {
            let _ = t.await;
        }
        if let Some(t) = stderr_task {
            let _ = t.await;
        }
    };
    tokio::pin!(outputs);
    let mut resize = io.resize.take();
    // A resize sent before the process' terminal is ready fails: retry the latest size briefly.
    let mut unapplied: Option<(u16, u16)> = first_size;
    let mut retries = 0u32;
    if let Some((cols, rows)) = unapplied {
        // The shim opens its resize channel a moment after the process starts: retry tightly.
        for _ in 0..200 {
            if session.resize(rows, cols).is_ok() {
                unapplied = None;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    loop {
        tokio::select! {
            _ = &mut outputs => break,
            size = async { match resize.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                match size {
                    Some(size) => {
                        unapplied = Some(size);
                        retries = 0;
                    }
                    None => resize = None,
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if unapplied.is_some() && retries > 0 => {}
        }
        if let Some((cols, rows)) = unapplied {
            match session.resize(rows, cols) {
                Ok(()) => unapplied = None,
                Err(e) => {
                    retries += 1;
                    if retries > 100 {
                        tracing::debug!(error = %e, "exec resize failed");
                        unapplied = None;
                    }
                }
            }
        }
    }
    let result = session.wait().await;
    if let Some(t) = stdin_task {
        t.abort();
    }
    match result {
        Ok(code) => Outcome::Exited(code),
        Err(e) => Outcome::Error(format!("exec in container {container_id}: {e}")),
    }
}

/// Attaches the client's streams to a running container until its output ends or the client
/// goes away.
pub async fn run_attach(
    runtime: Arc<dyn Runtime>,
    container_id: String,
    opts: Options,
    mut io: Io,
) -> Outcome {
    let mut at = match runtime.attach(&container_id).await {
        Ok(a) => a,
        Err(e) => return Outcome::Error(format!("attach to container {container_id}: {e}")),
    };
    let mut stdin = io.stdin.take();
    let mut resize = io.resize.take();
    let stdout = io.stdout.take();
    let stderr = io.stderr.take().or_else(|| stdout.clone());
    let client_gone = {
        let a = stdout.clone();
        let b = stderr.clone();
        async move {
            match (a, b) {
                (Some(a), Some(b)) => {
                    tokio::select! { _ = a.closed() => {}, _ = b.closed() => {} }
                }
                (Some(a), None) | (None, Some(a)) => a.closed().await,
                (None, None) => std::future::pending().await,
            }
        }
    };
    tokio::pin!(client_gone);
    loop {
        tokio::select! {
            chunk = at.next() => match chunk {
                Ok(Some((which, data))) => {
                    let to = match which {
                        AttachStream::Stdout => &stdout,
                        AttachStream::Stderr => &stderr,
                    };
                    if let Some(to) = to
                        && to.send(Bytes::from(data)).await.is_err()
                    {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => return Outcome::Error(format!("attach to container {container_id}: {e}")),
            },
            b = async { match stdin.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                match b {
                    Some(b) => {
                        if let Err(e) = at.write_stdin(&b).await {
                            tracing::debug!(error = %e, "attach stdin write failed");
                            stdin = None;
                        }
                    }
                    None => {
                        let _ = at.close_stdin().await;
                        stdin = None;
                    }
                }
            }
            size = async { match resize.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                match size {
                    Some((cols, rows)) => {
                        if let Err(e) = runtime.resize(&container_id, rows, cols).await {
                            tracing::debug!(error = %e, "attach resize failed");
                        }
                    }
                    None => resize = None,
                }
            }
            _ = &mut client_gone => break,
        }
    }
    let _ = opts;
    Outcome::Exited(0)
}

async fn run(
    action: Action,
    runtime: Arc<dyn Runtime>,
    container_id: String,
    opts: Options,
    io: Io,
) -> Outcome {
    match action {
        Action::Exec => run_exec(runtime, container_id, opts, io).await,
        Action::Attach => run_attach(runtime, container_id, opts, io).await,
    }
}

/// Parses a resize message `{"Width": w, "Height": h}`.
pub fn parse_resize(b: &[u8]) -> Option<(u16, u16)> {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width")]
        width: u16,
        #[serde(rename = "Height")]
        height: u16,
    }
    let s: Size = serde_json::from_slice(b).ok()?;
    Some((s.width, s.height))
}

// ------------------------------------------------------------------ WebSocket channels

/// WebSocket subprotocols for exec/attach, in our order of preference.
pub const WS_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// Serves exec/attach on an upgraded WebSocket with `protocol` (one of [`WS_PROTOCOLS`], or ""
/// for the plain channel protocol).
pub async fn serve_websocket(
    ws: WebSocketStream<Upgraded>,
    protocol: String,
    action: Action,
    runtime: Arc<dyn Runtime>,
    container_id: String,
    opts: Options,
) {
    let base64 = protocol.contains("base64");
    let v4 = protocol.starts_with("v4.") || protocol.starts_with("v5.");
    let v5 = protocol.starts_with("v5.");
    let (mut sink, mut source) = ws.split();

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel::<(u16, u16)>(4);
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);

    let encode = move |ch: u8, data: &[u8]| -> Message {
        if base64 {
            let mut s = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            s.push(char::from(b'0' + ch));
            s.push_str(&base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                data,
            ));
            Message::text(s)
        } else {
            let mut v = Vec::with_capacity(1 + data.len());
            v.push(ch);
            v.extend_from_slice(data);
            Message::binary(v)
        }
    };

    // Reader: client messages to stdin / resize.
    let want_stdin = opts.stdin;
    let reader = tokio::spawn(async move {
        let mut stdin_tx = if want_stdin { Some(stdin_tx) } else { None };
        while let Some(Ok(msg)) = source.next().await {
            let raw: Vec<u8> = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) if base64 => {
                    let t = t.as_bytes();
                    let Some((&c, rest)) = t.split_first() else {
                        continue;
                    };
                    let Ok(data) =
                        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, rest)
                    else {
                        continue;
                    };
                    let mut v = vec![c.wrapping_sub(b'0')];
                    v.extend(data);
                    v
                }
                Message::Close(_) => break,
                _ => continue,
            };
            let Some((&ch, data)) = raw.split_first() else {
                continue;
            };
            match ch {
                0 => {
                    if let Some(tx) = &stdin_tx
                        && !data.is_empty()
                        && tx.send(Bytes::copy_from_slice(data)).await.is_err()
                    {
                        stdin_tx = None;
                    }
                }
                4 => {
                    if let Some(size) = parse_resize(data) {
                        let _ = resize_tx.send(size).await;
                    }
                }
                255 if v5 && data.first() == Some(&0) => stdin_tx = None,
                _ => {}
            }
        }
    });

    // Outputs: stdout (1) and stderr (2) through one queue.
    let (so_tx, mut so_rx) = mpsc::channel::<Bytes>(16);
    let (se_tx, mut se_rx) = mpsc::channel::<Bytes>(16);
    let fwd = {
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let mut so_open = true;
            let mut se_open = true;
            while so_open || se_open {
                tokio::select! {
                    b = so_rx.recv(), if so_open => match b {
                        Some(b) => { if out_tx.send((1, b)).await.is_err() { break; } }
                        None => so_open = false,
                    },
                    b = se_rx.recv(), if se_open => match b {
                        Some(b) => { if out_tx.send((2, b)).await.is_err() { break; } }
                        None => se_open = false,
                    },
                }
            }
        })
    };
    // then_some moves every sender in: an unused one is dropped now, not at the end of this fn.
    let io = Io {
        stdin: opts.stdin.then_some(stdin_rx),
        stdout: opts.stdout.then_some(so_tx),
        stderr: (opts.stderr && !opts.tty).then_some(se_tx),
        resize: opts.tty.then_some(resize_rx),
    };
    let command = opts.command.clone();
    let action_kind = action.clone();
    let worker = tokio::spawn(async move {
        let outcome = run(action, runtime, container_id, opts, io).await;
        let _ = fwd.await;
        let status = if v4 {
            status_json(&outcome, &command)
        } else {
            status_text(&outcome)
        };
        if !status.is_empty() {
            let _ = out_tx.send((3, Bytes::from(status))).await;
        }
    });
    let attach = matches!(action_kind, Action::Attach);
    let mut reader = reader;
    loop {
        tokio::select! {
            m = out_rx.recv() => match m {
                Some((ch, data)) => {
                    if sink.send(encode(ch, &data)).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            // An attach ends when the client leaves (an exec runs to its end regardless).
            _ = &mut reader, if attach => {
                worker.abort();
                break;
            }
        }
    }
    let _ = worker.await;
    let _ = sink.send(super::upgrade::normal_close()).await;
    let _ = sink.close().await;
    reader.abort();
}

// ------------------------------------------------------------------ SPDY streams

/// SPDY stream protocol versions for exec/attach, in our order of preference.
pub const SPDY_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// Serves exec/attach on an upgraded SPDY/3.1 connection with stream protocol `protocol`.
pub async fn serve_spdy(
    io: Upgraded,
    protocol: String,
    action: Action,
    runtime: Arc<dyn Runtime>,
    container_id: String,
    opts: Options,
) {
    let mut session = match spdy::Session::new(io, true) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "spdy session");
            return;
        }
    };
    let v3 = protocol.starts_with("v3.") || protocol.starts_with("v4.");
    let v4 = protocol.starts_with("v4.");
    let mut want: Vec<&str> = vec!["error"];
    if opts.stdin {
        want.push("stdin");
    }
    if opts.stdout {
        want.push("stdout");
    }
    if opts.stderr && !opts.tty {
        want.push("stderr");
    }
    if opts.tty && v3 {
        want.push("resize");
    }
    let mut streams: Vec<spdy::Stream> = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    while !want.is_empty() {
        tokio::select! {
            s = session.accept() => match s {
                Some(s) => {
                    let ty = s.header("streamtype").unwrap_or("").to_string();
                    want.retain(|w| *w != ty);
                    streams.push(s);
                }
                None => return,
            },
            _ = &mut deadline => {
                tracing::debug!(missing = ?want, "spdy exec: the client did not open all streams in 30s");
                return;
            }
        }
    }
    let mut take = |ty: &str| {
        streams
            .iter()
            .position(|s| s.header("streamtype") == Some(ty))
            .map(|i| streams.swap_remove(i))
    };
    let mut error = take("error");
    let mut tasks = Vec::new();
    // Our halves of the client's stdin and resize streams stay open until the session ends, as
    // the kubelet's do: kubectl (client-go's v2+ stream protocol) closes its stdin the moment our
    // side of that stream ends, and would drop whatever it had not yet sent.
    let mut held: Vec<spdy::StreamWriter> = Vec::new();
    let mut hold = |s: spdy::Stream| {
        held.push(s.writer);
        s.reader
    };
    let stdin = take("stdin").map(|s| {
        let mut reader = hold(s);
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        tasks.push(tokio::spawn(async move {
            while let Some(b) = reader.recv().await {
                if tx.send(b).await.is_err() {
                    break;
                }
            }
        }));
        rx
    });
    let resize = take("resize").map(|s| {
        let mut reader = hold(s);
        let (tx, rx) = mpsc::channel::<(u16, u16)>(4);
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(b) = reader.recv().await {
                buf.extend_from_slice(&b);
                let mut it =
                    serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
                let mut used = 0;
                while let Some(Ok(v)) = it.next() {
                    used = it.byte_offset();
                    if let Some(size) = parse_resize(v.to_string().as_bytes())
                        && tx.send(size).await.is_err()
                    {
                        return;
                    }
                }
                buf.drain(..used);
            }
        }));
        rx
    });
    let mut writers = Vec::new();
    let mut out = |s: Option<spdy::Stream>| {
        s.map(|mut s| {
            let (tx, mut rx) = mpsc::channel::<Bytes>(16);
            writers.push(tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    if s.writer.write(&b).await.is_err() {
                        break;
                    }
                }
                let _ = s.writer.close().await;
            }));
            tx
        })
    };
    let stdout = out(take("stdout"));
    let stderr = out(take("stderr"));
    let command = opts.command.clone();
    let attach = matches!(action, Action::Attach);
    let work = run(
        action,
        runtime,
        container_id,
        opts,
        Io {
            stdin,
            stdout,
            stderr,
            resize,
        },
    );
    // An attach ends when the client closes the connection (an exec runs to its end).
    let outcome = tokio::select! {
        o = work => o,
        _ = async { while session.accept().await.is_some() {} }, if attach => Outcome::Exited(0),
    };
    for w in writers {
        let _ = w.await;
    }
    if let Some(e) = error.as_mut() {
        let status = if v4 {
            status_json(&outcome, &command)
        } else {
            status_text(&outcome)
        };
        if !status.is_empty() {
            let _ = e.writer.write(&status).await;
        }
        let _ = e.writer.close().await;
    }
    for t in tasks {
        t.abort();
    }
    for mut w in held {
        let _ = w.close().await;
    }
    drop(error);
    drop(session);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_accept_kubelet_and_apiserver_names() {
        let q = |s: &[(&str, &str)]| {
            s.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let o = Options::from_query(&q(&[
            ("command", "sh"),
            ("command", "-c"),
            ("command", "echo hi"),
            ("input", "1"),
            ("output", "1"),
            ("tty", "true"),
        ]));
        assert_eq!(o.command, vec!["sh", "-c", "echo hi"]);
        assert!(o.stdin && o.stdout && !o.stderr && o.tty);
        let o = Options::from_query(&q(&[("stdout", "true"), ("stderr", "true")]));
        assert!(!o.stdin && o.stdout && o.stderr && !o.tty);
    }

    #[test]
    fn statuses_match_the_kubernetes_shape() {
        let ok: serde_json::Value =
            serde_json::from_slice(&status_json(&Outcome::Exited(0), &[])).unwrap();
        assert_eq!(ok["status"], "Success");
        let bad: serde_json::Value =
            serde_json::from_slice(&status_json(&Outcome::Exited(3), &["false".into()])).unwrap();
        assert_eq!(bad["status"], "Failure");
        assert_eq!(bad["reason"], "NonZeroExitCode");
        assert_eq!(bad["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(bad["details"]["causes"][0]["message"], "3");
        assert_eq!(status_text(&Outcome::Exited(0)), b"");
        assert_eq!(parse_resize(br#"{"Width":80,"Height":24}"#), Some((80, 24)));
    }
}
