//! `/containerLogs`: reads the CRI log files the runtime writes (`<time> stdout|stderr F|P <text>`),
//! joins partial records, applies `tailLines`, `sinceSeconds`/`sinceTime`, `timestamps` and
//! `limitBytes`, and with `follow` streams new records until the container ends or the client goes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use skiff_runtime::{ContainerState, Runtime};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

/// Options of a log request (the query parameters of `pods/log`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogOptions {
    /// keep streaming new lines
    pub follow: bool,
    /// only the last N lines
    pub tail_lines: Option<usize>,
    /// only lines at or after this time (ns since the epoch)
    pub since_ns: Option<i128>,
    /// prefix each line with its RFC 3339 time
    pub timestamps: bool,
    /// the previous instance of the container
    pub previous: bool,
    /// stop after this many bytes
    pub limit_bytes: Option<usize>,
}

fn truthy(v: &str) -> bool {
    v == "1" || v.eq_ignore_ascii_case("true")
}

impl LogOptions {
    /// Parses the query; the error names the bad parameter.
    pub fn from_query(q: &[(String, String)], now: OffsetDateTime) -> Result<Self, String> {
        let mut o = Self::default();
        let mut since_seconds = None;
        let mut since_time = None;
        for (k, v) in q {
            match k.as_str() {
                "follow" => o.follow = truthy(v),
                "timestamps" => o.timestamps = truthy(v),
                "previous" => o.previous = truthy(v),
                "tailLines" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("tailLines: {v:?} is not an integer"))?;
                    if n < 0 {
                        return Err("tailLines: must be greater than or equal to 0".into());
                    }
                    o.tail_lines = Some(n as usize);
                }
                "limitBytes" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("limitBytes: {v:?} is not an integer"))?;
                    if n < 1 {
                        return Err("limitBytes: must be greater than 0".into());
                    }
                    o.limit_bytes = Some(n as usize);
                }
                "sinceSeconds" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("sinceSeconds: {v:?} is not an integer"))?;
                    if n < 1 {
                        return Err("sinceSeconds: must be greater than 0".into());
                    }
                    since_seconds = Some(n);
                }
                "sinceTime" => {
                    let t = OffsetDateTime::parse(v, &Rfc3339)
                        .map_err(|e| format!("sinceTime: {v:?} is not an RFC 3339 time: {e}"))?;
                    since_time = Some(t);
                }
                _ => {}
            }
        }
        if since_seconds.is_some() && since_time.is_some() {
            return Err("at most one of sinceTime or sinceSeconds may be specified".into());
        }
        o.since_ns = match (since_seconds, since_time) {
            (Some(s), _) => Some(now.unix_timestamp_nanos() - i128::from(s) * 1_000_000_000),
            (_, Some(t)) => Some(t.unix_timestamp_nanos()),
            _ => None,
        };
        Ok(o)
    }
}

/// One CRI log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// the time as written
    pub time: &'a str,
    /// the time, ns since the epoch
    pub time_ns: i128,
    /// true for stdout
    pub stdout: bool,
    /// true for `F` (the line ends here), false for `P`
    pub full: bool,
    /// the text without the newline
    pub text: &'a [u8],
}

/// Parses one line of a CRI log file (without its `\n`).
pub fn parse_record(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let text = parts.next().unwrap_or(b"");
    let time_ns = OffsetDateTime::parse(time, &Rfc3339)
        .ok()?
        .unix_timestamp_nanos();
    let stdout = match stream {
        b"stdout" => true,
        b"stderr" => false,
        _ => return None,
    };
    let full = match tag {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    Some(Record {
        time,
        time_ns,
        stdout,
        full,
        text,
    })
}

/// Turns records into the client's bytes, with per-stream line state.
#[derive(Debug)]
struct Writer {
    timestamps: bool,
    since_ns: Option<i128>,
    remaining: Option<usize>,
    // per stream: inside a partial line (the next record continues it)
    in_partial: [bool; 2],
}

impl Writer {
    /// Appends the output for `r` to `out`; false once `limitBytes` is reached.
    fn record(&mut self, r: &Record<'_>, out: &mut Vec<u8>) -> bool {
        let idx = usize::from(!r.stdout);
        if let Some(since) = self.since_ns
            && r.time_ns < since
        {
            self.in_partial[idx] = !r.full;
            return true;
        }
        let start = out.len();
        if self.timestamps && !self.in_partial[idx] {
            out.extend_from_slice(r.time.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(r.text);
        if r.full {
            out.push(b'\n');
        }
        self.in_partial[idx] = !r.full;
        if let Some(rem) = self.remaining.as_mut() {
            let n = out.len() - start;
            if n >= *rem {
                out.truncate(start + *rem);
                *rem = 0;
                return false;
            }
            *rem -= n;
        }
        true
    }
}

/// Renders complete log lines (`data` ends with `\n`) for a non-follow request; used by tests
/// and by the streaming path for the first read.
pub fn render(data: &[u8], opts: &LogOptions) -> Vec<u8> {
    let mut w = Writer {
        timestamps: opts.timestamps,
        since_ns: opts.since_ns,
        remaining: opts.limit_bytes,
        in_partial: [false; 2],
    };
    let mut out = Vec::new();
    render_into(&mut w, data, opts.tail_lines, &mut out);
    out
}

fn render_into(w: &mut Writer, data: &[u8], tail: Option<usize>, out: &mut Vec<u8>) -> bool {
    let records: Vec<Record<'_>> = data
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(parse_record)
        .collect();
    let mut start = 0;
    if let Some(n) = tail {
        // Walk back over n complete lines (a line is its P records and the closing F).
        let mut lines = 0;
        start = records.len();
        while start > 0 {
            let r = &records[start - 1];
            if r.full {
                if lines == n {
                    break;
                }
                lines += 1;
            }
            start -= 1;
        }
    }
    for r in &records[start..] {
        if !w.record(r, out) {
            return false;
        }
    }
    true
}

/// Streams a container's log to `tx` (spawned by the handler after it validated the request).
pub async fn stream(
    runtime: Arc<dyn Runtime>,
    container_id: String,
    path: PathBuf,
    opts: LogOptions,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut w = Writer {
        timestamps: opts.timestamps,
        since_ns: opts.since_ns,
        remaining: opts.limit_bytes,
        in_partial: [false; 2],
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    let mut data = Vec::new();
    if let Some(f) = file.as_mut()
        && let Err(e) = f.read_to_end(&mut data).await
    {
        let _ = tx.send(Err(e)).await;
        return;
    }
    let mut offset = data.len() as u64;
    // Only complete lines now; keep the rest for follow.
    let cut = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut pending = data.split_off(cut);
    let mut out = Vec::new();
    let more = render_into(&mut w, &data, opts.tail_lines, &mut out);
    if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
        return;
    }
    if !more || !opts.follow {
        return;
    }
    let mut ended_polls = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tx.closed() => return,
        }
        if file.is_none() {
            file = tokio::fs::File::open(&path).await.ok();
        }
        let mut grew = false;
        if let Some(f) = file.as_mut() {
            // A rotated or truncated file starts over.
            if let Ok(meta) = tokio::fs::metadata(&path).await
                && meta.len() < offset
            {
                offset = 0;
                pending.clear();
                if let Ok(nf) = tokio::fs::File::open(&path).await {
                    *f = nf;
                }
            }
            if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                let mut chunk = Vec::new();
                if f.read_to_end(&mut chunk).await.is_ok() && !chunk.is_empty() {
                    offset += chunk.len() as u64;
                    pending.extend_from_slice(&chunk);
                    grew = true;
                }
            }
        }
        if let Some(i) = pending.iter().rposition(|&b| b == b'\n') {
            let rest = pending.split_off(i + 1);
            let lines = std::mem::replace(&mut pending, rest);
            let mut out = Vec::new();
            let more = render_into(&mut w, &lines, None, &mut out);
            if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                return;
            }
            if !more {
                return;
            }
        }
        if !grew {
            let running = matches!(
                runtime
                    .container_status(&container_id)
                    .await
                    .map(|s| s.state),
                Ok(ContainerState::Running | ContainerState::Created)
            );
            if running {
                ended_polls = 0;
            } else {
                // One more read after the end, for the last records.
                ended_polls += 1;
                if ended_polls > 2 {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
2026-11-22T01:00:00.000000001Z stdout F one
2026-11-22T01:00:01.000000000Z stderr F err one
2026-11-22T01:00:02.000000000Z stdout P tw
2026-11-22T01:00:02.500000000Z stdout F o
2026-11-22T01:00:03.000000000Z stdout F three
";

    fn q(pairs: &[(&str, &str)]) -> LogOptions {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let now = OffsetDateTime::parse("2026-11-22T01:00:04Z", &Rfc3339).unwrap();
        LogOptions::from_query(&v, now).unwrap()
    }

    #[test]
    fn joins_partials_and_interleaves_streams() {
        let out = render(LOG.as_bytes(), &q(&[]));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "one\nerr one\ntwo\nthree\n"
        );
    }

    #[test]
    fn tail_counts_whole_lines() {
        let out = render(LOG.as_bytes(), &q(&[("tailLines", "2")]));
        assert_eq!(String::from_utf8(out).unwrap(), "two\nthree\n");
        let out = render(LOG.as_bytes(), &q(&[("tailLines", "0")]));
        assert!(out.is_empty());
        let out = render(LOG.as_bytes(), &q(&[("tailLines", "100")]));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 4);
    }

    #[test]
    fn timestamps_prefix_each_line_once() {
        let out = render(
            LOG.as_bytes(),
            &q(&[("timestamps", "true"), ("tailLines", "2")]),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-22T01:00:02.000000000Z two\n2026-11-22T01:00:03.000000000Z three\n"
        );
    }

    #[test]
    fn since_and_limit() {
        let out = render(LOG.as_bytes(), &q(&[("sinceSeconds", "2")]));
        assert_eq!(String::from_utf8(out).unwrap(), "two\nthree\n");
        let out = render(LOG.as_bytes(), &q(&[("sinceTime", "2026-11-22T01:00:03Z")]));
        assert_eq!(String::from_utf8(out).unwrap(), "three\n");
        let out = render(LOG.as_bytes(), &q(&[("limitBytes", "6")]));
        assert_eq!(String::from_utf8(out).unwrap(), "one\ner");
    }

    #[test]
    fn bad_parameters_are_named() {
        let bad = |k: &str, v: &str| {
            LogOptions::from_query(&[(k.to_string(), v.to_string())], OffsetDateTime::now_utc())
                .unwrap_err()
        };
        assert!(bad("tailLines", "x").contains("tailLines"));
        assert!(bad("sinceSeconds", "0").contains("sinceSeconds"));
        assert!(bad("sinceTime", "yesterday").contains("sinceTime"));
        assert!(bad("limitBytes", "-1").contains("limitBytes"));
    }
}
