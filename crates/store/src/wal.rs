//! The redb backend's write-ahead log: each group-committed batch is appended (one sequential
//! write + one fdatasync) before it is acknowledged; redb itself is then committed without an
//! fsync and made durable by periodic checkpoints, after which the log starts over at offset 0.
//!
//! Record: magic u32 | payload length u32 | crc32(payload) u32 | payload, where payload is
//! store id u64 | first revision i64 | event count u32 | (event length u32 | event)*.
//! Replay accepts records from offset 0 while they are intact, belong to this store and continue
//! the revision sequence exactly; anything else (a torn tail, zeros, records of an older cycle)
//! ends the log. The file is zero-filled up front and reused, so appends do not change its size.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::codec;
use crate::{Event, Revision, StoreError};

const MAGIC: u32 = 0x534b_5746; // "SKWF"
const HEADER: usize = 12;
/// The log is zero-filled to this size when opened (appends beyond it grow the file).
pub(crate) const PREFILL: u64 = 8 << 20;

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// An open write-ahead log.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    offset: u64,
    store_id: u64,
    buf: Vec<u8>,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io(std::io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    ))
}

impl Wal {
    /// Opens (or creates and zero-fills) the log of the store with `store_id`.
    pub(crate) fn open(path: &Path, store_id: u64) -> Result<Wal, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(path, "cannot open write-ahead log", e))?;
        let len = file
            .metadata()
            .map_err(|e| io_err(path, "cannot stat write-ahead log", e))?
            .len();
        if len < PREFILL {
            // Zero-fill so that later appends overwrite allocated blocks and an fdatasync does
            // not also have to commit file-size changes.
            let zeros = vec![0u8; 1 << 20];
            let mut at = len;
            while at < PREFILL {
                let n = usize::try_from((PREFILL - at).min(zeros.len() as u64)).unwrap_or(0);
                file.write_all_at(&zeros[..n], at)
                    .map_err(|e| io_err(path, "cannot extend write-ahead log", e))?;
                at += n as u64;
            }
            file.sync_all()
                .map_err(|e| io_err(path, "cannot sync write-ahead log", e))?;
        }
        Ok(Wal {
            file,
            path: path.to_path_buf(),
            offset: 0,
            store_id,
            buf: Vec::new(),
        })
    }

    /// The events logged after `durable` (the revision redb holds durably), in order.
    pub(crate) fn replay(&self, durable: Revision) -> Result<Vec<Event>, StoreError> {
        let len = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "cannot stat write-ahead log", e))?
            .len();
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.file
            .read_exact_at(&mut data, 0)
            .map_err(|e| io_err(&self.path, "cannot read write-ahead log", e))?;
        let mut out = Vec::new();
        let mut next = durable + 1;
        let mut at = 0usize;
        while let Some(rec) = parse_record(&data[at..], self.store_id) {
            let (first, events, len) = rec;
            if first != next {
                break;
            }
            next += events.len() as i64;
            out.extend(events);
            at += len;
        }
        Ok(out)
    }

    /// Appends one batch (revisions contiguous from its first event) and makes it durable.
    pub(crate) fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
        let Some(first) = events.first().map(Event::revision) else {
            return Ok(());
        };
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(&[0u8; HEADER]);
        buf.extend_from_slice(&self.store_id.to_le_bytes());
        buf.extend_from_slice(&first.to_le_bytes());
        buf.extend_from_slice(
            &u32::try_from(events.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for ev in events {
            let enc = codec::encode_event(ev);
            buf.extend_from_slice(&u32::try_from(enc.len()).unwrap_or(u32::MAX).to_le_bytes());
            buf.extend_from_slice(&enc);
        }
        let payload_len = u32::try_from(buf.len() - HEADER).unwrap_or(u32::MAX);
        let crc = crc32(&buf[HEADER..]);
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[4..8].copy_from_slice(&payload_len.to_le_bytes());
        buf[8..12].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(buf, self.offset)
            .map_err(|e| io_err(&self.path, "cannot append to write-ahead log", e))?;
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "cannot sync write-ahead log", e))?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Everything logged is now durable in redb: start the log over.
    pub(crate) fn rewind(&mut self) {
        self.offset = 0;
    }

    /// Bytes logged since the last rewind.
    pub(crate) fn len(&self) -> u64 {
        self.offset
    }
}

/// One intact record of this store at the start of `data`: (first revision, events, length).
fn parse_record(data: &[u8], store_id: u64) -> Option<(Revision, Vec<Event>, usize)> {
    let u32_at = |d: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(d.get(i..i + 4)?.try_into().ok()?))
    };
    let u64_at = |d: &[u8], i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(d.get(i..i + 8)?.try_into().ok()?))
    };
    if u32_at(data, 0)? != MAGIC {
        return None;
    }
    let len = u32_at(data, 4)? as usize;
    let payload = data.get(HEADER..HEADER + len)?;
    if crc32(payload) != u32_at(data, 8)? {
        return None;
    }
    if u64_at(payload, 0)? != store_id {
        return None;
    }
    let first = u64_at(payload, 8)? as i64;
    let count = u32_at(payload, 16)? as usize;
    let mut at = 20;
    let mut events = Vec::with_capacity(count.min(4096));
    for i in 0..count {
        let n = u32_at(payload, at)? as usize;
        let raw = payload.get(at + 4..at + 4 + n)?;
        events.push(codec::decode_event(first + i as i64, raw).ok()?);
        at += 4 + n;
    }
    Some((first, events, HEADER + len))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::KeyValue;

    fn put(rev: Revision) -> Event {
        Event::Put {
            kv: KeyValue {
                key: format!("/k/{rev}"),
                value: Bytes::from(vec![b'x'; 100]),
                create_revision: rev,
                mod_revision: rev,
            },
            prev: None,
        }
    }

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn replay_stops_at_gaps_torn_tails_and_old_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let mut wal = Wal::open(&path, 7).unwrap();
        wal.append(&[put(1), put(2)]).unwrap();
        wal.append(&[put(3)]).unwrap();
        let revs = |evs: Vec<Event>| evs.iter().map(Event::revision).collect::<Vec<_>>();
        assert_eq!(revs(wal.replay(0).unwrap()), vec![1, 2, 3]);
        // redb already holds 2 durably: records before that do not continue the sequence
        assert_eq!(revs(wal.replay(2).unwrap()), Vec::<i64>::new());
        // another store's log is ignored
        assert!(Wal::open(&path, 8).unwrap().replay(0).unwrap().is_empty());

        // a new cycle after a checkpoint at 3 overwrites from offset 0; the old tail is ignored
        wal.rewind();
        wal.append(&[put(4)]).unwrap();
        assert_eq!(revs(wal.replay(3).unwrap()), vec![4]);

        // a torn record ends the log
        let end = wal.len();
        wal.append(&[put(5), put(6)]).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 3], end + 20).unwrap();
        assert_eq!(revs(wal.replay(3).unwrap()), vec![4]);
        assert!(std::fs::metadata(&path).unwrap().len() >= PREFILL);
    }
}
