//! CRI container log format: `<RFC3339Nano time> stdout|stderr F|P <line>`, and timestamps.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest line written as one record; longer lines are split into `P` records.
pub const MAX_LINE: usize = 16 * 1024;

/// Formats a time as RFC 3339 in UTC with nanoseconds (`2026-11-22T01:02:03.000000004Z`).
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        d.subsec_nanos()
    )
}

/// Splits one stream's output into CRI log records.
#[derive(Debug)]
pub struct LineSplitter {
    stream: &'static str,
    partial: Vec<u8>,
}

impl LineSplitter {
    /// A splitter for `stdout` or `stderr`.
    pub fn new(stream: &'static str) -> Self {
        Self {
            stream,
            partial: Vec::new(),
        }
    }

    /// Whether this splitter is for stdout.
    pub fn is_stdout(&self) -> bool {
        self.stream == "stdout"
    }

    /// Feeds bytes; writes every complete record to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut dyn Write) -> std::io::Result<()> {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            self.emit(true, out)?;
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() >= MAX_LINE {
            let tail = self.partial.split_off(MAX_LINE);
            self.emit(false, out)?;
            self.partial = tail;
        }
        Ok(())
    }

    /// Writes what is left at end of stream as a full record.
    pub fn finish(&mut self, out: &mut dyn Write) -> std::io::Result<()> {
        if !self.partial.is_empty() {
            self.emit(true, out)?;
        }
        Ok(())
    }

    fn emit(&mut self, full: bool, out: &mut dyn Write) -> std::io::Result<()> {
        let mut rec = format!(
            "{} {} {} ",
            rfc3339_nano(SystemTime::now()),
            self.stream,
            if full { "F" } else { "P" }
        )
        .into_bytes();
        rec.append(&mut self.partial);
        rec.push(b'\n');
        out.write_all(&rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_rfc3339_nano() {
        assert_eq!(rfc3339_nano(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 5); // 2024-02-29T23:59:59
        assert_eq!(rfc3339_nano(t), "2024-02-29T23:59:59.000000005Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_nano(t), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn splits_lines_and_partials() {
        let mut s = LineSplitter::new("stdout");
        let mut out = Vec::new();
        s.feed(b"hello\nwor", &mut out).unwrap();
        s.feed(b"ld\n", &mut out).unwrap();
        s.feed(&vec![b'x'; MAX_LINE + 3], &mut out).unwrap();
        s.finish(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let recs: Vec<(&str, &str, &str)> = text
            .lines()
            .map(|l| {
                let mut it = l.splitn(4, ' ');
                let ts = it.next().unwrap();
                assert!(ts.ends_with('Z') && ts.len() == 30, "{ts}");
                (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
            })
            .collect();
        assert_eq!(recs[0], ("stdout", "F", "hello"));
        assert_eq!(recs[1], ("stdout", "F", "world"));
        assert_eq!(recs[2].1, "P");
        assert_eq!(recs[2].2.len(), MAX_LINE);
        assert_eq!(recs[3], ("stdout", "F", "xxx"));
        assert_eq!(recs.len(), 4);
    }
}
