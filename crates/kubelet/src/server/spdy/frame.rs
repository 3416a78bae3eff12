//! SPDY/3.1 framing: control and data frames, and the zlib-compressed name/value header blocks
//! (one compression context per direction, primed with the SPDY/3 dictionary).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// SPDY protocol version carried in every control frame.
pub const VERSION: u16 = 3;
/// Data and SYN flag: the sender half-closes the stream.
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM flag: the receiver must not send on the stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Largest frame payload (24-bit length).
pub const MAX_PAYLOAD: usize = 0xff_ffff;
/// Largest header block we accept once decompressed.
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Control frame types.
pub mod kind {
    /// SYN_STREAM
    pub const SYN_STREAM: u16 = 1;
    /// SYN_REPLY
    pub const SYN_REPLY: u16 = 2;
    /// RST_STREAM
    pub const RST_STREAM: u16 = 3;
    /// SETTINGS
    pub const SETTINGS: u16 = 4;
    /// PING
    pub const PING: u16 = 6;
    /// GOAWAY
    pub const GOAWAY: u16 = 7;
    /// HEADERS
    pub const HEADERS: u16 = 8;
    /// WINDOW_UPDATE
    pub const WINDOW_UPDATE: u16 = 9;
}

/// RST_STREAM status codes used here.
pub mod rst {
    /// generic protocol error
    pub const PROTOCOL_ERROR: u32 = 1;
    /// a frame for a stream that is not open
    pub const INVALID_STREAM: u32 = 2;
    /// the stream was refused
    pub const REFUSED_STREAM: u32 = 3;
    /// the stream is no longer needed
    pub const CANCEL: u32 = 5;
    /// flow control violated
    pub const FLOW_CONTROL_ERROR: u32 = 7;
}

/// Header name/value pairs of a SYN_STREAM, SYN_REPLY or HEADERS frame. Names are lowercase on
/// the wire; a value with several entries separates them with NUL.
pub type Headers = Vec<(String, String)>;

/// One SETTINGS entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// entry flags
    pub flags: u8,
    /// setting id (24 bits)
    pub id: u32,
    /// value
    pub value: u32,
}

/// SETTINGS id of the initial per-stream window size.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

/// One SPDY/3.1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// new stream id (odd from the client, even from the server)
        stream_id: u32,
        /// associated stream, 0 for none
        associated_to: u32,
        /// priority 0 (highest) to 7
        priority: u8,
        /// FIN / UNIDIRECTIONAL
        flags: u8,
        /// headers
        headers: Headers,
    },
    /// Accepts a stream.
    SynReply {
        /// the stream
        stream_id: u32,
        /// FIN
        flags: u8,
        /// headers
        headers: Headers,
    },
    /// Aborts a stream.
    RstStream {
        /// the stream
        stream_id: u32,
        /// why
        status: u32,
    },
    /// Connection settings.
    Settings {
        /// 0x01 = clear persisted settings
        flags: u8,
        /// entries
        entries: Vec<Setting>,
    },
    /// A ping (echoed by the receiver when the id has the sender's parity).
    Ping {
        /// the id
        id: u32,
    },
    /// The sender stops accepting streams.
    GoAway {
        /// last stream the sender processed
        last_good_stream_id: u32,
        /// why
        status: u32,
    },
    /// More headers on an open stream.
    Headers {
        /// the stream
        stream_id: u32,
        /// FIN
        flags: u8,
        /// headers
        headers: Headers,
    },
    /// Grants the peer more send window (stream 0: the whole session).
    WindowUpdate {
        /// the stream, or 0
        stream_id: u32,
        /// bytes granted
        delta: u32,
    },
    /// Stream data.
    Data {
        /// the stream
        stream_id: u32,
        /// FIN
        flags: u8,
        /// payload
        data: Bytes,
    },
}

/// Errors of the SPDY codec.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// A malformed frame.
    #[error("spdy: malformed {what}: the peer does not speak SPDY/3.1")]
    Malformed {
        /// what was wrong
        what: &'static str,
    },
    /// A control frame with another protocol version.
    #[error("spdy: unsupported version {0} (only SPDY/3.1 is spoken)")]
    Version(u16),
    /// Header (de)compression failed.
    #[error("spdy: header block compression: {0}")]
    Zlib(String),
    /// A frame too large to send.
    #[error("spdy: frame payload of {0} bytes exceeds the 24-bit length")]
    TooLarge(usize),
}

/// The SPDY/3 header compression dictionary: the length-prefixed words, then the free text.
const DICT_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

const DICT_TEXT: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information",
    "204 No Content",
    "301 Moved Permanently",
    "400 Bad Request",
    "401 Unauthorized",
    "403 Forbidden",
    "404 Not Found",
    "500 Internal Server Error",
    "501 Not Implemented",
    "503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
    "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The SPDY/3 zlib dictionary bytes.
pub fn dictionary() -> &'static [u8] {
    static DICT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICT.get_or_init(|| {
        let mut d = Vec::with_capacity(1423);
        for w in DICT_WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(DICT_TEXT.as_bytes());
        d
    })
}

fn stream_id(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Serialises a header block (before compression).
pub fn encode_header_block(headers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (n, v) in headers {
        out.extend_from_slice(&(n.len() as u32).to_be_bytes());
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// Parses a decompressed header block.
pub fn decode_header_block(mut b: &[u8]) -> Result<Headers, SpdyError> {
    let bad = || SpdyError::Malformed {
        what: "header block",
    };
    let take = |b: &mut &[u8]| -> Result<String, SpdyError> {
        if b.len() < 4 {
            return Err(bad());
        }
        let n = be32(b) as usize;
        *b = &b[4..];
        if b.len() < n {
            return Err(bad());
        }
        let s = String::from_utf8_lossy(&b[..n]).into_owned();
        *b = &b[n..];
        Ok(s)
    };
    if b.len() < 4 {
        return Err(bad());
    }
    let count = be32(b) as usize;
    b = &b[4..];
    let mut out = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = take(&mut b)?;
        let value = take(&mut b)?;
        out.push((name.to_ascii_lowercase(), value));
    }
    Ok(out)
}

/// Encodes frames of one direction (owns that direction's compression context).
pub struct Encoder {
    z: Compress,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("spdy::Encoder")
    }
}

impl Encoder {
    /// A fresh encoder (its zlib stream starts with the SPDY dictionary).
    pub fn new() -> Result<Self, SpdyError> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(dictionary())
            .map_err(|e| SpdyError::Zlib(e.to_string()))?;
        Ok(Self { z })
    }

    fn compress(&mut self, headers: &[(String, String)]) -> Result<Vec<u8>, SpdyError> {
        let input = encode_header_block(headers);
        let mut out = Vec::with_capacity(input.len() + 64);
        let mut pos = 0usize;
        loop {
            out.reserve(256);
            let before = self.z.total_in();
            self.z
                .compress_vec(&input[pos..], &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Zlib(e.to_string()))?;
            pos += (self.z.total_in() - before) as usize;
            if pos >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    /// Appends the wire form of `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), SpdyError> {
        let control = |out: &mut BytesMut, ty: u16, flags: u8, payload: &[u8]| {
            if payload.len() > MAX_PAYLOAD {
                return Err(SpdyError::TooLarge(payload.len()));
            }
            out.put_u16(0x8000 | VERSION);
            out.put_u16(ty);
            out.put_u8(flags);
            out.put_uint(payload.len() as u64, 3);
            out.put_slice(payload);
            Ok(())
        };
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let mut p = Vec::new();
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(associated_to & 0x7fff_ffff);
                p.put_u8((priority & 0x7) << 5);
                p.put_u8(0); // slot
                p.extend_from_slice(&self.compress(headers)?);
                control(out, kind::SYN_STREAM, *flags, &p)
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let mut p = Vec::new();
                p.put_u32(stream_id & 0x7fff_ffff);
                p.extend_from_slice(&self.compress(headers)?);
                control(out, kind::SYN_REPLY, *flags, &p)
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let mut p = Vec::new();
                p.put_u32(stream_id & 0x7fff_ffff);
                p.extend_from_slice(&self.compress(headers)?);
                control(out, kind::HEADERS, *flags, &p)
            }
            Frame::RstStream { stream_id, status } => {
                let mut p = Vec::new();
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(*status);
                control(out, kind::RST_STREAM, 0, &p)
            }
            Frame::Settings { flags, entries } => {
                let mut p = Vec::new();
                p.put_u32(entries.len() as u32);
                for e in entries {
                    p.put_u8(e.flags);
                    p.put_uint(u64::from(e.id & 0xff_ffff), 3);
                    p.put_u32(e.value);
                }
                control(out, kind::SETTINGS, *flags, &p)
            }
            Frame::Ping { id } => control(out, kind::PING, 0, &id.to_be_bytes()),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                let mut p = Vec::new();
                p.put_u32(last_good_stream_id & 0x7fff_ffff);
                p.put_u32(*status);
                control(out, kind::GOAWAY, 0, &p)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let mut p = Vec::new();
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(delta & 0x7fff_ffff);
                control(out, kind::WINDOW_UPDATE, 0, &p)
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_PAYLOAD {
                    return Err(SpdyError::TooLarge(data.len()));
                }
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u8(*flags);
                out.put_uint(data.len() as u64, 3);
                out.put_slice(data);
                Ok(())
            }
        }
    }
}

/// Decodes frames of one direction (owns that direction's decompression context).
pub struct Decoder {
    z: Decompress,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("spdy::Decoder")
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A fresh decoder.
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    fn decompress(&mut self, input: &[u8]) -> Result<Headers, SpdyError> {
        let mut out: Vec<u8> = Vec::with_capacity(input.len() * 4 + 64);
        let mut pos = 0usize;
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve(out.len().max(1024));
            }
            let before = self.z.total_in();
            match self
                .z
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
            {
                Ok(status) => {
                    pos += (self.z.total_in() - before) as usize;
                    if status == Status::StreamEnd
                        || (pos >= input.len() && out.len() < out.capacity())
                    {
                        break;
                    }
                    if status == Status::BufError && pos >= input.len() {
                        break;
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    pos += (self.z.total_in() - before) as usize;
                    self.z
                        .set_dictionary(dictionary())
                        .map_err(|e| SpdyError::Zlib(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Zlib(e.to_string())),
            }
            if out.len() > MAX_HEADER_BLOCK {
                return Err(SpdyError::Malformed {
                    what: "header block (too large)",
                });
            }
        }
        decode_header_block(&out)
    }

    /// Takes one complete frame off the front of `buf`, or returns None if more bytes are needed.
    /// Control frames of unknown types are skipped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        loop {
            if buf.len() < 8 {
                return Ok(None);
            }
            let len =
                (usize::from(buf[5]) << 16) | (usize::from(buf[6]) << 8) | usize::from(buf[7]);
            if buf.len() < 8 + len {
                buf.reserve(8 + len - buf.len());
                return Ok(None);
            }
            let head = buf.split_to(8);
            let p = buf.split_to(len).freeze();
            let flags = head[4];
            if head[0] & 0x80 == 0 {
                return Ok(Some(Frame::Data {
                    stream_id: stream_id(&head[..4]),
                    flags,
                    data: p,
                }));
            }
            let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
            if version != VERSION {
                return Err(SpdyError::Version(version));
            }
            let ty = u16::from_be_bytes([head[2], head[3]]);
            let need = |n: usize, what: &'static str| {
                if p.len() < n {
                    Err(SpdyError::Malformed { what })
                } else {
                    Ok(())
                }
            };
            let frame = match ty {
                kind::SYN_STREAM => {
                    need(10, "SYN_STREAM")?;
                    Frame::SynStream {
                        stream_id: stream_id(&p),
                        associated_to: stream_id(&p[4..]),
                        priority: p[8] >> 5,
                        flags,
                        headers: self.decompress(&p[10..])?,
                    }
                }
                kind::SYN_REPLY => {
                    need(4, "SYN_REPLY")?;
                    Frame::SynReply {
                        stream_id: stream_id(&p),
                        flags,
                        headers: self.decompress(&p[4..])?,
                    }
                }
                kind::HEADERS => {
                    need(4, "HEADERS")?;
                    Frame::Headers {
                        stream_id: stream_id(&p),
                        flags,
                        headers: self.decompress(&p[4..])?,
                    }
                }
                kind::RST_STREAM => {
                    need(8, "RST_STREAM")?;
                    Frame::RstStream {
                        stream_id: stream_id(&p),
                        status: be32(&p[4..]),
                    }
                }
                kind::SETTINGS => {
                    need(4, "SETTINGS")?;
                    let n = be32(&p) as usize;
                    need(4 + n.saturating_mul(8), "SETTINGS")?;
                    let mut rest = &p[4..];
                    let mut entries = Vec::with_capacity(n);
                    for _ in 0..n {
                        entries.push(Setting {
                            flags: rest[0],
                            id: (u32::from(rest[1]) << 16)
                                | (u32::from(rest[2]) << 8)
                                | u32::from(rest[3]),
                            value: be32(&rest[4..]),
                        });
                        rest.advance(8);
                    }
                    Frame::Settings { flags, entries }
                }
                kind::PING => {
                    need(4, "PING")?;
                    Frame::Ping { id: be32(&p) }
                }
                kind::GOAWAY => {
                    need(4, "GOAWAY")?;
                    Frame::GoAway {
                        last_good_stream_id: stream_id(&p),
                        status: if p.len() >= 8 { be32(&p[4..]) } else { 0 },
                    }
                }
                kind::WINDOW_UPDATE => {
                    need(8, "WINDOW_UPDATE")?;
                    Frame::WindowUpdate {
                        stream_id: stream_id(&p),
                        delta: be32(&p[4..]) & 0x7fff_ffff,
                    }
                }
                _ => continue,
            };
            return Ok(Some(frame));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn dictionary_is_the_spdy3_dictionary() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert!(d.starts_with(b"\x00\x00\x00\x07options\x00\x00\x00\x04head"));
        assert!(d.ends_with(b"enq=0."));
        assert_eq!(
            hex::encode(sha2::Sha256::digest(d)),
            "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
        );
    }

    #[test]
    fn data_frame_known_bytes() {
        let mut e = Encoder::new().unwrap();
        let mut out = BytesMut::new();
        e.encode(
            &Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hi"),
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], b"\x00\x00\x00\x03\x01\x00\x00\x02hi");
        let mut d = Decoder::new();
        assert_eq!(
            d.decode(&mut out).unwrap(),
            Some(Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hi")
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn control_frames_known_bytes() {
        let mut e = Encoder::new().unwrap();
        let mut out = BytesMut::new();
        e.encode(&Frame::Ping { id: 7 }, &mut out).unwrap();
        assert_eq!(
            &out[..],
            b"\x80\x03\x00\x06\x00\x00\x00\x04\x00\x00\x00\x07"
        );
        out.clear();
        e.encode(
            &Frame::RstStream {
                stream_id: 5,
                status: rst::CANCEL,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            b"\x80\x03\x00\x03\x00\x00\x00\x08\x00\x00\x00\x05\x00\x00\x00\x05"
        );
        out.clear();
        e.encode(
            &Frame::WindowUpdate {
                stream_id: 0,
                delta: 65536,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            b"\x80\x03\x00\x09\x00\x00\x00\x08\x00\x00\x00\x00\x00\x01\x00\x00"
        );
        out.clear();
        e.encode(
            &Frame::Settings {
                flags: 0,
                entries: vec![Setting {
                    flags: 0,
                    id: SETTINGS_INITIAL_WINDOW_SIZE,
                    value: 262_144,
                }],
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            b"\x80\x03\x00\x04\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x07\x00\x04\x00\x00"
        );
        out.clear();
        e.encode(
            &Frame::GoAway {
                last_good_stream_id: 9,
                status: 0,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            b"\x80\x03\x00\x07\x00\x00\x00\x08\x00\x00\x00\x09\x00\x00\x00\x00"
        );
    }

    #[test]
    fn every_frame_round_trips_with_a_shared_zlib_context() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: h(&[("streamtype", "error")]),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 2,
                flags: FLAG_FIN,
                headers: h(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::Headers {
                stream_id: 3,
                flags: 0,
                headers: h(&[("x", "a\0b")]),
            },
            Frame::RstStream {
                stream_id: 3,
                status: rst::REFUSED_STREAM,
            },
            Frame::Settings {
                flags: 1,
                entries: vec![
                    Setting {
                        flags: 0,
                        id: 4,
                        value: 100,
                    },
                    Setting {
                        flags: 1,
                        id: 7,
                        value: 65536,
                    },
                ],
            },
            Frame::Ping { id: 2 },
            Frame::GoAway {
                last_good_stream_id: 3,
                status: 1,
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 4096,
            },
            Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from(vec![7u8; 70_000]),
            },
            // the same headers again: compressed against the shared history
            Frame::SynStream {
                stream_id: 5,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: h(&[("streamtype", "error")]),
            },
        ];
        let mut e = Encoder::new().unwrap();
        let mut wire = BytesMut::new();
        for f in &frames {
            e.encode(f, &mut wire).unwrap();
        }
        // feed byte by byte-ish chunks to exercise partial frames
        let mut d = Decoder::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(7) {
            buf.extend_from_slice(chunk);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn header_blocks_use_the_dictionary() {
        let mut e = Encoder::new().unwrap();
        let mut wire = BytesMut::new();
        e.encode(
            &Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: h(&[("content-type", "text/plain")]),
            },
            &mut wire,
        )
        .unwrap();
        let block = &wire[12..];
        // zlib header with FDICT set, then the dictionary's Adler-32
        assert_eq!(block[1] & 0x20, 0x20, "FDICT flag");
        let mut adler = flate2::Compress::new(Compression::default(), true);
        let want = adler.set_dictionary(dictionary()).unwrap();
        assert_eq!(
            u32::from_be_bytes([block[2], block[3], block[4], block[5]]),
            want
        );
        // a plain zlib decoder without the dictionary cannot read it
        let mut z = Decompress::new(true);
        let mut out = Vec::with_capacity(1024);
        let err = z
            .decompress_vec(block, &mut out, FlushDecompress::Sync)
            .unwrap_err();
        assert!(err.needs_dictionary().is_some());
    }

    #[test]
    fn header_block_decodes_hand_made_bytes() {
        let raw = b"\x00\x00\x00\x01\x00\x00\x00\x0aStreamType\x00\x00\x00\x06stdout";
        assert_eq!(
            decode_header_block(raw).unwrap(),
            h(&[("streamtype", "stdout")])
        );
        assert!(decode_header_block(b"\x00\x00\x00\x02\x00\x00\x00\x01a").is_err());
    }

    #[test]
    fn rejects_other_versions_and_short_frames() {
        let mut d = Decoder::new();
        let mut b = BytesMut::from(&b"\x80\x02\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01"[..]);
        assert!(matches!(d.decode(&mut b), Err(SpdyError::Version(2))));
        let mut b = BytesMut::from(&b"\x80\x03\x00\x03\x00\x00\x00\x02\x00\x00"[..]);
        assert!(matches!(
            Decoder::new().decode(&mut b),
            Err(SpdyError::Malformed { .. })
        ));
        // unknown control types are skipped
        let mut b = BytesMut::from(
            &b"\x80\x03\x00\x0a\x00\x00\x00\x01\x00\x80\x03\x00\x06\x00\x00\x00\x04\x00\x00\x00\x09"[..],
        );
        assert_eq!(
            Decoder::new().decode(&mut b).unwrap(),
            Some(Frame::Ping { id: 9 })
        );
    }
}
