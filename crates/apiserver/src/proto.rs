//! Kubernetes protobuf request bodies (the `k8s\0` envelope around `runtime.Unknown`) for the few
//! kinds kubectl's typed clients send as protobuf (ConfigMap, Secret, Namespace,
//! SelfSubjectReview), decoded to JSON. Other kinds get 415 and clients fall back to JSON.

use serde_json::{Map, Value, json};

/// How one protobuf field maps to JSON.
#[derive(Clone, Copy)]
enum F {
    Str,
    Int,
    Bool,
    Time,
    MapStr,
    MapBytes,
    RepStr,
    Msg(&'static [(u32, &'static str, F)]),
    RepMsg(&'static [(u32, &'static str, F)]),
}

const OWNER_REF: &[(u32, &str, F)] = &[
    (1, "kind", F::Str),
    (3, "name", F::Str),
    (4, "uid", F::Str),
    (5, "apiVersion", F::Str),
    (6, "controller", F::Bool),
    (7, "blockOwnerDeletion", F::Bool),
];

const OBJECT_META: &[(u32, &str, F)] = &[
    (1, "name", F::Str),
    (2, "generateName", F::Str),
    (3, "namespace", F::Str),
    (5, "uid", F::Str),
    (6, "resourceVersion", F::Str),
    (7, "generation", F::Int),
    (8, "creationTimestamp", F::Time),
    (9, "deletionTimestamp", F::Time),
    (10, "deletionGracePeriodSeconds", F::Int),
    (11, "labels", F::MapStr),
    (12, "annotations", F::MapStr),
    (13, "ownerReferences", F::RepMsg(OWNER_REF)),
    (14, "finalizers", F::RepStr),
];

const CONFIG_MAP: &[(u32, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "data", F::MapStr),
    (3, "binaryData", F::MapBytes),
    (4, "immutable", F::Bool),
];

const SECRET: &[(u32, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "data", F::MapBytes),
    (3, "type", F::Str),
    (4, "stringData", F::MapStr),
    (5, "immutable", F::Bool),
];

const NAMESPACE: &[(u32, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(&[(1, "finalizers", F::RepStr)])),
    (3, "status", F::Msg(&[(1, "phase", F::Str)])),
];

const SELF_SUBJECT_REVIEW: &[(u32, &str, F)] = &[(1, "metadata", F::Msg(OBJECT_META))];

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    /// (field number, wire type, length-delimited payload or varint value)
    fn field(&mut self) -> Option<(u32, Wire<'a>)> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let tag = self.varint()?;
        let num = u32::try_from(tag >> 3).ok()?;
        let w = match tag & 7 {
            0 => Wire::Varint(self.varint()?),
            2 => Wire::Len(self.bytes()?),
            1 => {
                self.pos += 8;
                Wire::Skip
            }
            5 => {
                self.pos += 4;
                Wire::Skip
            }
            _ => return None,
        };
        Some((num, w))
    }
}

enum Wire<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Skip,
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in a string field".to_string())
}

fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let mut r = Reader { buf: b, pos: 0 };
    let (mut k, mut v) = (String::new(), json!(""));
    while let Some((num, w)) = r.field() {
        match (num, w) {
            (1, Wire::Len(x)) => k = utf8(x)?,
            (2, Wire::Len(x)) if bytes_value => v = json!(skiff_api::meta::base64_encode(x)),
            (2, Wire::Len(x)) => v = json!(utf8(x)?),
            _ => {}
        }
    }
    Ok((k, v))
}

fn time_of(b: &[u8]) -> Value {
    let mut r = Reader { buf: b, pos: 0 };
    let mut secs: i64 = 0;
    while let Some((num, w)) = r.field() {
        if let (1, Wire::Varint(v)) = (num, w) {
            secs = v as i64;
        }
    }
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) if secs != 0 => json!(skiff_api::meta::format_time(t)),
        _ => Value::Null,
    }
}

fn message(b: &[u8], schema: &[(u32, &str, F)]) -> Result<Value, String> {
    let mut out = Map::new();
    let mut r = Reader { buf: b, pos: 0 };
    while r.pos < r.buf.len() {
        let Some((num, w)) = r.field() else {
            return Err("malformed protobuf message".into());
        };
        let Some((_, name, kind)) = schema.iter().find(|(n, _, _)| *n == num) else {
            continue;
        };
        let name = name.to_string();
        match (kind, w) {
            (F::Str, Wire::Len(x)) => {
                out.insert(name, json!(utf8(x)?));
            }
            (F::Int, Wire::Varint(v)) => {
                out.insert(name, json!(v as i64));
            }
            (F::Bool, Wire::Varint(v)) => {
                out.insert(name, json!(v != 0));
            }
            (F::Time, Wire::Len(x)) => {
                out.insert(name, time_of(x));
            }
            (F::MapStr | F::MapBytes, Wire::Len(x)) => {
                let (k, v) = map_entry(x, matches!(kind, F::MapBytes))?;
                let e = out.entry(name).or_insert_with(|| json!({}));
                if let Some(m) = e.as_object_mut() {
                    m.insert(k, v);
                }
            }
            (F::RepStr, Wire::Len(x)) => {
                let e = out.entry(name).or_insert_with(|| json!([]));
                if let Some(a) = e.as_array_mut() {
                    a.push(json!(utf8(x)?));
                }
            }
            (F::Msg(s), Wire::Len(x)) => {
                out.insert(name, message(x, s)?);
            }
            (F::RepMsg(s), Wire::Len(x)) => {
                let v = message(x, s)?;
                let e = out.entry(name).or_insert_with(|| json!([]));
                if let Some(a) = e.as_array_mut() {
                    a.push(v);
                }
            }
            _ => return Err(format!("unexpected wire type for field {name}")),
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body. `Ok(None)`: the kind is not one this server decodes.
pub fn decode(body: &[u8]) -> Result<Option<Value>, String> {
    let inner = body
        .strip_prefix(b"k8s\x00")
        .ok_or_else(|| "protobuf body lacks the k8s envelope".to_string())?;
    let mut r = Reader { buf: inner, pos: 0 };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while let Some((num, w)) = r.field() {
        match (num, w) {
            (1, Wire::Len(tm)) => {
                let mut t = Reader { buf: tm, pos: 0 };
                while let Some((n, w)) = t.field() {
                    match (n, w) {
                        (1, Wire::Len(x)) => api_version = utf8(x)?,
                        (2, Wire::Len(x)) => kind = utf8(x)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(x)) => raw = x,
            _ => {}
        }
    }
    let schema = match (api_version.as_str(), kind.as_str()) {
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "Namespace") => NAMESPACE,
        ("authentication.k8s.io/v1" | "authentication.k8s.io/v1beta1", "SelfSubjectReview") => {
            SELF_SUBJECT_REVIEW
        }
        _ => return Ok(None),
    };
    let mut obj = message(raw, schema)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(Some(obj))
}

/// A minimal OpenAPI v2 document in gnostic's protobuf form (swagger, info, empty paths and
/// definitions): clients that insist on v2 get a valid document and fall back to their
/// compiled-in type information.
pub fn openapi_v2_stub() -> Vec<u8> {
    fn field(num: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(num << 3) | 2];
        let mut n = payload.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                v.push(b);
                break;
            }
            v.push(b | 0x80);
        }
        v.extend_from_slice(payload);
        v
    }
    let mut info = field(1, b"Kubernetes");
    info.extend(field(2, b"v1.35.0+skiff"));
    let mut doc = field(1, b"2.0");
    doc.extend(field(2, &info));
    doc.extend(field(8, &[]));
    doc.extend(field(9, &[]));
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(num: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((num << 3) | 2) as u8, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn configmap_from_protobuf() {
        let mut meta = len_field(1, b"c1");
        meta.extend(len_field(
            11,
            &[len_field(1, b"app"), len_field(2, b"web")].concat(),
        ));
        let mut cm = len_field(1, &meta);
        cm.extend(len_field(
            2,
            &[len_field(1, b"a"), len_field(2, b"1")].concat(),
        ));
        cm.extend(len_field(
            3,
            &[len_field(1, b"bin"), len_field(2, b"\x00\x01")].concat(),
        ));
        let tm = [len_field(1, b"v1"), len_field(2, b"ConfigMap")].concat();
        let mut unknown = len_field(1, &tm);
        unknown.extend(len_field(2, &cm));
        let body = [b"k8s\x00".to_vec(), unknown].concat();
        let obj = decode(&body).unwrap().unwrap();
        assert_eq!(obj["kind"], "ConfigMap");
        assert_eq!(obj["metadata"]["name"], "c1");
        assert_eq!(obj["metadata"]["labels"]["app"], "web");
        assert_eq!(obj["data"]["a"], "1");
        assert_eq!(obj["binaryData"]["bin"], "AAE=");
    }

    #[test]
    fn unknown_kinds_are_not_decoded() {
        let tm = [len_field(1, b"apps/v1"), len_field(2, b"Deployment")].concat();
        let body = [b"k8s\x00".to_vec(), len_field(1, &tm)].concat();
        assert_eq!(decode(&body).unwrap(), None);
        assert!(decode(b"nope").is_err());
    }
}
