//! A SPDY/3.1 session over any byte stream: a reader task that decodes frames and routes data to
//! streams, a writer task that owns the header compressor, and stream handles for both sides.
//!
//! Flow control: the kubernetes clients (spdystream) neither send nor honour WINDOW_UPDATE. A
//! session always counts its send windows (64 KiB initial per stream and for the session, moved
//! by SETTINGS and WINDOW_UPDATE), but holds writes back and replenishes the peer's windows only
//! once the peer has shown it does flow control (it sent a WINDOW_UPDATE or an initial-window
//! SETTINGS).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::frame::{
    Decoder, Encoder, FLAG_FIN, Frame, Headers, SETTINGS_INITIAL_WINDOW_SIZE, SpdyError,
};

/// Largest data frame we send.
const MAX_DATA: usize = 32 * 1024;

/// The default SPDY/3.1 window, per stream and for the session.
const DEFAULT_WINDOW: i64 = 64 * 1024;

struct Windows {
    initial: i64,
    session: i64,
    streams: HashMap<u32, i64>,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            initial: DEFAULT_WINDOW,
            session: DEFAULT_WINDOW,
            streams: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct Shared {
    streams: Mutex<HashMap<u32, mpsc::Sender<Bytes>>>,
    peer_flow_control: AtomicBool,
    windows: Mutex<Windows>,
    window_grown: tokio::sync::Notify,
    // the peer's side ended: writes stop waiting for window (and then fail)
    ended: AtomicBool,
}

impl Shared {
    fn windows(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes up to `want` bytes of send window for `id`; with flow control on, waits for window.
    async fn take_window(&self, id: u32, want: usize) -> usize {
        loop {
            let grown = self.window_grown.notified();
            tokio::pin!(grown);
            grown.as_mut().enable();
            {
                let enforce = self.peer_flow_control.load(Ordering::Relaxed)
                    && !self.ended.load(Ordering::Relaxed);
                let mut w = self.windows();
                let initial = w.initial;
                let stream = *w.streams.entry(id).or_insert(initial);
                let avail = stream.min(w.session);
                let n = if enforce {
                    (avail.max(0) as usize).min(want)
                } else {
                    want
                };
                if n > 0 {
                    w.session -= n as i64;
                    if let Some(s) = w.streams.get_mut(&id) {
                        *s -= n as i64;
                    }
                    return n;
                }
            }
            grown.await;
        }
    }

    fn grow(&self, id: u32, delta: u32) {
        let mut w = self.windows();
        if id == 0 {
            w.session += i64::from(delta);
        } else {
            let initial = w.initial;
            *w.streams.entry(id).or_insert(initial) += i64::from(delta);
        }
        drop(w);
        self.window_grown.notify_waiters();
    }

    fn set_initial(&self, value: u32) {
        let mut w = self.windows();
        let diff = i64::from(value) - w.initial;
        w.initial = i64::from(value);
        for v in w.streams.values_mut() {
            *v += diff;
        }
        drop(w);
        self.window_grown.notify_waiters();
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, mpsc::Sender<Bytes>>> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One SPDY session.
pub struct Session {
    out: mpsc::Sender<Frame>,
    incoming: mpsc::Receiver<Stream>,
    shared: Arc<Shared>,
    next_id: AtomicU32,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("spdy::Session").finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The reader holds a frame sender: stop it so that the writer ends once streams are gone.
        self.reader.abort();
        self.shared.ended.store(true, Ordering::Relaxed);
        self.shared.window_grown.notify_waiters();
    }
}

/// A stream: its opening headers, and both directions.
#[derive(Debug)]
pub struct Stream {
    /// Stream id.
    pub id: u32,
    /// Headers of its SYN_STREAM (names lowercase).
    pub headers: Headers,
    /// What the peer sends.
    pub reader: StreamReader,
    /// What we send.
    pub writer: StreamWriter,
}

impl Stream {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The receiving half of a stream.
pub struct StreamReader {
    id: u32,
    rx: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl StreamReader {
    /// The next chunk; None once the peer half-closed or reset the stream.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let b = self.rx.recv().await?;
        if self.shared.peer_flow_control.load(Ordering::Relaxed) && !b.is_empty() {
            let delta = b.len() as u32;
            let _ = self
                .out
                .send(Frame::WindowUpdate {
                    stream_id: self.id,
                    delta,
                })
                .await;
            let _ = self
                .out
                .send(Frame::WindowUpdate {
                    stream_id: 0,
                    delta,
                })
                .await;
        }
        Some(b)
    }
}

/// The sending half of a stream; dropping it half-closes the stream (FIN).
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
    closed: bool,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl StreamWriter {
    /// Sends bytes (split into frames of at most 32 KiB).
    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = self
                .shared
                .take_window(self.id, rest.len().min(MAX_DATA))
                .await;
            let (chunk, tail) = rest.split_at(n);
            self.out
                .send(Frame::Data {
                    stream_id: self.id,
                    flags: 0,
                    data: Bytes::copy_from_slice(chunk),
                })
                .await
                .map_err(|_| gone())?;
            rest = tail;
        }
        Ok(())
    }

    /// Half-closes the stream (an empty data frame with FIN).
    pub async fn close(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.out
            .send(Frame::Data {
                stream_id: self.id,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
            .await
            .map_err(|_| gone())
    }

    /// Aborts the stream with RST_STREAM.
    pub async fn reset(&mut self, status: u32) {
        self.closed = true;
        let _ = self
            .out
            .send(Frame::RstStream {
                stream_id: self.id,
                status,
            })
            .await;
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let fin = Frame::Data {
            stream_id: self.id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        };
        if let Err(mpsc::error::TrySendError::Full(fin)) = self.out.try_send(fin)
            && let Ok(h) = tokio::runtime::Handle::try_current()
        {
            let out = self.out.clone();
            h.spawn(async move {
                let _ = out.send(fin).await;
            });
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "spdy session closed by the peer",
    )
}

impl Session {
    /// Starts a session on `io`. `server` decides stream id parity (servers open even ids).
    pub fn new<T>(io: T, server: bool) -> Result<Self, SpdyError>
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let encoder = Encoder::new()?;
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel::<Frame>(64);
        let (in_tx, in_rx) = mpsc::channel::<Stream>(16);
        let shared = Arc::new(Shared::default());
        tokio::spawn(write_loop(wr, encoder, out_rx));
        let reader = tokio::spawn(read_loop(rd, server, out_tx.clone(), in_tx, shared.clone()));
        Ok(Self {
            out: out_tx,
            incoming: in_rx,
            shared,
            next_id: AtomicU32::new(if server { 2 } else { 1 }),
            reader,
        })
    }

    /// The next stream the peer opened; None when the session ended.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Opens a stream with `headers`.
    pub async fn open(&self, headers: Headers) -> std::io::Result<Stream> {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(64);
        self.shared.streams().insert(id, tx);
        self.out
            .send(Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers.clone(),
            })
            .await
            .map_err(|_| gone())?;
        Ok(Stream {
            id,
            headers,
            reader: StreamReader {
                id,
                rx,
                out: self.out.clone(),
                shared: self.shared.clone(),
            },
            writer: StreamWriter {
                id,
                out: self.out.clone(),
                shared: self.shared.clone(),
                closed: false,
            },
        })
    }

    /// Sends a PING.
    pub async fn ping(&self, id: u32) -> std::io::Result<()> {
        self.out.send(Frame::Ping { id }).await.map_err(|_| gone())
    }
}

async fn write_loop<W: AsyncWrite>(
    mut wr: tokio::io::WriteHalf<W>,
    mut enc: Encoder,
    mut rx: mpsc::Receiver<Frame>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(f) = rx.recv().await {
        let mut next = Some(f);
        while let Some(f) = next.take() {
            if let Err(e) = enc.encode(&f, &mut buf) {
                tracing::debug!(error = %e, "spdy: encoding a frame failed");
                return;
            }
            if buf.len() < 64 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead>(
    mut rd: tokio::io::ReadHalf<R>,
    server: bool,
    out: mpsc::Sender<Frame>,
    incoming: mpsc::Sender<Stream>,
    shared: Arc<Shared>,
) {
    let mut dec = Decoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    'outer: loop {
        loop {
            let frame = match dec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "spdy: bad frame from the peer");
                    let _ = out
                        .send(Frame::GoAway {
                            last_good_stream_id: 0,
                            status: 1,
                        })
                        .await;
                    break 'outer;
                }
            };
            if !handle(frame, server, &out, &incoming, &shared).await {
                break 'outer;
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    shared.streams().clear();
    shared.ended.store(true, Ordering::Relaxed);
    shared.window_grown.notify_waiters();
}

/// Handles one frame; false ends the session.
async fn handle(
    frame: Frame,
    server: bool,
    out: &mpsc::Sender<Frame>,
    incoming: &mpsc::Sender<Stream>,
    shared: &Arc<Shared>,
) -> bool {
    match frame {
        Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } => {
            let (tx, rx) = mpsc::channel(64);
            if flags & FLAG_FIN == 0 {
                shared.streams().insert(stream_id, tx);
            }
            let _ = out
                .send(Frame::SynReply {
                    stream_id,
                    flags: 0,
                    headers: Vec::new(),
                })
                .await;
            let stream = Stream {
                id: stream_id,
                headers,
                reader: StreamReader {
                    id: stream_id,
                    rx,
                    out: out.clone(),
                    shared: shared.clone(),
                },
                writer: StreamWriter {
                    id: stream_id,
                    out: out.clone(),
                    shared: shared.clone(),
                    closed: false,
                },
            };
            if incoming.send(stream).await.is_err() {
                shared.streams().remove(&stream_id);
            }
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            let tx = shared.streams().get(&stream_id).cloned();
            match tx {
                Some(tx) => {
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        // the receiver is gone: drop the data
                    }
                    if flags & FLAG_FIN != 0 {
                        shared.streams().remove(&stream_id);
                    }
                }
                None => tracing::trace!(stream_id, "spdy: data for a closed stream"),
            }
        }
        Frame::RstStream { stream_id, .. } => {
            shared.streams().remove(&stream_id);
            shared.windows().streams.remove(&stream_id);
        }
        Frame::Ping { id } => {
            // Echo pings the peer started (client ids are odd).
            if (id % 2 == 1) == server {
                let _ = out.send(Frame::Ping { id }).await;
            }
        }
        Frame::GoAway { .. } => return false,
        Frame::WindowUpdate { stream_id, delta } => {
            shared.peer_flow_control.store(true, Ordering::Relaxed);
            shared.grow(stream_id, delta);
        }
        Frame::Settings { entries, .. } => {
            for e in entries
                .iter()
                .filter(|e| e.id == SETTINGS_INITIAL_WINDOW_SIZE)
            {
                shared.peer_flow_control.store(true, Ordering::Relaxed);
                shared.set_initial(e.value);
            }
        }
        Frame::SynReply { .. } | Frame::Headers { .. } => {}
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_carry_data_both_ways_and_fin_ends_them() {
        let (a, b) = tokio::io::duplex(1024);
        let client = Session::new(a, false).unwrap();
        let mut server = Session::new(b, true).unwrap();
        let mut c = client
            .open(vec![("streamtype".into(), "stdin".into())])
            .await
            .unwrap();
        assert_eq!(c.id, 1);
        let mut s = server.accept().await.unwrap();
        assert_eq!(s.header("streamtype"), Some("stdin"));
        c.writer.write(&vec![5u8; 100_000]).await.unwrap();
        c.writer.close().await.unwrap();
        let mut got = 0;
        while let Some(b) = s.reader.recv().await {
            assert!(b.iter().all(|&x| x == 5));
            got += b.len();
        }
        assert_eq!(got, 100_000);
        s.writer.write(b"back").await.unwrap();
        drop(s);
        assert_eq!(&c.reader.recv().await.unwrap()[..], b"back");
        assert!(c.reader.recv().await.is_none());
        // a second stream, opened after the first, gets the next odd id
        let c2 = client.open(vec![]).await.unwrap();
        assert_eq!(c2.id, 3);
        assert_eq!(server.accept().await.unwrap().id, 3);
        drop(client);
        drop(c);
        drop(c2);
    }

    async fn next_frame<R: AsyncRead + Unpin>(
        rd: &mut R,
        dec: &mut Decoder,
        inbuf: &mut BytesMut,
    ) -> Frame {
        loop {
            if let Some(f) = dec.decode(inbuf).unwrap() {
                return f;
            }
            rd.read_buf(inbuf).await.unwrap();
        }
    }

    #[tokio::test]
    async fn writes_wait_for_window_once_the_peer_does_flow_control() {
        use super::super::frame::Setting;
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut server = Session::new(b, true).unwrap();
        let (mut rd, mut wr) = tokio::io::split(a);
        let mut enc = Encoder::new().unwrap();
        let mut buf = BytesMut::new();
        // a 10-byte initial window, then a stream
        enc.encode(
            &Frame::Settings {
                flags: 0,
                entries: vec![Setting {
                    flags: 0,
                    id: SETTINGS_INITIAL_WINDOW_SIZE,
                    value: 10,
                }],
            },
            &mut buf,
        )
        .unwrap();
        enc.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: vec![],
            },
            &mut buf,
        )
        .unwrap();
        wr.write_all(&buf).await.unwrap();
        let mut s = server.accept().await.unwrap();
        let writer = tokio::spawn(async move {
            s.writer.write(&[1u8; 25]).await.unwrap();
            s
        });
        let mut dec = Decoder::new();
        let mut inbuf = BytesMut::new();
        let mut data = 0usize;
        assert!(matches!(
            next_frame(&mut rd, &mut dec, &mut inbuf).await,
            Frame::SynReply { stream_id: 1, .. }
        ));
        while data < 10 {
            if let Frame::Data { data: d, .. } = next_frame(&mut rd, &mut dec, &mut inbuf).await {
                data += d.len();
            }
        }
        assert_eq!(data, 10);
        // nothing more until the window grows
        assert!(
            tokio::time::timeout(
                std::time::Duration::from_millis(200),
                next_frame(&mut rd, &mut dec, &mut inbuf)
            )
            .await
            .is_err()
        );
        buf.clear();
        enc.encode(
            &Frame::WindowUpdate {
                stream_id: 1,
                delta: 100,
            },
            &mut buf,
        )
        .unwrap();
        wr.write_all(&buf).await.unwrap();
        while data < 25 {
            if let Frame::Data { data: d, .. } = next_frame(&mut rd, &mut dec, &mut inbuf).await {
                data += d.len();
            }
        }
        assert_eq!(data, 25);
        let _s = writer.await.unwrap();
    }

    #[tokio::test]
    async fn server_answers_client_pings_and_ends_on_peer_close() {
        let (a, b) = tokio::io::duplex(1024);
        let mut server = Session::new(b, true).unwrap();
        let (mut rd, mut wr) = tokio::io::split(a);
        let mut enc = Encoder::new().unwrap();
        let mut buf = BytesMut::new();
        enc.encode(&Frame::Ping { id: 1 }, &mut buf).unwrap();
        wr.write_all(&buf).await.unwrap();
        let mut resp = [0u8; 12];
        rd.read_exact(&mut resp).await.unwrap();
        assert_eq!(&resp, b"\x80\x03\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01");
        drop(wr);
        drop(rd);
        assert!(server.accept().await.is_none());
    }
}
