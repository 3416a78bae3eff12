//! Kubernetes protobuf request bodies, decoded to the JSON the rest of the server works on.
//!
//! kubectl's typed clients (and client-go programs) send create/update bodies as
//! `application/vnd.kubernetes.protobuf`: the magic `k8s\0`, then a `runtime.Unknown`
//! (`typeMeta{apiVersion, kind}`, `raw` = the encoded object, `contentEncoding`, `contentType`).
//! Every kind of the resource table (and the kinds its subresources accept: Scale, Binding,
//! Eviction, TokenRequest) is decoded by one generic walker driven by the generated field table
//! in `proto_schema.rs` (tag → JSON name, type, repeated/map/inline). The table is produced by
//! `examples/gen_proto_schema.rs` (run it with `cargo run -p skiff-apiserver --example
//! gen_proto_schema`) from k8s-pb's prost code (field numbers and types) and the
//! k8s-openapi schemas (JSON names); regenerate it when either crate is upgraded.
//!
//! The JSON follows what Go's encoder would have produced for the same object:
//! - apimachinery types with their own JSON form: `Time` (RFC 3339, seconds, `Z`), `MicroTime`
//!   (6 fractional digits), `Duration` (Go's `1h2m3s`), `Quantity` (its string), `IntOrString`
//!   (number or string), `RawExtension`/`FieldsV1`/CRD `JSON` (the embedded JSON bytes), the CRD
//!   `JSONSchemaPropsOr{Bool,Array,StringArray}` unions; `bytes` become base64;
//! - Go embedded structs (`Probe.handler`, `Volume.volumeSource`, ...) are inlined;
//! - Go writes every non-pointer field in protobuf, but `omitempty` drops empty ones from JSON.
//!   Protobuf cannot tell a pointer from a value, so: singular empty strings/bytes and an empty
//!   `RawExtension` are dropped, a zero `Time` is `null` (as Go writes it), present numbers and booleans are kept (a pointer
//!   `replicas: 0` must survive), empty messages are kept (`emptyDir: {}`), and the common
//!   non-pointer numbers/booleans that Go's JSON omits or kube-apiserver's defaulting treats as
//!   unset when zero (`stdin`, `hostPort`, `minReadySeconds`, probe timings, a Service port's
//!   `targetPort`, ...) are dropped when zero (`ZERO_IS_UNSET`), so that defaulting and the
//!   stored object match the JSON form;
//! - unknown fields are skipped (newer clients); truncated or invalid input is an error (400).
//!
//! Responses stay JSON: a client that accepts only protobuf gets 406 (`http_util::negotiate`).

use serde_json::{Map, Value, json};

use crate::proto_schema::{MESSAGES, ROOTS};

/// One message of the generated table.
pub(crate) struct M {
    /// Full name (`io.k8s.api.core.v1.PodSpec`).
    pub name: &'static str,
    /// Fields sorted by tag.
    pub fields: &'static [F],
}

/// One field of a message.
pub(crate) struct F {
    pub tag: u32,
    /// JSON name (empty for `C::Inline`).
    pub json: &'static str,
    pub ty: T,
    pub card: C,
}

/// The type of a field (of a map's value for `C::Map`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum T {
    Str,
    Bytes,
    I32,
    I64,
    Bool,
    F64,
    /// A message, by index into `MESSAGES`.
    Msg(usize),
    Time,
    MicroTime,
    /// `metav1.Duration`: no served kind has one today; kept so a regenerated table compiles.
    #[allow(dead_code)]
    Duration,
    Quantity,
    IntOrString,
    /// `RawExtension`, `FieldsV1`, CRD `JSON`: raw JSON bytes in field 1.
    Json,
    /// `ExtraValue` (a Go `[]string` wrapped in a message): a JSON array of strings.
    StrList,
    /// CRD `JSONSchemaPropsOrBool` (index of `JSONSchemaProps`).
    OrBool(usize),
    /// CRD `JSONSchemaPropsOrArray`.
    OrArray(usize),
    /// CRD `JSONSchemaPropsOrStringArray`.
    OrStringArray(usize),
}

/// Cardinality of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum C {
    One,
    Rep,
    /// `map<string, T>` (repeated entries with key 1, value 2).
    Map,
    /// A Go embedded struct: its fields belong to the parent JSON object.
    Inline,
}

/// Non-pointer Go numbers and booleans whose zero value is not an explicit choice, dropped when
/// zero/false: Go writes them to protobuf always, but its JSON encoder omits them (`omitempty`)
/// and kube-apiserver's defaulting treats a zero as unset (probe timings, a Service port's
/// `targetPort`). A fact table of the Go types for the fields kubectl's `create` commands and
/// typed clients fill most; other zeros are kept, as a pointer's `0`/`false` must be
/// (`replicas: 0`, `automountServiceAccountToken: false`). (message, JSON field)
const ZERO_IS_UNSET: &[(&str, &str)] = &[
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "generation",
    ),
    ("io.k8s.api.core.v1.Probe", "initialDelaySeconds"),
    ("io.k8s.api.core.v1.Probe", "timeoutSeconds"),
    ("io.k8s.api.core.v1.Probe", "periodSeconds"),
    ("io.k8s.api.core.v1.Probe", "successThreshold"),
    ("io.k8s.api.core.v1.Probe", "failureThreshold"),
    ("io.k8s.api.core.v1.Container", "stdin"),
    ("io.k8s.api.core.v1.Container", "stdinOnce"),
    ("io.k8s.api.core.v1.Container", "tty"),
    ("io.k8s.api.core.v1.EphemeralContainerCommon", "stdin"),
    ("io.k8s.api.core.v1.EphemeralContainerCommon", "stdinOnce"),
    ("io.k8s.api.core.v1.EphemeralContainerCommon", "tty"),
    ("io.k8s.api.core.v1.ContainerPort", "hostPort"),
    ("io.k8s.api.core.v1.VolumeMount", "readOnly"),
    ("io.k8s.api.core.v1.PodSpec", "hostNetwork"),
    ("io.k8s.api.core.v1.PodSpec", "hostPID"),
    ("io.k8s.api.core.v1.PodSpec", "hostIPC"),
    ("io.k8s.api.core.v1.ServiceSpec", "healthCheckNodePort"),
    ("io.k8s.api.core.v1.ServiceSpec", "publishNotReadyAddresses"),
    ("io.k8s.api.core.v1.ServicePort", "nodePort"),
    ("io.k8s.api.core.v1.ServicePort", "targetPort"),
    ("io.k8s.api.apps.v1.DeploymentSpec", "minReadySeconds"),
    ("io.k8s.api.apps.v1.DeploymentSpec", "paused"),
    ("io.k8s.api.apps.v1.ReplicaSetSpec", "minReadySeconds"),
    ("io.k8s.api.apps.v1.DaemonSetSpec", "minReadySeconds"),
    ("io.k8s.api.apps.v1.StatefulSetSpec", "minReadySeconds"),
    ("io.k8s.api.scheduling.v1.PriorityClass", "globalDefault"),
];

/// Deeper nesting than this is refused (no Kubernetes object comes close; protects the stack).
const MAX_DEPTH: usize = 64;

/// Why a protobuf body could not be decoded (answered with 400 BadRequest).
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The body does not start with the `k8s\0` magic.
    #[error("protobuf body lacks the k8s envelope")]
    Envelope,
    /// The envelope names a content encoding (e.g. gzip) skiff does not decode.
    #[error("unsupported content encoding {0:?} in the protobuf envelope")]
    ContentEncoding(String),
    /// The bytes end inside a field, or a varint/length is invalid.
    #[error("truncated or malformed protobuf data in {0}")]
    Malformed(&'static str),
    /// A field arrived with a wire type its schema does not allow.
    #[error("field {field} of {message} has wire type {wire}, which does not match its type")]
    WireType {
        /// Message name.
        message: &'static str,
        /// JSON field name.
        field: &'static str,
        /// The wire type seen.
        wire: u8,
    },
    /// A string field is not UTF-8.
    #[error("field {0} is not valid UTF-8")]
    Utf8(&'static str),
    /// An embedded JSON field (`RawExtension`, `FieldsV1`) is not JSON.
    #[error("field {field} does not hold valid JSON: {source}")]
    Json {
        /// JSON field name.
        field: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A value is out of range (a time, a non-finite double).
    #[error("field {0} has an out-of-range value")]
    Range(&'static str),
    /// Messages nested deeper than any Kubernetes object.
    #[error("protobuf message nested too deeply")]
    TooDeep,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

#[derive(Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32,
    Len(&'a [u8]),
}

impl Wire<'_> {
    fn code(&self) -> u8 {
        match self {
            Wire::Varint(_) => 0,
            Wire::Fixed64(_) => 1,
            Wire::Len(_) => 2,
            Wire::Fixed32 => 5,
        }
    }
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn varint(&mut self, ctx: &'static str) -> Result<u64, ProtoError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or(ProtoError::Malformed(ctx))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::Malformed(ctx))
    }
    fn take(&mut self, n: usize, ctx: &'static str) -> Result<&'a [u8], ProtoError> {
        let end = self.pos.checked_add(n).ok_or(ProtoError::Malformed(ctx))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(ProtoError::Malformed(ctx))?;
        self.pos = end;
        Ok(s)
    }
    /// The next field: (number, value).
    fn field(&mut self, ctx: &'static str) -> Result<(u32, Wire<'a>), ProtoError> {
        let tag = self.varint(ctx)?;
        let num = u32::try_from(tag >> 3).map_err(|_| ProtoError::Malformed(ctx))?;
        if num == 0 {
            return Err(ProtoError::Malformed(ctx));
        }
        let w = match tag & 7 {
            0 => Wire::Varint(self.varint(ctx)?),
            1 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(self.take(8, ctx)?);
                Wire::Fixed64(b)
            }
            2 => {
                let n =
                    usize::try_from(self.varint(ctx)?).map_err(|_| ProtoError::Malformed(ctx))?;
                Wire::Len(self.take(n, ctx)?)
            }
            5 => {
                self.take(4, ctx)?;
                Wire::Fixed32
            }
            _ => return Err(ProtoError::Malformed(ctx)),
        };
        Ok((num, w))
    }
}

fn utf8(b: &[u8], field: &'static str) -> Result<String, ProtoError> {
    std::str::from_utf8(b)
        .map(str::to_string)
        .map_err(|_| ProtoError::Utf8(field))
}

/// Go's `time.Duration.String()` of a number of nanoseconds.
fn go_duration(d: i64) -> String {
    if d == 0 {
        return "0s".into();
    }
    let neg = d < 0;
    let u = d.unsigned_abs();
    let frac = |v: u64, digits: u32| -> String {
        let p = 10u64.pow(digits);
        let (w, f) = (v / p, v % p);
        if f == 0 {
            w.to_string()
        } else {
            let s = format!("{f:0width$}", width = digits as usize);
            format!("{w}.{}", s.trim_end_matches('0'))
        }
    };
    let body = if u < 1_000 {
        format!("{u}ns")
    } else if u < 1_000_000 {
        format!("{}µs", frac(u, 3))
    } else if u < 1_000_000_000 {
        format!("{}ms", frac(u, 6))
    } else {
        let secs_total = u / 1_000_000_000;
        let nanos = u % 1_000_000_000;
        let (h, m, s) = (secs_total / 3600, (secs_total / 60) % 60, secs_total % 60);
        let mut out = String::new();
        if h > 0 {
            out.push_str(&format!("{h}h"));
        }
        if h > 0 || m > 0 {
            out.push_str(&format!("{m}m"));
        }
        out.push_str(&frac(s * 1_000_000_000 + nanos, 9));
        out.push('s');
        out
    };
    if neg { format!("-{body}") } else { body }
}

fn time_value(b: &[u8], micro: bool, field: &'static str) -> Result<Option<Value>, ProtoError> {
    if b.is_empty() {
        // Go's zero time, written by Go as an empty message; its JSON is `null` (what
        // kube-apiserver shows as a template's `creationTimestamp: null`).
        return Ok(Some(Value::Null));
    }
    let (mut secs, mut nanos) = (0i64, 0i64);
    let mut r = Reader::new(b);
    while !r.done() {
        match r.field(field)? {
            (1, Wire::Varint(v)) => secs = v as i64,
            (2, Wire::Varint(v)) => nanos = i64::from(v as i32),
            _ => {}
        }
    }
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| ProtoError::Range(field))?;
    let base = skiff_api::meta::format_time(t);
    if !micro {
        return Ok(Some(json!(base)));
    }
    let micros = nanos.clamp(0, 999_999_999) / 1000;
    let stem = base.trim_end_matches('Z');
    Ok(Some(json!(format!("{stem}.{micros:06}Z"))))
}

/// Field 1 (string/bytes) of a small wrapper message.
fn first_bytes<'a>(b: &'a [u8], field: &'static str) -> Result<Option<&'a [u8]>, ProtoError> {
    let mut r = Reader::new(b);
    let mut out = None;
    while !r.done() {
        if let (1, Wire::Len(x)) = r.field(field)? {
            out = Some(x);
        }
    }
    Ok(out)
}

struct Ctx<'m> {
    msg: &'m M,
    field: &'static str,
}

fn bad_wire(c: &Ctx<'_>, w: Wire<'_>) -> ProtoError {
    ProtoError::WireType {
        message: c.msg.name,
        field: c.field,
        wire: w.code(),
    }
}

/// Decodes one value of type `ty`. `None`: the value is Go's JSON `null` (dropped).
fn value(ty: T, w: Wire<'_>, c: &Ctx<'_>, depth: usize) -> Result<Option<Value>, ProtoError> {
    let f = c.field;
    Ok(Some(match (ty, w) {
        (T::Str, Wire::Len(x)) => json!(utf8(x, f)?),
        (T::Bytes, Wire::Len(x)) => json!(skiff_api::meta::base64_encode(x)),
        (T::I32, Wire::Varint(v)) => json!(v as i32),
        (T::I64, Wire::Varint(v)) => json!(v as i64),
        (T::Bool, Wire::Varint(v)) => json!(v != 0),
        (T::F64, Wire::Fixed64(b)) => {
            let n =
                serde_json::Number::from_f64(f64::from_le_bytes(b)).ok_or(ProtoError::Range(f))?;
            Value::Number(n)
        }
        (T::Msg(i), Wire::Len(x)) => Value::Object(message(x, i, depth + 1)?),
        (T::Time, Wire::Len(x)) => return time_value(x, false, f),
        (T::MicroTime, Wire::Len(x)) => return time_value(x, true, f),
        (T::Duration, Wire::Len(x)) => {
            let mut r = Reader::new(x);
            let mut d = 0i64;
            while !r.done() {
                if let (1, Wire::Varint(v)) = r.field(f)? {
                    d = v as i64;
                }
            }
            json!(go_duration(d))
        }
        (T::Quantity, Wire::Len(x)) => match first_bytes(x, f)? {
            Some(s) => json!(utf8(s, f)?),
            None => json!("0"),
        },
        (T::IntOrString, Wire::Len(x)) => {
            let (mut kind, mut i, mut s) = (0u64, 0i32, String::new());
            let mut r = Reader::new(x);
            while !r.done() {
                match r.field(f)? {
                    (1, Wire::Varint(v)) => kind = v,
                    (2, Wire::Varint(v)) => i = v as i32,
                    (3, Wire::Len(b)) => s = utf8(b, f)?,
                    _ => {}
                }
            }
            if kind == 1 { json!(s) } else { json!(i) }
        }
        (T::Json, Wire::Len(x)) => match first_bytes(x, f)? {
            Some(raw) if !raw.is_empty() => serde_json::from_slice(raw)
                .map_err(|source| ProtoError::Json { field: f, source })?,
            _ => return Ok(None),
        },
        (T::StrList, Wire::Len(x)) => {
            let mut r = Reader::new(x);
            let mut items = Vec::new();
            while !r.done() {
                if let (1, Wire::Len(b)) = r.field(f)? {
                    items.push(json!(utf8(b, f)?));
                }
            }
            Value::Array(items)
        }
        (T::OrBool(p) | T::OrArray(p) | T::OrStringArray(p), Wire::Len(x)) => {
            let mut r = Reader::new(x);
            let (mut allows, mut schema, mut list) = (false, None, Vec::new());
            while !r.done() {
                match (ty, r.field(f)?) {
                    (T::OrBool(_), (1, Wire::Varint(v))) => allows = v != 0,
                    (T::OrBool(_), (2, Wire::Len(b))) | (_, (1, Wire::Len(b))) => {
                        schema = Some(Value::Object(message(b, p, depth + 1)?));
                    }
                    (T::OrArray(_), (2, Wire::Len(b))) => {
                        list.push(Value::Object(message(b, p, depth + 1)?));
                    }
                    (T::OrStringArray(_), (2, Wire::Len(b))) => list.push(json!(utf8(b, f)?)),
                    _ => {}
                }
            }
            match ty {
                T::OrBool(_) => schema.unwrap_or(json!(allows)),
                _ if !list.is_empty() => Value::Array(list),
                _ => return Ok(schema),
            }
        }
        (_, w) => return Err(bad_wire(c, w)),
    }))
}

/// The zero value Go gives a map entry without a value.
fn zero(ty: T) -> Value {
    match ty {
        T::Str | T::Bytes => json!(""),
        T::I32 | T::I64 | T::F64 | T::IntOrString => json!(0),
        T::Bool => json!(false),
        T::Quantity => json!("0"),
        T::Duration => json!("0s"),
        T::Msg(_) => json!({}),
        T::StrList => json!([]),
        _ => Value::Null,
    }
}

fn message(b: &[u8], idx: usize, depth: usize) -> Result<Map<String, Value>, ProtoError> {
    let mut out = Map::new();
    decode_into(b, idx, depth, &mut out)?;
    Ok(out)
}

fn decode_into(
    b: &[u8],
    idx: usize,
    depth: usize,
    out: &mut Map<String, Value>,
) -> Result<(), ProtoError> {
    if depth > MAX_DEPTH {
        return Err(ProtoError::TooDeep);
    }
    let msg = MESSAGES.get(idx).ok_or(ProtoError::Malformed("schema"))?;
    let mut r = Reader::new(b);
    while !r.done() {
        let (num, w) = r.field(msg.name)?;
        let Ok(fi) = msg.fields.binary_search_by_key(&num, |f| f.tag) else {
            continue; // unknown field (a newer client): skipped
        };
        let f = &msg.fields[fi];
        let c = Ctx { msg, field: f.json };
        match f.card {
            C::Inline => match (f.ty, w) {
                (T::Msg(i), Wire::Len(x)) => decode_into(x, i, depth + 1, out)?,
                (_, w) => return Err(bad_wire(&c, w)),
            },
            C::One => {
                let v = value(f.ty, w, &c, depth)?;
                let drop = match &v {
                    None => true,
                    Some(Value::String(s)) => s.is_empty() && matches!(f.ty, T::Str | T::Bytes),
                    Some(v) => {
                        (*v == json!(0) || *v == json!(false))
                            && ZERO_IS_UNSET.contains(&(msg.name, f.json))
                    }
                };
                match v {
                    Some(v) if !drop => {
                        out.insert(f.json.to_string(), v);
                    }
                    _ => {
                        out.remove(f.json);
                    }
                }
            }
            C::Rep => {
                let mut items = Vec::new();
                match (f.ty, w) {
                    (T::I32 | T::I64 | T::Bool, Wire::Len(x)) => {
                        // packed
                        let mut pr = Reader::new(x);
                        while !pr.done() {
                            let v = pr.varint(f.json)?;
                            items.extend(value(f.ty, Wire::Varint(v), &c, depth)?);
                        }
                    }
                    _ => items.extend(value(f.ty, w, &c, depth)?),
                }
                let e = out
                    .entry(f.json.to_string())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Some(a) = e.as_array_mut() {
                    a.extend(items);
                }
            }
            C::Map => {
                let Wire::Len(x) = w else {
                    return Err(bad_wire(&c, w));
                };
                let mut er = Reader::new(x);
                let (mut key, mut val) = (String::new(), None);
                while !er.done() {
                    match er.field(f.json)? {
                        (1, Wire::Len(k)) => key = utf8(k, f.json)?,
                        (2, vw) => val = value(f.ty, vw, &c, depth)?,
                        _ => {}
                    }
                }
                let e = out
                    .entry(f.json.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(m) = e.as_object_mut() {
                    m.insert(key, val.unwrap_or_else(|| zero(f.ty)));
                }
            }
        }
    }
    Ok(())
}

/// Decodes a protobuf request body. `Ok(None)`: the kind is not one skiff serves (415).
pub fn decode(body: &[u8]) -> Result<Option<Value>, ProtoError> {
    let inner = body.strip_prefix(b"k8s\x00").ok_or(ProtoError::Envelope)?;
    let mut r = Reader::new(inner);
    let (mut api_version, mut kind, mut raw, mut encoding) =
        (String::new(), String::new(), &[][..], String::new());
    while !r.done() {
        match r.field("runtime.Unknown")? {
            (1, Wire::Len(tm)) => {
                let mut t = Reader::new(tm);
                while !t.done() {
                    match t.field("runtime.TypeMeta")? {
                        (1, Wire::Len(x)) => api_version = utf8(x, "apiVersion")?,
                        (2, Wire::Len(x)) => kind = utf8(x, "kind")?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(x)) => raw = x,
            (3, Wire::Len(x)) => encoding = utf8(x, "contentEncoding")?,
            _ => {}
        }
    }
    if !encoding.is_empty() {
        return Err(ProtoError::ContentEncoding(encoding));
    }
    let Some((_, _, idx)) = ROOTS
        .iter()
        .find(|(av, k, _)| *av == api_version && *k == kind)
    else {
        tracing::debug!(%api_version, %kind, "protobuf body of a kind without a protobuf schema");
        return Ok(None);
    };
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    decode_into(raw, usize::from(*idx), 0, &mut obj)?;
    tracing::debug!(%api_version, %kind, bytes = body.len(), "decoded a protobuf request body");
    Ok(Some(Value::Object(obj)))
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
mod tests;
