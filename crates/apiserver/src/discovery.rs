//! Discovery (`/api`, `/apis`, group and resource lists, aggregated discovery v2/v2beta1),
//! `/version`, health endpoints and the OpenAPI v3 documents.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use serde_json::{Value, json};
use skiff_api::ApiError;
use skiff_api::resources::{RESOURCES, ResourceInfo, groups, resources_of};

use crate::ApiState;
use crate::http_util::{accept, error_response, json_response, json_response_ct, text_response};

/// The Kubernetes version skiff implements.
pub const K8S_MAJOR: &str = "1";
/// Minor version.
pub const K8S_MINOR: &str = "35";

pub fn version() -> Response {
    json_response(
        200,
        &json!({
            "major": K8S_MAJOR,
            "minor": K8S_MINOR,
            "emulationMajor": K8S_MAJOR,
            "emulationMinor": K8S_MINOR,
            "minCompatibilityMajor": K8S_MAJOR,
            "minCompatibilityMinor": "34",
            "gitVersion": format!("v{K8S_MAJOR}.{K8S_MINOR}.0+skiff"),
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2026-11-01T00:00:00Z",
            "goVersion": "rust",
            "compiler": "rustc",
            "platform": format!("linux/{}", match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a }),
        }),
    )
}

pub async fn health(st: &Arc<ApiState>, verbose: bool, which: &str, rest: &[&str]) -> Response {
    let store_ok = st.store.current_revision().await.is_ok();
    let checks = [
        ("ping", true),
        ("etcd", store_ok),
        ("poststarthook/bootstrap-namespaces", true),
    ];
    if let Some(check) = rest.first() {
        let name = rest.join("/");
        return match checks.iter().find(|(n, _)| *n == name || *n == *check) {
            Some((_, true)) => text_response(200, "ok".into()),
            Some((_, false)) => text_response(500, format!("internal server error: {name} failed")),
            None => error_response(&ApiError::path_not_found()),
        };
    }
    let all_ok = checks.iter().all(|(_, ok)| *ok);
    if verbose {
        let mut out = String::new();
        for (n, ok) in checks {
            out.push_str(&format!(
                "[{}]{n} {}\n",
                if ok { "+" } else { "-" },
                if ok { "ok" } else { "failed" }
            ));
        }
        out.push_str(&format!(
            "{which} check {}\n",
            if all_ok { "passed" } else { "failed" }
        ));
        return text_response(if all_ok { 200 } else { 500 }, out);
    }
    if all_ok {
        text_response(200, "ok".into())
    } else {
        text_response(
            500,
            format!("[-]etcd failed: reason withheld\n{which} check failed\n"),
        )
    }
}

fn wants_aggregated(req: &Request) -> Option<&'static str> {
    for part in accept(req).split(',') {
        let p = part.replace(' ', "").to_ascii_lowercase();
        if p.contains("g=apidiscovery.k8s.io") && p.contains("as=apigroupdiscoverylist") {
            if p.contains("v=v2beta1") {
                return Some("v2beta1");
            }
            if p.contains("v=v2;") || p.ends_with("v=v2") {
                return Some("v2");
            }
        }
    }
    None
}

fn resource_entry(r: &ResourceInfo) -> Value {
    let mut v = json!({
        "name": r.resource,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": r.verbs,
    });
    if !r.short_names.is_empty() {
        v["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        v["categories"] = json!(r.categories);
    }
    v
}

pub fn resource_list(group: &str, version: &str) -> Response {
    let mut list = Vec::new();
    for r in resources_of(group, version) {
        list.push(resource_entry(r));
        for s in r.subresources {
            let mut e = json!({
                "name": format!("{}/{}", r.resource, s.name),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": if s.kind.is_empty() { r.kind } else { s.kind },
                "verbs": s.verbs,
            });
            if !s.group.is_empty() {
                e["group"] = json!(s.group);
                e["version"] = json!(s.version);
            }
            list.push(e);
        }
    }
    if list.is_empty() {
        return error_response(&ApiError::path_not_found());
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}

fn group_entry(g: &str, versions: &[&str]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({"name": g, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

pub fn api_group(g: &str) -> Response {
    match groups().into_iter().find(|(name, _)| *name == g) {
        Some((name, vs)) => {
            let mut e = group_entry(name, &vs);
            e["kind"] = json!("APIGroup");
            e["apiVersion"] = json!("v1");
            json_response(200, &e)
        }
        None => error_response(&ApiError::path_not_found()),
    }
}

fn aggregated_resource(r: &ResourceInfo) -> Value {
    let mut v = json!({
        "resource": r.resource,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": r.verbs,
    });
    if !r.short_names.is_empty() {
        v["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        v["categories"] = json!(r.categories);
    }
    let subs: Vec<Value> = r
        .subresources
        .iter()
        .map(|s| {
            json!({
                "subresource": s.name,
                "responseKind": {
                    "group": if s.group.is_empty() { r.group } else { s.group },
                    "version": if s.version.is_empty() { r.version } else { s.version },
                    "kind": if s.kind.is_empty() { r.kind } else { s.kind },
                },
                "verbs": s.verbs,
            })
        })
        .collect();
    if !subs.is_empty() {
        v["subresources"] = json!(subs);
    }
    v
}

fn aggregated(version: &str, core: bool) -> Response {
    let group_list: Vec<(&str, Vec<&str>)> = if core {
        vec![("", vec!["v1"])]
    } else {
        groups()
    };
    let items: Vec<Value> = group_list
        .iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| {
                    let res: Vec<Value> = RESOURCES
                        .iter()
                        .filter(|r| r.group == *g && r.version == *v)
                        .map(aggregated_resource)
                        .collect();
                    json!({"version": v, "resources": res, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": versions})
        })
        .collect();
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    });
    let mut r = json_response_ct(
        200,
        &body,
        &format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"),
    );
    r.headers_mut()
        .insert("Vary", http::HeaderValue::from_static("Accept"));
    r
}

pub fn api_versions(st: &Arc<ApiState>, req: &Request) -> Response {
    if let Some(v) = wants_aggregated(req) {
        return aggregated(v, true);
    }
    let addr = if st.config.advertise_address.is_empty() {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1:6443")
            .to_string()
    } else {
        st.config.advertise_address.clone()
    };
    json_response(
        200,
        &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]}),
    )
}

pub fn api_groups(req: &Request) -> Response {
    if let Some(v) = wants_aggregated(req) {
        return aggregated(v, false);
    }
    let gs: Vec<Value> = groups().iter().map(|(g, vs)| group_entry(g, vs)).collect();
    json_response(
        200,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs}),
    )
}

fn gv_path(g: &str, v: &str) -> String {
    if g.is_empty() {
        format!("api/{v}")
    } else {
        format!("apis/{g}/{v}")
    }
}

fn openapi_gv(g: &str, v: &str) -> Value {
    let (defs, roots) = crate::schemas::components();
    let mut paths = serde_json::Map::new();
    for r in resources_of(g, v) {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let base = if r.namespaced {
            format!("/{}/namespaces/{{namespace}}/{}", gv_path(g, v), r.resource)
        } else {
            format!("/{}/{}", gv_path(g, v), r.resource)
        };
        let params = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
        let schema = match crate::schemas::schema_name(&roots, r.group, r.version, r.kind) {
            Some(n) => json!({"$ref": format!("#/components/schemas/{n}")}),
            None => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        };
        let op = |verb: &str, content: &[&str]| {
            let mut body = serde_json::Map::new();
            for c in content {
                body.insert((*c).to_string(), json!({"schema": schema}));
            }
            json!({
                "operationId": format!("{verb}{}", r.kind),
                "parameters": params,
                "requestBody": {"content": body},
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": schema}}}},
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let json_only = ["application/json"];
        if r.is_persisted() {
            paths.insert(base.clone(), json!({"post": op("post", &json_only)}));
            // Strategic merge patch is not advertised here: clients then compute it from their
            // compiled-in type information, which carries the list merge keys.
            paths.insert(
                format!("{base}/{{name}}"),
                json!({"put": op("put", &json_only), "patch": op("patch", &["application/json-patch+json", "application/merge-patch+json"])}),
            );
        } else {
            paths.insert(base, json!({"post": op("post", &json_only)}));
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{K8S_MAJOR}.{K8S_MINOR}.0+skiff")},
        "paths": paths,
        "components": {"schemas": defs},
    })
}

pub fn openapi(rest: &[&str], req: &Request) -> Response {
    let acc = accept(req);
    let json_ok = acc.is_empty() || acc.contains("json") || acc.contains("*/*");
    match rest {
        // Swagger 2.0 as JSON when JSON is acceptable; a protobuf-only Accept (kubectl,
        // client-go) gets the minimal gnostic stub: see `openapi_v2` for why.
        ["v2"] if json_ok => {
            let mut r = axum::response::IntoResponse::into_response(crate::openapi_v2::json_body());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        ["v2"] if acc.contains("protobuf") => {
            let mut r =
                axum::response::IntoResponse::into_response(crate::proto::openapi_v2_stub());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                ),
            );
            r
        }
        ["v2"] => error_response(&ApiError::not_acceptable(
            "only application/json and application/com.github.proto-openapi.spec.v2@v1.0+protobuf are served for OpenAPI v2",
        )),
        ["v3"] => {
            let mut paths = serde_json::Map::new();
            paths.insert(
                "api/v1".into(),
                json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=skiff1"}),
            );
            for (g, vs) in groups() {
                for v in vs {
                    let p = gv_path(g, v);
                    paths.insert(
                        p.clone(),
                        json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=skiff1")}),
                    );
                }
            }
            json_response(200, &json!({"paths": paths}))
        }
        ["v3", "api", v] | ["v3", "apis", "", v] if json_ok => respond_gv("", v),
        ["v3", "apis", g, v] if json_ok => respond_gv(g, v),
        ["v3", ..] => error_response(&ApiError::not_acceptable(
            "only application/json is served for OpenAPI v3",
        )),
        _ => error_response(&ApiError::path_not_found()),
    }
}

fn respond_gv(g: &str, v: &str) -> Response {
    if resources_of(g, v).next().is_none() {
        return error_response(&ApiError::path_not_found());
    }
    json_response(200, &openapi_gv(g, v))
}
