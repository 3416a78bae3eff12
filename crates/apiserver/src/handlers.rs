//! Resource handlers: create, get, list, update, patch, delete, deletecollection and the
//! status/scale/binding/eviction subresources, over the store with kube-apiserver semantics.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, Request};
use axum::response::Response;
use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use skiff_api::resources::{RESOURCES, ResourceInfo, find};
use skiff_api::{ApiError, meta, table};
use skiff_store::{KeyValue, RangeRequest, StoreError};

use crate::http_util::{Output, error_response, json_response, negotiate, parse_object, read_body};
use crate::{ApiState, Identity};

pub(crate) type Q = HashMap<String, String>;

/// Kinds whose metadata.generation tracks spec changes.
const GENERATION_KINDS: &[&str] = &[
    "Pod",
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
    "ReplicationController",
    "Ingress",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "CustomResourceDefinition",
    "ValidatingAdmissionPolicy",
];

pub(crate) fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::Compacted {
            requested,
            compacted,
        } => ApiError::expired(requested, compacted),
        StoreError::Unavailable(m) => ApiError::unavailable(format!("storage is unavailable: {m}")),
        other => ApiError::internal(other.to_string()),
    }
}

/// Decodes a stored object and sets its resourceVersion from the key's mod revision.
pub(crate) fn decode(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("decoding {}: {e}", kv.key)))?;
    if let Some(m) = meta::metadata_mut(&mut v) {
        m.insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
    }
    Ok(v)
}

/// Serializes `obj` for the store, dropping the fields that are never stored
/// (resourceVersion, selfLink) from `obj` itself, so that after the write `obj` plus the new
/// resourceVersion ([`stored`]) is what a read would decode: no clone before, no parse after.
fn encode(obj: &mut Value) -> Bytes {
    if let Some(m) = meta::metadata_mut(obj) {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    Bytes::from(serde_json::to_vec(obj).unwrap_or_default())
}

/// `obj` (as passed to [`encode`]) as stored at `kv`: what `decode(kv)` returns.
fn stored(mut obj: Value, kv: &KeyValue) -> Value {
    if let Some(m) = meta::metadata_mut(&mut obj) {
        m.insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
    }
    obj
}

fn dry_run(q: &Q) -> bool {
    q.get("dryRun").is_some_and(|v| v == "All")
}

/// Sets the server-owned metadata of a new object and applies defaults.
pub(crate) fn prepare_new(r: &ResourceInfo, obj: &mut Value, ns: Option<&str>) {
    obj["apiVersion"] = json!(r.api_version());
    obj["kind"] = json!(r.kind);
    let has_spec = obj.get("spec").is_some();
    if let Some(m) = meta::metadata_mut(obj) {
        for k in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "uid",
            "creationTimestamp",
            "generation",
        ] {
            m.remove(k);
        }
        m.insert("uid".into(), json!(meta::new_uid()));
        m.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
        if GENERATION_KINDS.contains(&r.kind)
            || (has_spec
                && r.group.ends_with("k8s.io")
                && r.kind != "CertificateSigningRequest"
                && r.kind != "Lease"
                && r.kind != "EndpointSlice"
                && r.kind != "Event")
        {
            m.insert("generation".into(), json!(1));
        }
        match ns {
            Some(ns) if r.namespaced => {
                m.insert("namespace".into(), json!(ns));
            }
            _ => {
                m.remove("namespace");
            }
        }
    }
    // A create resets status, as kube-apiserver's strategies do, except for Nodes: a kubelet
    // registers its Node with capacity, addresses and conditions already filled in.
    if r.subresource("status").is_some()
        && !(r.group.is_empty() && r.kind == "Node")
        && let Some(o) = obj.as_object_mut()
    {
        o.remove("status");
    }
    skiff_api::defaults::apply_defaults(r.group, r.kind, obj);
    if r.group.is_empty() && r.kind == "Pod" {
        skiff_api::defaults::default_toleration_seconds(obj);
    }
}

/// One parsed resource request.
pub(crate) struct Target {
    pub r: &'static ResourceInfo,
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

fn parse_target(group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let (ns, resource, name, sub) = match rest {
        ["namespaces"] => (None, "namespaces", None, None),
        ["namespaces", n] => (None, "namespaces", Some(*n), None),
        ["namespaces", n, s]
            if group.is_empty()
                && (*s == "status" || *s == "finalize")
                && find(group, version, s).is_none() =>
        {
            (None, "namespaces", Some(*n), Some(*s))
        }
        ["namespaces", ns, res] => (Some(*ns), *res, None, None),
        ["namespaces", ns, res, name] => (Some(*ns), *res, Some(*name), None),
        ["namespaces", ns, res, name, sub] => (Some(*ns), *res, Some(*name), Some(*sub)),
        [res] => (None, *res, None, None),
        [res, name] => (None, *res, Some(*name), None),
        [res, name, sub] => (None, *res, Some(*name), Some(*sub)),
        _ => return Err(ApiError::path_not_found()),
    };
    let r = find(group, version, resource).ok_or_else(ApiError::path_not_found)?;
    if ns.is_some() && !r.namespaced {
        return Err(ApiError::path_not_found());
    }
    if let Some(s) = sub
        && r.subresource(s).is_none()
    {
        return Err(ApiError::path_not_found());
    }
    Ok(Target {
        r,
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    })
}

pub async fn resource_request(
    st: Arc<ApiState>,
    identity: Identity,
    req: Request,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Response {
    match handle(st, identity, req, group, version, rest).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn handle(
    st: Arc<ApiState>,
    identity: Identity,
    req: Request,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Response, ApiError> {
    if let ("", ["nodes", node, "proxy", tail @ ..]) = (group, rest) {
        return crate::kubelet_proxy::node_proxy(&st, node, tail, req).await;
    }
    let t = parse_target(group, version, rest)?;
    let q: Q = Query::<Q>::try_from_uri(req.uri())
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    let method = req.method().clone();
    let r = t.r;
    let verb_ok = |v: &str| r.has_verb(v);

    // Review kinds: create only, never stored.
    if !r.is_persisted() {
        if method != Method::POST || t.name.is_some() {
            return Err(ApiError::method_not_allowed());
        }
        let (ct, body) = read_body(req).await?;
        let obj = parse_object(&ct, &body)?;
        return reviews(&st, r, &identity, obj).await;
    }

    if let Some(sub) = t.sub.clone() {
        return subresource(&st, &t, &sub, req, &q).await;
    }

    match (method.clone(), t.name.clone()) {
        (Method::GET, None) => {
            let watching = q
                .get("watch")
                .is_some_and(|w| w == "1" || w.eq_ignore_ascii_case("true"));
            if watching {
                if !verb_ok("watch") {
                    return Err(ApiError::method_not_allowed());
                }
                let out = negotiate(&req)?;
                return crate::watch::serve_watch(st, &t, &q, out).await;
            }
            if !verb_ok("list") {
                return Err(ApiError::method_not_allowed());
            }
            let out = negotiate(&req)?;
            list(&st, &t, &q, out).await
        }
        (Method::GET, Some(name)) => {
            let out = negotiate(&req)?;
            if q.get("watch")
                .is_some_and(|w| w == "1" || w.eq_ignore_ascii_case("true"))
            {
                let mut q2 = q.clone();
                q2.insert("fieldSelector".into(), format!("metadata.name={name}"));
                let t2 = Target {
                    r,
                    ns: t.ns.clone(),
                    name: None,
                    sub: None,
                };
                return crate::watch::serve_watch(st, &t2, &q2, out).await;
            }
            let obj = get_obj(&st, &t, &name).await?;
            Ok(render_one(r, &obj, out, &q))
        }
        (Method::POST, None) => {
            if !verb_ok("create") {
                return Err(ApiError::method_not_allowed());
            }
            let (ct, body) = read_body(req).await?;
            let obj = parse_object(&ct, &body)?;
            let warnings = field_validation(r, &obj, json_dups(&ct, &body), &q)?;
            let created = create(&st, &t, obj, &q).await?;
            Ok(with_warnings(json_response(201, &created), &warnings))
        }
        (Method::PUT, Some(name)) => {
            let (ct, body) = read_body(req).await?;
            let obj = parse_object(&ct, &body)?;
            let warnings = field_validation(r, &obj, json_dups(&ct, &body), &q)?;
            let (code, obj) = update(&st, &t, &name, obj, &q, Mode::Main).await?;
            Ok(with_warnings(json_response(code, &obj), &warnings))
        }
        (Method::PATCH, Some(name)) => {
            let (ct, body) = read_body(req).await?;
            if ct.split(';').next().unwrap_or("").trim() == "application/apply-patch+yaml" {
                return server_side_apply(&st, &t, &name, &body, &q).await;
            }
            let current = get_obj(&st, &t, &name).await?;
            let patched = apply_patch(&ct, &body, &current)?;
            let warnings = field_validation(r, &patched, json_dups(&ct, &body), &q)?;
            let obj = patch(&st, &t, &name, &ct, &body, &q, Mode::Main).await?;
            Ok(with_warnings(json_response(200, &obj), &warnings))
        }
        (Method::DELETE, Some(name)) => {
            let (_, body) = read_body(req).await?;
            let opts: Value = if body.is_empty() {
                json!({})
            } else {
                serde_json::from_slice(&body).unwrap_or(json!({}))
            };
            let (code, v) = delete(&st, &t, &name, &opts, &q).await?;
            Ok(json_response(code, &v))
        }
        (Method::DELETE, None) => {
            if !verb_ok("deletecollection") {
                return Err(ApiError::method_not_allowed());
            }
            delete_collection(&st, &t, &q).await
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// Server-side apply (`application/apply-patch+yaml`): creates the object if missing, else merges
/// the applied configuration with field ownership per manager (see `skiff_api::ssa`).
async fn server_side_apply(
    st: &ApiState,
    t: &Target,
    name: &str,
    body: &[u8],
    q: &Q,
) -> Result<Response, ApiError> {
    let r = t.r;
    let manager = q
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "PATCH, application/apply-patch+yaml requires fieldManager parameter",
            )
        })?
        .clone();
    let force = q
        .get("force")
        .is_some_and(|f| f.eq_ignore_ascii_case("true"));
    let applied = crate::http_util::parse_object("application/yaml", body)?;
    check_kind(r, &applied)?;
    let body_name = meta::name(&applied);
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let warnings = field_validation(r, &applied, Vec::new(), q)?;
    let conflict_err = |conflicts: Vec<skiff_api::ssa::Conflict>| {
        let n = conflicts.len();
        let message = if n == 1 {
            let (m, v, f) = &conflicts[0];
            format!("Apply failed with 1 conflict: conflict with \"{m}\" using {v}: {f}")
        } else {
            let lines: Vec<String> = conflicts
                .iter()
                .map(|(m, v, f)| format!("conflict with \"{m}\" using {v}: {f}"))
                .collect();
            format!("Apply failed with {n} conflicts: {}", lines.join("\n"))
        };
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(m, v, f)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\" using {v}"), "field": f}))
            .collect();
        ApiError {
            code: 409,
            reason: "Conflict",
            message,
            details: Some(
                json!({"name": name, "kind": r.resource, "group": r.group, "causes": causes}),
            ),
        }
    };
    let now = meta::now_rfc3339();
    for _ in 0..5 {
        let live = match get_kv(st, t, name).await {
            Ok(kv) => Some(decode(&kv)?),
            Err(e) if e.code == 404 => None,
            Err(e) => return Err(e),
        };
        let mut obj = skiff_api::ssa::apply(
            live.as_ref(),
            &applied,
            &manager,
            force,
            &r.api_version(),
            &now,
        )
        .map_err(conflict_err)?;
        match live {
            None => {
                if let Some(m) = meta::metadata_mut(&mut obj) {
                    m.insert("name".into(), json!(name));
                }
                match create(st, t, obj, q).await {
                    Ok(created) => {
                        return Ok(with_warnings(json_response(201, &created), &warnings));
                    }
                    Err(e) if e.reason == "AlreadyExists" => continue,
                    Err(e) => return Err(e),
                }
            }
            Some(live) => {
                if let Some(m) = meta::metadata_mut(&mut obj) {
                    m.insert(
                        "resourceVersion".into(),
                        json!(meta::resource_version(&live).unwrap_or("")),
                    );
                }
                match update(st, t, name, obj, q, Mode::Main).await {
                    Ok((code, v)) => return Ok(with_warnings(json_response(code, &v), &warnings)),
                    Err(e) if e.reason == "Conflict" => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Err(ApiError::conflict(r, name))
}

/// Duplicate field paths of a JSON request body (other media types are not scanned).
fn json_dups(ct: &str, body: &[u8]) -> Vec<String> {
    let media = ct.split(';').next().unwrap_or("").trim();
    if media == "application/vnd.kubernetes.protobuf" || media.ends_with("yaml") {
        return Vec::new();
    }
    crate::http_util::duplicate_fields(body)
}

/// `fieldValidation`: Strict rejects unknown and duplicate fields (400), Warn (the default)
/// reports them in `Warning` headers, Ignore skips the check.
fn field_validation(
    r: &ResourceInfo,
    obj: &Value,
    dups: Vec<String>,
    q: &Q,
) -> Result<Vec<String>, ApiError> {
    let mode = q
        .get("fieldValidation")
        .map(String::as_str)
        .unwrap_or("Warn");
    if mode.eq_ignore_ascii_case("Ignore") {
        return Ok(Vec::new());
    }
    let unknown: Vec<String> = crate::schemas::unknown_fields(&r.api_version(), r.kind, obj)
        .into_iter()
        .map(|f| format!("unknown field \"{f}\""))
        .chain(dups.into_iter().map(|f| format!("duplicate field \"{f}\"")))
        .collect();
    if unknown.is_empty() {
        return Ok(unknown);
    }
    match mode {
        "Strict" => Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            unknown.join(", "),
            kind = r.kind,
            version = r.version,
        ))),
        "Warn" => Ok(unknown),
        other => Err(ApiError::bad_request(format!(
            "fieldValidation must be one of Ignore, Warn or Strict, not {other:?}"
        ))),
    }
}

fn with_warnings(mut resp: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text = format!("299 - {}", serde_json::Value::String(w.clone()));
        if let Ok(h) = http::HeaderValue::from_str(&text) {
            resp.headers_mut().append("Warning", h);
        }
    }
    resp
}

async fn reviews(
    st: &ApiState,
    r: &ResourceInfo,
    id: &Identity,
    mut obj: Value,
) -> Result<Response, ApiError> {
    obj["apiVersion"] = json!(r.api_version());
    obj["kind"] = json!(r.kind);
    match r.kind {
        "SelfSubjectReview" => {
            let mut ui = json!({"username": id.user, "groups": id.all_groups()});
            if !id.uid.is_empty() {
                ui["uid"] = json!(id.uid);
            }
            obj["status"] = json!({"userInfo": ui});
        }
        "SelfSubjectAccessReview" | "SubjectAccessReview" => {
            obj["status"] = json!({"allowed": true, "reason": "skiff: authenticated users are allowed (no RBAC yet)"});
        }
        "SelfSubjectRulesReview" => {
            obj["status"] = json!({
                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                "incomplete": false,
            });
        }
        "TokenReview" => {
            let token = obj
                .pointer("/spec/token")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let wanted: Vec<String> = obj
                .pointer("/spec/audiences")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .filter(|a: &Vec<String>| !a.is_empty())
                .unwrap_or_else(|| vec![crate::satoken::API_AUDIENCE.to_string()]);
            let auds: Vec<&str> = wanted.iter().map(String::as_str).collect();
            obj["status"] = match crate::auth::authenticate_token(st, &token, &auds).await {
                Some(who) => {
                    json!({"authenticated": true, "audiences": wanted,
                           "user": {"username": who.user, "uid": who.uid, "groups": who.all_groups()}})
                }
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
        }
        _ => return Err(ApiError::method_not_allowed()),
    }
    if let Some(m) = meta::metadata_mut(&mut obj) {
        m.insert("creationTimestamp".into(), Value::Null);
    }
    Ok(json_response(201, &obj))
}

pub(crate) async fn get_kv(st: &ApiState, t: &Target, name: &str) -> Result<KeyValue, ApiError> {
    let key = t.r.key(t.ns.as_deref(), name);
    st.store
        .get(&key)
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::not_found(t.r, name))
}

async fn get_obj(st: &ApiState, t: &Target, name: &str) -> Result<Value, ApiError> {
    decode(&get_kv(st, t, name).await?)
}

fn render_one(r: &ResourceInfo, obj: &Value, out: Output, q: &Q) -> Response {
    match out {
        Output::Json => json_response(200, obj),
        Output::Metadata => json_response(200, &partial(obj)),
        Output::Table => {
            let now = time::OffsetDateTime::now_utc();
            let include = q
                .get("includeObject")
                .map(String::as_str)
                .unwrap_or("Metadata");
            json_response(
                200,
                &json!({
                    "kind": "Table",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": {"resourceVersion": meta::resource_version(obj).unwrap_or("")},
                    "columnDefinitions": table::column_definitions(r.group, r.kind),
                    "rows": [table::row(r.group, r.kind, obj, include, now)],
                }),
            )
        }
    }
}

pub(crate) fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))})
}

async fn ensure_namespace(
    st: &ApiState,
    ns: &str,
    r: &ResourceInfo,
    name: &str,
) -> Result<(), ApiError> {
    let Some(nsr) = find("", "v1", "namespaces") else {
        return Ok(());
    };
    let kv = st
        .store
        .get(&nsr.key(None, ns))
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::namespace_not_found(ns))?;
    let obj = decode(&kv)?;
    if meta::meta_str(&obj, "deletionTimestamp").is_some() {
        return Err(ApiError::forbidden(
            r,
            name,
            &format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        ));
    }
    Ok(())
}

fn check_kind(r: &ResourceInfo, obj: &Value) -> Result<(), ApiError> {
    if let Some(k) = obj.get("kind").and_then(Value::as_str)
        && !k.is_empty()
        && k != r.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the provided object ({k}) does not match the kind of the resource ({})",
            r.kind
        )));
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str) {
        let ok = av.is_empty()
            || av == r.api_version()
            || (r.kind == "Event" && (av == "v1" || av == "events.k8s.io/v1"));
        if !ok {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                r.api_version()
            )));
        }
    }
    Ok(())
}

async fn create(st: &ApiState, t: &Target, mut obj: Value, q: &Q) -> Result<Value, ApiError> {
    let r = t.r;
    check_kind(r, &obj)?;
    if let (Some(path_ns), Some(body_ns)) = (t.ns.as_deref(), meta::namespace(&obj))
        && !body_ns.is_empty()
        && body_ns != path_ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if r.namespaced && t.ns.is_none() {
        return Err(ApiError::path_not_found());
    }
    let generate = meta::meta_str(&obj, "generateName")
        .unwrap_or("")
        .to_string();
    let given = meta::name(&obj).to_string();
    if let Some(ns) = t.ns.as_deref() {
        ensure_namespace(st, ns, r, &given).await?;
    }
    prepare_new(r, &mut obj, t.ns.as_deref());
    if r.group.is_empty() && r.kind == "Pod" {
        crate::admission::pod_priority(st, r, &mut obj).await?;
        if st.sa_signer.is_some() {
            crate::admission::pod_service_account(st, r, &mut obj).await?;
        }
    }
    // Held until the create is stored, so two services never get the same address.
    let _alloc = if r.kind == "Service" {
        let guard = st.alloc_lock.lock().await;
        allocate_service(st, &mut obj).await?;
        Some(guard)
    } else {
        None
    };
    for attempt in 0..5 {
        if given.is_empty()
            && !generate.is_empty()
            && let Some(m) = meta::metadata_mut(&mut obj)
        {
            m.insert("name".into(), json!(meta::generate_name(&generate)));
        }
        let name = meta::name(&obj).to_string();
        let mut causes = skiff_api::validation::validate(r, &obj);
        if name.is_empty() {
            causes.retain(|c| c.field != "metadata.name");
            causes.insert(
                0,
                skiff_api::Cause::required("metadata.name", "name or generateName is required"),
            );
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(r, &name, &causes));
        }
        if dry_run(q) {
            return Ok(obj);
        }
        let key = r.key(t.ns.as_deref(), &name);
        match st.store.create(&key, encode(&mut obj)).await {
            Ok(kv) => return Ok(stored(obj, &kv)),
            Err(StoreError::AlreadyExists { .. })
                if given.is_empty() && !generate.is_empty() && attempt < 4 =>
            {
                continue;
            }
            Err(StoreError::AlreadyExists { .. }) => {
                return Err(ApiError::already_exists(r, &name));
            }
            Err(e) => return Err(store_err(e)),
        }
    }
    Err(ApiError::already_exists(r, meta::name(&obj)))
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The main resource: status changes are ignored when a status subresource exists.
    Main,
    /// The status subresource: only status changes are kept.
    Status,
}

fn merge_for_mode(r: &ResourceInfo, old: &Value, mut new: Value, mode: Mode) -> Value {
    match mode {
        Mode::Main => {
            if r.subresource("status").is_some() && r.kind != "Namespace" {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            new
        }
        Mode::Status => {
            let mut out = old.clone();
            match new.get("status") {
                Some(s) => out["status"] = s.clone(),
                None => {
                    if let Some(o) = out.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            // Status writes may carry the caller's resourceVersion precondition.
            if let Some(rv) = meta::resource_version(&new).map(str::to_string)
                && let Some(m) = meta::metadata_mut(&mut out)
            {
                m.insert("resourceVersion".into(), json!(rv));
            }
            out
        }
    }
}

/// Replaces an object. Returns (HTTP code, stored object).
pub(crate) async fn update(
    st: &ApiState,
    t: &Target,
    name: &str,
    new: Value,
    q: &Q,
    mode: Mode,
) -> Result<(u16, Value), ApiError> {
    update_from(st, t, name, new, q, mode, None).await
}

/// [`update`] with the current object already read (`current` = its key-value and decoded
/// object), as `pods/binding` has it.
async fn update_from(
    st: &ApiState,
    t: &Target,
    name: &str,
    new: Value,
    q: &Q,
    mode: Mode,
    current: Option<(KeyValue, Value)>,
) -> Result<(u16, Value), ApiError> {
    let r = t.r;
    check_kind(r, &new)?;
    let body_name = meta::name(&new);
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if let (Some(path_ns), Some(body_ns)) = (t.ns.as_deref(), meta::namespace(&new))
        && !body_ns.is_empty()
        && body_ns != path_ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let (kv, mut old) = match current {
        Some(c) => c,
        None => {
            let kv = get_kv(st, t, name).await?;
            let old = decode(&kv)?;
            (kv, old)
        }
    };
    let mut new = merge_for_mode(r, &old, new, mode);
    let expected = match meta::resource_version(&new) {
        Some(rv) => {
            let rv: i64 = rv.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid resourceVersion {rv:?}: must be an integer"
                ))
            })?;
            if rv != kv.mod_revision {
                return Err(ApiError::conflict(r, name));
            }
            rv
        }
        None => kv.mod_revision,
    };
    new["apiVersion"] = json!(r.api_version());
    new["kind"] = json!(r.kind);
    // Server-owned metadata stays as it was.
    let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
    if let Some(m) = meta::metadata_mut(&mut new) {
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "namespace",
            "name",
        ] {
            match old_meta.get(k) {
                Some(v) => {
                    m.insert(k.into(), v.clone());
                }
                None => {
                    m.remove(k);
                }
            }
        }
        m.remove("resourceVersion");
    }
    skiff_api::defaults::apply_defaults(r.group, r.kind, &mut new);
    if mode == Mode::Main
        && old.get("spec") != new.get("spec")
        && let Some(g) = old_meta.get("generation").and_then(Value::as_i64)
        && let Some(m) = meta::metadata_mut(&mut new)
    {
        m.insert("generation".into(), json!(g + 1));
    }
    let causes = skiff_api::validation::validate(r, &new);
    if !causes.is_empty() {
        return Err(ApiError::invalid(r, name, &causes));
    }
    // A terminating object whose finalizers are gone is deleted now.
    let terminating = meta::meta_str(&new, "deletionTimestamp").is_some();
    if terminating && meta::finalizers(&new).is_empty() && r.kind != "Namespace" {
        if dry_run(q) {
            return Ok((200, new));
        }
        let key = r.key(t.ns.as_deref(), name);
        match st.store.delete(&key, Some(expected)).await {
            Ok(_) => return Ok((200, new)),
            Err(StoreError::Conflict { .. }) => return Err(ApiError::conflict(r, name)),
            Err(StoreError::NotFound { .. }) => return Err(ApiError::not_found(r, name)),
            Err(e) => return Err(store_err(e)),
        }
    }
    // Unchanged but for the resourceVersion (which `new` no longer has): nothing to write.
    let old_rv = meta::metadata_mut(&mut old).and_then(|m| m.remove("resourceVersion"));
    let unchanged = old == new;
    if let Some(rv) = old_rv
        && let Some(m) = meta::metadata_mut(&mut old)
    {
        m.insert("resourceVersion".into(), rv);
    }
    if unchanged {
        return Ok((200, old));
    }
    if dry_run(q) {
        let mut out = new;
        if let Some(m) = meta::metadata_mut(&mut out) {
            m.insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
        }
        return Ok((200, out));
    }
    let key = r.key(t.ns.as_deref(), name);
    let value = encode(&mut new);
    match st.store.update(&key, value, expected).await {
        Ok(kv) => Ok((200, stored(new, &kv))),
        Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(r, name)),
        Err(StoreError::NotFound { .. }) => Err(ApiError::not_found(r, name)),
        Err(e) => Err(store_err(e)),
    }
}

fn apply_patch(ct: &str, body: &[u8], current: &Value) -> Result<Value, ApiError> {
    let media = ct.split(';').next().unwrap_or("").trim();
    let parse = |b: &[u8]| -> Result<Value, ApiError> {
        serde_json::from_slice(b)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
    };
    match media {
        "application/json-patch+json" => {
            let p: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            let mut doc = current.clone();
            json_patch::patch(&mut doc, &p).map_err(|e| {
                ApiError::internal(format!(
                    "the server rejected our request due to an error in our request: {e}"
                ))
            })?;
            Ok(doc)
        }
        "application/merge-patch+json" => {
            let p = parse(body)?;
            if !p.is_object() {
                return Err(ApiError::bad_request("merge patch must be a JSON object"));
            }
            let mut doc = current.clone();
            json_patch::merge(&mut doc, &p);
            Ok(doc)
        }
        "application/strategic-merge-patch+json" => {
            let p = parse(body)?;
            skiff_api::smp::strategic_merge(current, &p)
                .map_err(|e| ApiError::bad_request(e.to_string()))
        }
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

pub(crate) async fn patch(
    st: &ApiState,
    t: &Target,
    name: &str,
    ct: &str,
    body: &[u8],
    q: &Q,
    mode: Mode,
) -> Result<Value, ApiError> {
    for _ in 0..5 {
        let current = get_obj(st, t, name).await?;
        let cur_rv = meta::resource_version(&current).unwrap_or("").to_string();
        let mut patched = apply_patch(ct, body, &current)?;
        if !patched.is_object() {
            return Err(ApiError::bad_request("patch produced a non-object"));
        }
        let rv_from_patch = meta::resource_version(&patched).is_some_and(|rv| rv != cur_rv);
        if !rv_from_patch && let Some(m) = meta::metadata_mut(&mut patched) {
            m.insert("resourceVersion".into(), json!(cur_rv));
        }
        match update(st, t, name, patched, q, mode).await {
            Err(e) if e.reason == "Conflict" && !rv_from_patch => continue,
            Err(e) => return Err(e),
            Ok((_, v)) => return Ok(v),
        }
    }
    Err(ApiError::conflict(t.r, name))
}

fn grace_from(opts: &Value, q: &Q) -> Option<i64> {
    opts.get("gracePeriodSeconds")
        .and_then(Value::as_i64)
        .or_else(|| q.get("gracePeriodSeconds").and_then(|s| s.parse().ok()))
}

/// Deletes one object. Returns (code, body).
pub(crate) async fn delete(
    st: &ApiState,
    t: &Target,
    name: &str,
    opts: &Value,
    q: &Q,
) -> Result<(u16, Value), ApiError> {
    let r = t.r;
    let kv = get_kv(st, t, name).await?;
    let obj = decode(&kv)?;
    if let Some(pre) = opts.get("preconditions") {
        if let Some(uid) = pre.get("uid").and_then(Value::as_str)
            && meta::meta_str(&obj, "uid") != Some(uid)
        {
            return Err(ApiError::conflict_msg(
                r,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta::meta_str(&obj, "uid").unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
            && rv != kv.mod_revision.to_string()
        {
            return Err(ApiError::conflict_msg(
                r,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    kv.mod_revision
                ),
            ));
        }
    }
    let dry = dry_run(q)
        || opts
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v == "All"));
    let key = r.key(t.ns.as_deref(), name);
    let grace = grace_from(opts, q);
    let propagation = opts
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .or(q.get("propagationPolicy").map(String::as_str));
    let mut finalizers = meta::finalizers(&obj);
    // Foreground and Orphan propagation are carried out by the garbage collector, which
    // removes these finalizers when the dependents are gone or released.
    let propagation_finalizer = match propagation {
        Some("Foreground") => Some("foregroundDeletion"),
        Some("Orphan") => Some("orphan"),
        _ => None,
    }
    .filter(|f| {
        r.kind != "Namespace"
            && meta::meta_str(&obj, "deletionTimestamp").is_none()
            && !finalizers.iter().any(|x| x == f)
    });
    if let Some(f) = propagation_finalizer {
        finalizers.push(f.to_string());
    }
    let pod_graceful = r.kind == "Pod"
        && obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
        && grace.unwrap_or_else(|| {
            obj.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30)
        }) > 0
        && obj
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .is_none_or(|p| p != "Succeeded" && p != "Failed");
    if r.kind == "Namespace" || !finalizers.is_empty() || pod_graceful {
        if meta::meta_str(&obj, "deletionTimestamp").is_some() {
            return Ok((200, obj));
        }
        let mut marked = obj.clone();
        let g = if pod_graceful {
            grace.unwrap_or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(30)
            })
        } else {
            0
        };
        let ts = if pod_graceful {
            meta::format_time(time::OffsetDateTime::now_utc() + time::Duration::seconds(g))
        } else {
            meta::now_rfc3339()
        };
        if let Some(m) = meta::metadata_mut(&mut marked) {
            m.insert("deletionTimestamp".into(), json!(ts));
            m.insert("deletionGracePeriodSeconds".into(), json!(g));
            m.remove("resourceVersion");
            if propagation_finalizer.is_some() {
                m.insert("finalizers".into(), json!(finalizers));
            }
        }
        if r.kind == "Namespace" {
            marked["status"] = json!({"phase": "Terminating"});
        }
        if dry {
            return Ok((200, marked));
        }
        let stored = match st
            .store
            .update(&key, encode(&mut marked), kv.mod_revision)
            .await
        {
            Ok(kv) => stored(marked, &kv),
            Err(StoreError::Conflict { .. }) => return Err(ApiError::conflict(r, name)),
            Err(e) => return Err(store_err(e)),
        };
        if r.kind == "Namespace" {
            let st2 = StoreHandle(st.store.clone());
            let ns = name.to_string();
            tokio::spawn(async move { st2.finalize_namespace(ns).await });
        }
        return Ok((200, stored));
    }
    if dry {
        return Ok((200, obj));
    }
    match st.store.delete(&key, Some(kv.mod_revision)).await {
        Ok((rev, _)) => {
            let mut out = obj;
            if let Some(m) = meta::metadata_mut(&mut out) {
                m.insert("resourceVersion".into(), json!(rev.to_string()));
            }
            Ok((200, out))
        }
        Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(r, name)),
        Err(StoreError::NotFound { .. }) => Err(ApiError::not_found(r, name)),
        Err(e) => Err(store_err(e)),
    }
}

/// A store handle used by background tasks (namespace finalization).
struct StoreHandle(Arc<dyn skiff_store::Store>);

impl StoreHandle {
    /// Deletes every object in namespace `ns`, then the namespace itself (the work kube's
    /// namespace controller does; skiff has no controllers yet).
    async fn finalize_namespace(self, ns: String) {
        for r in RESOURCES
            .iter()
            .filter(|r| r.namespaced && r.is_persisted())
        {
            if r.group == "events.k8s.io" {
                continue;
            }
            let prefix = format!("{}{}/", r.key_prefix(), ns);
            let kvs = match self
                .0
                .range(RangeRequest {
                    prefix,
                    ..Default::default()
                })
                .await
            {
                Ok(resp) => resp.kvs,
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, "namespace cleanup: listing failed");
                    return;
                }
            };
            for kv in kvs {
                if let Err(e) = self.0.delete(&kv.key, None).await {
                    tracing::debug!(key = %kv.key, error = %e, "namespace cleanup: delete failed");
                }
            }
        }
        if let Some(nsr) = find("", "v1", "namespaces")
            && let Err(e) = self.0.delete(&nsr.key(None, &ns), None).await
        {
            tracing::warn!(namespace = %ns, error = %e, "namespace cleanup: removing namespace failed");
        }
    }
}

/// Parsed list options.
pub(crate) struct ListOpts {
    pub labels: skiff_api::selector::LabelSelector,
    pub fields: skiff_api::selector::FieldSelector,
}

pub(crate) fn list_opts(r: &ResourceInfo, q: &Q) -> Result<ListOpts, ApiError> {
    let labels = skiff_api::selector::LabelSelector::parse(
        q.get("labelSelector").map(String::as_str).unwrap_or(""),
    )
    .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields = skiff_api::selector::FieldSelector::parse(
        q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        r.kind,
    )
    .map_err(ApiError::bad_request)?;
    Ok(ListOpts { labels, fields })
}

impl ListOpts {
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// No selector: every object matches.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
}

pub(crate) fn list_prefix(t: &Target) -> String {
    match t.ns.as_deref() {
        Some(ns) if t.r.namespaced => format!("{}{}/", t.r.key_prefix(), ns),
        _ => t.r.key_prefix(),
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Lists objects. Returns (items, list resourceVersion, continue token, remaining count).
pub(crate) async fn list_items(
    st: &ApiState,
    t: &Target,
    q: &Q,
) -> Result<(Vec<Value>, i64, Option<String>), ApiError> {
    let opts = list_opts(t.r, q)?;
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let prefix = list_prefix(t);
    let (mut start_after, mut revision) = (None, None);
    if let Some(c) = q.get("continue").filter(|c| !c.is_empty()) {
        let decoded = unhex(c).ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        let (rv, key) = decoded
            .split_once('|')
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        revision = Some(
            rv.parse::<i64>()
                .map_err(|_| ApiError::bad_request("continue key is not valid"))?,
        );
        start_after = Some(key.to_string());
    } else if let Some(rv) = q
        .get("resourceVersion")
        .filter(|s| !s.is_empty() && *s != "0")
    {
        let n: i64 = rv
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?;
        let current = st.store.current_revision().await.map_err(store_err)?;
        match q.get("resourceVersionMatch").map(String::as_str) {
            Some("Exact") => revision = Some(n),
            _ => {
                if n > current {
                    return Err(ApiError::timeout(format!(
                        "Too large resource version: {n}, current: {current}"
                    )));
                }
            }
        }
    }
    let mut items = Vec::new();
    loop {
        let want = if limit > 0 {
            Some((limit - items.len()).max(1))
        } else {
            None
        };
        let resp = st
            .store
            .range(RangeRequest {
                prefix: prefix.clone(),
                start_after: start_after.clone(),
                limit: want,
                revision,
            })
            .await
            .map_err(|e| match e {
                StoreError::Compacted { .. } if q.contains_key("continue") => {
                    ApiError::continue_expired()
                }
                e => store_err(e),
            })?;
        let read_rev = resp.revision;
        revision = Some(resp.revision);
        let last = resp.kvs.last().map(|kv| kv.key.clone());
        for kv in &resp.kvs {
            let obj = decode(kv)?;
            if opts.matches(&obj) {
                items.push(obj);
            }
        }
        if !resp.more {
            return Ok((items, read_rev, None));
        }
        start_after = last;
        if limit > 0 && items.len() >= limit {
            let token = start_after
                .as_ref()
                .map(|k| hex(&format!("{read_rev}|{k}")));
            return Ok((items, read_rev, token));
        }
        if start_after.is_none() {
            return Ok((items, read_rev, None));
        }
    }
}

async fn list(st: &ApiState, t: &Target, q: &Q, out: Output) -> Result<Response, ApiError> {
    let (items, rev, cont) = list_items(st, t, q).await?;
    let mut md = json!({"resourceVersion": rev.to_string()});
    if let Some(c) = &cont {
        md["continue"] = json!(c);
    }
    let r = t.r;
    let body = match out {
        Output::Json => {
            json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": md, "items": items})
        }
        Output::Metadata => {
            json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": md, "items": items.iter().map(partial).collect::<Vec<_>>()})
        }
        Output::Table => {
            let now = time::OffsetDateTime::now_utc();
            let include = q
                .get("includeObject")
                .map(String::as_str)
                .unwrap_or("Metadata");
            json!({
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": md,
                "columnDefinitions": table::column_definitions(r.group, r.kind),
                "rows": items.iter().map(|o| table::row(r.group, r.kind, o, include, now)).collect::<Vec<_>>(),
            })
        }
    };
    Ok(json_response(200, &body))
}

async fn delete_collection(st: &ApiState, t: &Target, q: &Q) -> Result<Response, ApiError> {
    let mut q2 = q.clone();
    q2.remove("limit");
    q2.remove("continue");
    let (items, _, _) = list_items(st, t, &q2).await?;
    let mut deleted = Vec::new();
    for obj in items {
        let name = meta::name(&obj).to_string();
        let ns = meta::namespace(&obj).map(str::to_string);
        let t2 = Target {
            r: t.r,
            ns,
            name: None,
            sub: None,
        };
        match delete(st, &t2, &name, &json!({}), q).await {
            Ok((_, v)) => deleted.push(v),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let r = t.r;
    Ok(json_response(
        200,
        &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": {}, "items": deleted}),
    ))
}

fn scale_of(obj: &Value) -> Value {
    let sel = obj.pointer("/spec/selector").map(|s| {
        if s.get("matchLabels").is_some() || s.get("matchExpressions").is_some() {
            skiff_api::validation::selector_from_object(s)
                .map(|ls| {
                    ls.0.iter()
                        .map(|r| match r {
                            skiff_api::selector::Requirement::In(k, v) if v.len() == 1 => {
                                format!("{k}={}", v[0])
                            }
                            skiff_api::selector::Requirement::In(k, v) => {
                                format!("{k} in ({})", v.join(","))
                            }
                            skiff_api::selector::Requirement::NotIn(k, v) => {
                                format!("{k} notin ({})", v.join(","))
                            }
                            skiff_api::selector::Requirement::Exists(k) => k.clone(),
                            skiff_api::selector::Requirement::NotExists(k) => format!("!{k}"),
                            skiff_api::selector::Requirement::Gt(k, n) => format!("{k}>{n}"),
                            skiff_api::selector::Requirement::Lt(k, n) => format!("{k}<{n}"),
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        } else {
            // ReplicationController: a plain map.
            s.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        }
    });
    let md = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": md.get("name"),
            "namespace": md.get("namespace"),
            "uid": md.get("uid"),
            "resourceVersion": md.get("resourceVersion"),
            "creationTimestamp": md.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": sel.unwrap_or_default()},
    })
}

async fn write_scale(
    st: &ApiState,
    t: &Target,
    name: &str,
    scale: &Value,
    q: &Q,
) -> Result<Value, ApiError> {
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if replicas < 0 {
        return Err(ApiError::invalid(
            t.r,
            name,
            &[skiff_api::Cause::invalid(
                "spec.replicas",
                &replicas.to_string(),
                "must be greater than or equal to 0",
            )],
        ));
    }
    let mut obj = get_obj(st, t, name).await?;
    if let Some(rv) = meta::resource_version(scale)
        && meta::resource_version(&obj) != Some(rv)
    {
        return Err(ApiError::conflict(t.r, name));
    }
    obj["spec"]["replicas"] = json!(replicas);
    let (_, stored) = update(st, t, name, obj, q, Mode::Main).await?;
    Ok(scale_of(&stored))
}

async fn subresource(
    st: &ApiState,
    t: &Target,
    sub: &str,
    req: Request,
    q: &Q,
) -> Result<Response, ApiError> {
    let name = t.name.clone().unwrap_or_default();
    let method = req.method().clone();
    let r = t.r;
    match (sub, method) {
        ("status" | "approval" | "finalize", Method::GET) => {
            Ok(json_response(200, &get_obj(st, t, &name).await?))
        }
        ("status" | "approval", Method::PUT) => {
            let (ct, body) = read_body(req).await?;
            let obj = parse_object(&ct, &body)?;
            let (code, v) = update(st, t, &name, obj, q, Mode::Status).await?;
            Ok(json_response(code, &v))
        }
        ("status" | "approval", Method::PATCH) => {
            let (ct, body) = read_body(req).await?;
            let v = patch(st, t, &name, &ct, &body, q, Mode::Status).await?;
            Ok(json_response(200, &v))
        }
        ("finalize", Method::PUT) => {
            let (ct, body) = read_body(req).await?;
            let new = parse_object(&ct, &body)?;
            let mut obj = get_obj(st, t, &name).await?;
            obj["spec"]["finalizers"] = new
                .pointer("/spec/finalizers")
                .cloned()
                .unwrap_or(json!([]));
            let (code, v) = update(st, t, &name, obj, q, Mode::Main).await?;
            Ok(json_response(code, &v))
        }
        ("scale", Method::GET) => Ok(json_response(200, &scale_of(&get_obj(st, t, &name).await?))),
        ("scale", Method::PUT) => {
            let (ct, body) = read_body(req).await?;
            let scale = parse_object(&ct, &body)?;
            Ok(json_response(
                200,
                &write_scale(st, t, &name, &scale, q).await?,
            ))
        }
        ("scale", Method::PATCH) => {
            let (ct, body) = read_body(req).await?;
            let current = scale_of(&get_obj(st, t, &name).await?);
            let mut patched = apply_patch(&ct, &body, &current)?;
            if let Some(m) = meta::metadata_mut(&mut patched) {
                m.remove("resourceVersion");
            }
            Ok(json_response(
                200,
                &write_scale(st, t, &name, &patched, q).await?,
            ))
        }
        ("binding", Method::POST) => {
            let (ct, body) = read_body(req).await?;
            let b = parse_object(&ct, &body)?;
            let node = b
                .pointer("/target/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if node.is_empty() {
                return Err(ApiError::invalid(
                    r,
                    &name,
                    &[skiff_api::Cause::required("target.name", "")],
                ));
            }
            let pod_name = if name.is_empty() {
                meta::name(&b).to_string()
            } else {
                name.clone()
            };
            let kv = get_kv(st, t, &pod_name).await?;
            let current = decode(&kv)?;
            if let Some(existing) = current
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                return Err(ApiError::conflict_msg(
                    r,
                    &pod_name,
                    &format!("pod {pod_name} is already assigned to node \"{existing}\""),
                ));
            }
            let mut pod = current.clone();
            pod["spec"]["nodeName"] = json!(node);
            update_from(st, t, &pod_name, pod, q, Mode::Main, Some((kv, current))).await?;
            Ok(json_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        ("eviction", Method::POST) => {
            let (_, body) = read_body(req).await?;
            let ev: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
            if ev
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty() && n != name)
            {
                return Err(ApiError::bad_request(
                    "name in URL does not match name in Eviction object",
                ));
            }
            let opts = ev.get("deleteOptions").cloned().unwrap_or(json!({}));
            evict(st, t, &name, &opts, q).await?;
            Ok(json_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        ("log" | "exec" | "attach" | "portforward", _) => {
            let pod = get_obj(st, t, &name).await?;
            let container = q.get("container").map(String::as_str);
            crate::kubelet_proxy::pod_subresource(st, &pod, sub, container, req).await
        }
        ("token", _) => crate::satoken::token_request(st, t, &name, req).await,
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// How often an eviction re-reads the budget after a conflicting write before giving up.
const EVICTION_RETRIES: usize = 5;
/// Most pods a budget's `disruptedPods` may hold (upstream's MaxDisruptedPodSize).
const MAX_DISRUPTED_PODS: usize = 2000;
/// The message of every eviction refused by a disruption budget.
const PDB_VIOLATION: &str = "Cannot evict pod as it would violate the pod's disruption budget.";

/// A 429 refusal naming the budget, as kube-apiserver's eviction REST writes it.
fn too_many_requests(retry_after: u32, cause: String) -> ApiError {
    let mut details = json!({"causes": [{"reason": "DisruptionBudget", "message": cause}]});
    if retry_after > 0 {
        details["retryAfterSeconds"] = json!(retry_after);
    }
    ApiError {
        code: 429,
        reason: "TooManyRequests",
        message: PDB_VIOLATION.into(),
        details: Some(details),
    }
}

/// Whether a PodDisruptionBudget's `spec.selector` selects `labels`: a missing selector selects
/// nothing, an empty one every pod (policy/v1).
fn pdb_selects(sel: Option<&Value>, labels: &serde_json::Map<String, Value>) -> bool {
    let Some(sel) = sel.filter(|s| !s.is_null()) else {
        return false;
    };
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object)
        && ml.iter().any(|(k, v)| get(k) != v.as_str())
    {
        return false;
    }
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e.get("key").and_then(Value::as_str).unwrap_or("");
        let vals: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let got = get(key);
        let ok = match e.get("operator").and_then(Value::as_str).unwrap_or("") {
            "In" => got.is_some_and(|g| vals.contains(&g)),
            "NotIn" => got.is_none_or(|g| !vals.contains(&g)),
            "Exists" => got.is_some(),
            "DoesNotExist" => got.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The reason a budget with no disruptions left gives (kube-apiserver's wording, by the
/// `DisruptionAllowed` condition first).
fn disruption_denied(name: &str, pdb: &Value) -> String {
    let st = |k: &str| {
        pdb.pointer(&format!("/status/{k}"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    let (desired, current) = (st("desiredHealthy"), st("currentHealthy"));
    let cond = pdb
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "DisruptionAllowed"));
    let cstr = |k: &str| {
        cond.and_then(|c| c.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let false_with_msg = cond.is_some() && cstr("status") == "False" && !cstr("message").is_empty();
    if false_with_msg && cstr("reason") == "SyncFailed" {
        format!(
            "The disruption budget {name} does not allow evicting pods currently because it failed sync: {}",
            cstr("message")
        )
    } else if current <= desired {
        format!(
            "The disruption budget {name} needs {desired} healthy pods and has {current} currently"
        )
    } else if false_with_msg {
        format!(
            "The disruption budget {name} does not allow evicting pods currently ({}): {}",
            cstr("reason"),
            cstr("message")
        )
    } else {
        format!("The disruption budget {name} does not allow evicting pods currently")
    }
}

/// Whether the pod's Ready condition is True.
fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// `pods/eviction`: deletes the pod unless the one PodDisruptionBudget that selects it has no
/// disruption left; otherwise records the disruption in the budget's status (compare-and-swap,
/// retried on conflict) and deletes the pod with the Eviction's deleteOptions.
async fn evict(st: &ApiState, t: &Target, name: &str, opts: &Value, q: &Q) -> Result<(), ApiError> {
    let dry = dry_run(q)
        || opts
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v == "All"));
    let Some(pdb_r) = find("policy", "v1", "poddisruptionbudgets") else {
        delete(st, t, name, opts, q).await?;
        return Ok(());
    };
    let pdbs_t = Target {
        r: pdb_r,
        ns: t.ns.clone(),
        name: None,
        sub: None,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let pod = get_obj(st, t, name).await?;
        let phase = pod
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("");
        // Pods that are not running (or already going) do not count against any budget.
        if matches!(phase, "Succeeded" | "Failed" | "Pending" | "")
            || meta::meta_str(&pod, "deletionTimestamp").is_some()
        {
            break;
        }
        let empty = serde_json::Map::new();
        let labels = pod
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let resp = st
            .store
            .range(RangeRequest {
                prefix: list_prefix(&pdbs_t),
                ..Default::default()
            })
            .await
            .map_err(store_err)?;
        let mut matching = Vec::new();
        for kv in &resp.kvs {
            let pdb = decode(kv)?;
            if pdb_selects(pdb.pointer("/spec/selector"), labels) {
                matching.push(pdb);
            }
        }
        if matching.len() > 1 {
            return Err(ApiError::internal(
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        let Some(mut pdb) = matching.pop() else {
            break;
        };
        let pdb_name = meta::name(&pdb).to_string();
        let stat = |k: &str| {
            pdb.pointer(&format!("/status/{k}"))
                .and_then(Value::as_i64)
                .unwrap_or(0)
        };
        // A pod that is not Ready may go without using the budget: always under
        // AlwaysAllow, and under IfHealthyBudget (the default) while the budget is met.
        if !pod_ready(&pod) {
            let policy = pdb
                .pointer("/spec/unhealthyPodEvictionPolicy")
                .and_then(Value::as_str)
                .unwrap_or("IfHealthyBudget");
            if policy == "AlwaysAllow"
                || (stat("currentHealthy") >= stat("desiredHealthy") && stat("desiredHealthy") > 0)
            {
                break;
            }
        }
        let generation = pdb
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if stat("observedGeneration") < generation {
            return Err(too_many_requests(
                10,
                format!("The disruption budget {pdb_name} is still being processed by the server."),
            ));
        }
        let allowed = stat("disruptionsAllowed");
        if allowed < 0 {
            return Err(ApiError::forbidden(
                pdb_r,
                &pdb_name,
                "pdb disruptions allowed is negative",
            ));
        }
        let disrupted = pdb
            .pointer("/status/disruptedPods")
            .and_then(Value::as_object)
            .map_or(0, serde_json::Map::len);
        if disrupted > MAX_DISRUPTED_PODS {
            return Err(ApiError::forbidden(
                pdb_r,
                &pdb_name,
                "DisruptedPods map too big - too many evictions not confirmed by PDB controller",
            ));
        }
        if allowed == 0 {
            return Err(too_many_requests(0, disruption_denied(&pdb_name, &pdb)));
        }
        if dry {
            break;
        }
        pdb["status"]["disruptionsAllowed"] = json!(allowed - 1);
        if allowed - 1 == 0
            && let Some(cs) = pdb
                .pointer_mut("/status/conditions")
                .and_then(Value::as_array_mut)
        {
            for c in cs.iter_mut().filter(|c| c["type"] == "DisruptionAllowed") {
                if c["status"] != "False" {
                    c["lastTransitionTime"] = json!(meta::now_rfc3339());
                }
                c["status"] = json!("False");
                c["reason"] = json!("InsufficientPods");
                c["message"] = json!("");
            }
        }
        if !pdb["status"]["disruptedPods"].is_object() {
            pdb["status"]["disruptedPods"] = json!({});
        }
        pdb["status"]["disruptedPods"][name] = json!(meta::now_rfc3339());
        let one = Target {
            r: pdb_r,
            ns: t.ns.clone(),
            name: Some(pdb_name.clone()),
            sub: Some("status".into()),
        };
        match update(st, &one, &pdb_name, pdb, &Q::new(), Mode::Status).await {
            Ok(_) => break,
            Err(e) if e.code == 409 && attempt < EVICTION_RETRIES => continue,
            Err(e) if e.code == 409 => {
                return Err(too_many_requests(
                    10,
                    format!(
                        "The disruption budget {pdb_name} is still being processed by the server."
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    // A resourceVersion precondition names the pod as the client saw it: leave it unchanged.
    if !dry && opts.pointer("/preconditions/resourceVersion").is_none() {
        mark_disruption_target(st, t, name).await;
    }
    delete(st, t, name, opts, q).await?;
    Ok(())
}

/// Sets the pod's `DisruptionTarget` condition before an eviction deletes it, as
/// kube-apiserver does (best effort: a failure here does not stop the eviction).
async fn mark_disruption_target(st: &ApiState, t: &Target, name: &str) {
    let Ok(mut pod) = get_obj(st, t, name).await else {
        return;
    };
    if meta::meta_str(&pod, "deletionTimestamp").is_some() {
        return;
    }
    let cond = json!({"type": "DisruptionTarget", "status": "True",
        "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting",
        "lastTransitionTime": meta::now_rfc3339()});
    if !pod["status"].is_object() {
        pod["status"] = json!({});
    }
    if !pod["status"]["conditions"].is_array() {
        pod["status"]["conditions"] = json!([]);
    }
    let Some(conds) = pod["status"]["conditions"].as_array_mut() else {
        return;
    };
    match conds.iter_mut().find(|c| c["type"] == "DisruptionTarget") {
        Some(c) if c["status"] == "True" => return,
        Some(c) => *c = cond,
        None => conds.push(cond),
    }
    if let Err(e) = update(st, t, name, pod, &Q::new(), Mode::Status).await {
        tracing::debug!(pod = %name, error = %e, "could not set the DisruptionTarget condition");
    }
}

/// Assigns `spec.clusterIP` (from the service CIDR) and node ports (30000-32767) to a new Service.
pub(crate) async fn allocate_service(st: &ApiState, svc: &mut Value) -> Result<(), ApiError> {
    let Some(r) = find("", "v1", "services") else {
        return Ok(());
    };
    let t = svc
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if t == "ExternalName" {
        return Ok(());
    }
    let resp = st
        .store
        .range(RangeRequest {
            prefix: r.key_prefix(),
            ..Default::default()
        })
        .await
        .map_err(store_err)?;
    let mut used_ips = std::collections::HashSet::new();
    let mut used_ports = std::collections::HashSet::new();
    for kv in &resp.kvs {
        if let Ok(o) = serde_json::from_slice::<Value>(&kv.value) {
            if let Some(ip) = o.pointer("/spec/clusterIP").and_then(Value::as_str) {
                used_ips.insert(ip.to_string());
            }
            for p in o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                if let Some(n) = p.get("nodePort").and_then(Value::as_i64) {
                    used_ports.insert(n);
                }
            }
        }
    }
    let want = svc
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if want.is_empty() {
        let mut chosen = None;
        for i in 2u32.. {
            if i == 10 {
                continue;
            }
            let Some(ip) = st.config.service_ip(i) else {
                break;
            };
            if !used_ips.contains(&ip) {
                chosen = Some(ip);
                break;
            }
        }
        let ip = chosen
            .ok_or_else(|| ApiError::internal("failed to allocate a service IP: range is full"))?;
        svc["spec"]["clusterIP"] = json!(ip);
        svc["spec"]["clusterIPs"] = json!([ip]);
    } else if want != "None" {
        if used_ips.contains(&want) {
            return Err(ApiError::invalid(
                r,
                meta::name(svc),
                &[skiff_api::Cause::invalid(
                    "spec.clusterIPs",
                    &want,
                    "failed to allocate IP: provided IP is already allocated",
                )],
            ));
        }
        svc["spec"]["clusterIPs"] = json!([want]);
    } else {
        svc["spec"]["clusterIPs"] = json!(["None"]);
    }
    if (t == "NodePort" || t == "LoadBalancer")
        && let Some(ports) = svc.pointer_mut("/spec/ports").and_then(Value::as_array_mut)
    {
        let mut next = 30000;
        for p in ports.iter_mut() {
            if p.get("nodePort").and_then(Value::as_i64).is_some() {
                continue;
            }
            while used_ports.contains(&next) && next <= 32767 {
                next += 1;
            }
            if next > 32767 {
                return Err(ApiError::internal(
                    "failed to allocate a node port: range is full",
                ));
            }
            p["nodePort"] = json!(next);
            used_ports.insert(next);
        }
    }
    Ok(())
}
