//! HTTP helpers: JSON responses, Status errors, content negotiation and body reading.

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;
use skiff_api::ApiError;

/// Largest request body accepted (kube-apiserver: 3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

pub fn json_response(code: u16, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn json_response_ct(code: u16, v: &Value, content_type: &str) -> Response {
    let mut r = json_response(code, v);
    if let Ok(h) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, h);
    }
    r
}

pub fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

pub fn text_response(code: u16, text: String) -> Response {
    let mut r = (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), text).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn accept(req: &Request) -> String {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// What the client accepts for an object response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Plain JSON.
    Json,
    /// meta.k8s.io/v1 Table.
    Table,
    /// PartialObjectMetadata(List).
    Metadata,
}

/// Negotiates the response form from the Accept header; `Err` = 406.
pub fn negotiate(req: &Request) -> Result<Output, ApiError> {
    let acc = accept(req);
    if acc.trim().is_empty() {
        return Ok(Output::Json);
    }
    let mut plain_ok = false;
    for part in acc.split(',') {
        let p = part.trim().to_ascii_lowercase();
        let media = p.split(';').next().unwrap_or("").trim().to_string();
        let params: Vec<&str> = p.split(';').skip(1).map(str::trim).collect();
        let json_like = media == "application/json" || media == "*/*" || media == "application/*";
        if !json_like {
            continue;
        }
        let as_ = params.iter().find_map(|x| x.strip_prefix("as="));
        let g = params.iter().find_map(|x| x.strip_prefix("g="));
        match (as_, g) {
            (Some("table"), Some("meta.k8s.io")) => return Ok(Output::Table),
            (Some("partialobjectmetadata" | "partialobjectmetadatalist"), Some("meta.k8s.io")) => {
                return Ok(Output::Metadata);
            }
            (None, _) => plain_ok = true,
            _ => {}
        }
    }
    if plain_ok {
        Ok(Output::Json)
    } else {
        Err(ApiError::not_acceptable(format!(
            "only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf (got {acc:?})"
        )))
    }
}

pub async fn read_body(req: Request) -> Result<(String, bytes::Bytes), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.parse::<usize>().ok())
        && len > MAX_BODY
    {
        return Err(ApiError::too_large());
    }
    let body: Body = req.into_body();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::too_large())?;
    Ok((ct, bytes))
}

/// Parses a JSON (or, for `application/yaml`, YAML-as-JSON) body into an object.
pub fn parse_object(ct: &str, body: &[u8]) -> Result<Value, ApiError> {
    let media = ct.split(';').next().unwrap_or("").trim();
    if media == "application/vnd.kubernetes.protobuf" {
        return match crate::proto::decode(body) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(ApiError::unsupported_media_type(ct)),
            Err(e) => Err(ApiError::bad_request(format!(
                "error decoding protobuf body: {e}"
            ))),
        };
    }
    if media == "application/yaml" {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::bad_request("the YAML body is not valid UTF-8"))?;
        let v: Value = serde_saphyr::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::bad_request(
                "the object provided is unrecognized (must be a YAML mapping)",
            ));
        }
        return Ok(v);
    }
    if media != "application/json"
        && media != "*/*"
        && !media.is_empty()
        && !media.ends_with("+json")
    {
        return Err(ApiError::unsupported_media_type(ct));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type JSON): {e}"
        ))
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the object provided is unrecognized (must be a JSON object)",
        ));
    }
    Ok(v)
}

/// Field paths that appear twice in one JSON object of `body` (`spec.replicas`,
/// `spec.containers[0].image`), in the order found. serde_json keeps the last of duplicate keys
/// silently; kube-apiserver reports them under `fieldValidation` (Strict: 400, Warn: warning),
/// so the raw body is scanned once more with a visitor that remembers keys per object.
pub fn duplicate_fields(body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = serde::de::DeserializeSeed::deserialize(
        DupScan {
            path: String::new(),
            out: &mut out,
        },
        &mut de,
    );
    out
}

struct DupScan<'a> {
    path: String,
    out: &'a mut Vec<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for DupScan<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for DupScan<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let seed = DupScan {
                path: format!("{}[{i}]", self.path),
                out: &mut *self.out,
            };
            if seq.next_element_seed(seed)?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if !seen.insert(key) {
                self.out.push(path.clone());
            }
            map.next_value_seed(DupScan {
                path,
                out: &mut *self.out,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod duplicate_tests {
    #[test]
    fn duplicate_fields_are_found_with_paths() {
        let body = br#"{"kind":"Deployment","spec":{"replicas":1,"replicas":2,
            "template":{"spec":{"containers":[{"name":"a","image":"x","image":"y"}]}}},"kind":"Deployment"}"#;
        assert_eq!(
            super::duplicate_fields(body),
            vec![
                "spec.replicas".to_string(),
                "spec.template.spec.containers[0].image".to_string(),
                "kind".to_string()
            ]
        );
        assert!(super::duplicate_fields(br#"{"a":{"b":1},"c":{"b":2}}"#).is_empty());
        assert!(super::duplicate_fields(b"not json").is_empty());
    }
}
