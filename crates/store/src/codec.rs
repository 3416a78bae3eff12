//! The on-disk encoding of current values and history events in the redb backend:
//! little-endian integers and length-prefixed byte strings, decoded defensively (a damaged record
//! is an error, never a panic).

use bytes::{BufMut, Bytes, BytesMut};

use crate::{Event, KeyValue, Revision};

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

/// A decoding failure: the record is damaged.
#[derive(Debug)]
pub(crate) struct DecodeError(pub(crate) &'static str);

/// Encodes a current value (the key is the table key): create rev, mod rev, value.
pub(crate) fn encode_value(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

pub(crate) fn decode_value(key: &str, raw: &[u8]) -> Result<KeyValue, DecodeError> {
    let mut r = Reader(raw);
    let create_revision = r.i64()?;
    let mod_revision = r.i64()?;
    Ok(KeyValue {
        key: key.to_string(),
        value: Bytes::copy_from_slice(r.0),
        create_revision,
        mod_revision,
    })
}

fn put_kv_body(out: &mut BytesMut, kv: &KeyValue) {
    out.put_i64_le(kv.create_revision);
    out.put_i64_le(kv.mod_revision);
    out.put_u32_le(len32(kv.value.len()));
    out.put_slice(&kv.value);
}

fn len32(n: usize) -> u32 {
    // Values are bounded far below 4 GiB by the API layer; saturate rather than wrap.
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Encodes a history event (the revision is the table key).
pub(crate) fn encode_event(ev: &Event) -> Vec<u8> {
    let mut out = BytesMut::new();
    match ev {
        Event::Put { kv, prev } => {
            out.put_u8(TAG_PUT);
            out.put_u32_le(len32(kv.key.len()));
            out.put_slice(kv.key.as_bytes());
            put_kv_body(&mut out, kv);
            match prev {
                Some(p) => {
                    out.put_u8(1);
                    put_kv_body(&mut out, p);
                }
                None => out.put_u8(0),
            }
        }
        Event::Delete { key, prev, .. } => {
            out.put_u8(TAG_DELETE);
            out.put_u32_le(len32(key.len()));
            out.put_slice(key.as_bytes());
            put_kv_body(&mut out, prev);
        }
    }
    out.to_vec()
}

/// The key of an encoded event, without decoding values (for prefix filtering).
pub(crate) fn event_key(raw: &[u8]) -> Result<&str, DecodeError> {
    let mut r = Reader(raw);
    r.u8()?;
    r.str()
}

pub(crate) fn decode_event(revision: Revision, raw: &[u8]) -> Result<Event, DecodeError> {
    let mut r = Reader(raw);
    let tag = r.u8()?;
    let key = r.str()?.to_string();
    match tag {
        TAG_PUT => {
            let kv = r.kv(&key)?;
            if kv.mod_revision != revision {
                return Err(DecodeError("put event revision does not match its slot"));
            }
            let prev = match r.u8()? {
                0 => None,
                1 => Some(r.kv(&key)?),
                _ => return Err(DecodeError("bad previous-value flag")),
            };
            Ok(Event::Put { kv, prev })
        }
        TAG_DELETE => {
            let prev = r.kv(&key)?;
            Ok(Event::Delete {
                key,
                revision,
                prev,
            })
        }
        _ => Err(DecodeError("unknown event tag")),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("record is truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError("key is not UTF-8"))
    }
    fn kv(&mut self, key: &str) -> Result<KeyValue, DecodeError> {
        let create_revision = self.i64()?;
        let mod_revision = self.i64()?;
        let n = self.u32()? as usize;
        let value = Bytes::copy_from_slice(self.take(n)?);
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(v: &str, c: Revision, m: Revision) -> KeyValue {
        KeyValue {
            key: "/k".into(),
            value: Bytes::from(v.to_string()),
            create_revision: c,
            mod_revision: m,
        }
    }

    #[test]
    fn round_trips() {
        let v = kv("hello", 3, 7);
        assert_eq!(decode_value("/k", &encode_value(&v)).unwrap(), v);
        let put = Event::Put {
            kv: kv("b", 3, 9),
            prev: Some(kv("a", 3, 7)),
        };
        let raw = encode_event(&put);
        assert_eq!(event_key(&raw).unwrap(), "/k");
        assert_eq!(decode_event(9, &raw).unwrap(), put);
        let create = Event::Put {
            kv: kv("b", 9, 9),
            prev: None,
        };
        assert_eq!(decode_event(9, &encode_event(&create)).unwrap(), create);
        let del = Event::Delete {
            key: "/k".into(),
            revision: 10,
            prev: kv("b", 3, 9),
        };
        assert_eq!(decode_event(10, &encode_event(&del)).unwrap(), del);
    }

    #[test]
    fn damaged_records_are_errors() {
        let raw = encode_event(&Event::Put {
            kv: kv("value", 1, 2),
            prev: None,
        });
        for cut in 0..raw.len() {
            assert!(decode_event(2, &raw[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_event(3, &raw).is_err(), "revision mismatch");
        assert!(decode_value("/k", &[1, 2, 3]).is_err());
        let mut bad = raw.clone();
        bad[0] = 9;
        assert!(decode_event(2, &bad).is_err());
    }
}
