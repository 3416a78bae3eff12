//! `/openapi/v2`: a Swagger 2.0 document built from the same k8s-openapi schemas as
//! `/openapi/v3` (`schemas::components`): every definition under `#/definitions/...` (v3 refs
//! rewritten, a lone `allOf: [$ref]` flattened to `$ref` beside its description, as
//! kube-apiserver writes it), root kinds tagged with `x-kubernetes-group-version-kind`, list
//! fields tagged with `x-kubernetes-patch-merge-key`/`-strategy` from the strategic merge patch
//! table (`skiff_api::smp::list_strategy`), and a post/put/patch path per resource with its
//! query parameters (`fieldValidation` among them).
//!
//! Built once, on the first request, and kept as serialized JSON (a few MB; servers nobody asks
//! never pay for it). It is served as JSON when the Accept header allows JSON. kubectl and
//! client-go ask only for gnostic protobuf (`application/com.github.proto-openapi.spec.v2@v1.0+
//! protobuf`); to those the minimal protobuf stub (`proto::openapi_v2_stub`) is still sent: a
//! 406 would make client-go's `OpenAPISchema()` fail (it then tries `/swagger-2.0.0.pb-v1`), and
//! with an empty document kubectl falls back to its compiled-in types for strategic merge
//! patches and to OpenAPI v3 for `explain`, which are complete.

use std::collections::HashSet;
use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use skiff_api::resources::{RESOURCES, ResourceInfo};
use skiff_api::smp::{ListStrategy, list_strategy};

use crate::discovery::{K8S_MAJOR, K8S_MINOR};

const V3_PREFIX: &str = "#/components/schemas/";

/// Rewrites one v3 schema (recursively) into Swagger 2.0 form.
fn to_v2(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => {
                        let name = r.strip_prefix(V3_PREFIX).unwrap_or(r);
                        out.insert(k.clone(), json!(format!("#/definitions/{name}")));
                    }
                    // A single `allOf` around a `$ref` (schemars' way of giving a ref a
                    // description): Swagger 2.0 documents write the `$ref` itself.
                    ("allOf", Value::Array(a)) if a.len() == 1 && a[0].get("$ref").is_some() => {
                        if let Value::Object(inner) = to_v2(&a[0]) {
                            out.extend(inner);
                        }
                    }
                    // OpenAPI 3 only.
                    ("nullable" | "oneOf" | "anyOf", _) => {}
                    _ => {
                        out.insert(k.clone(), to_v2(x));
                    }
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(to_v2).collect()),
        other => other.clone(),
    }
}

fn def_of(schema: &Value) -> Option<&str> {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/definitions/"))
}

/// Tags the list properties reachable from `def` (reached by `path` from a kind's root) with
/// their strategic merge patch strategy.
fn tag_lists(
    defs: &mut Map<String, Value>,
    def: &str,
    path: &mut Vec<String>,
    seen: &mut HashSet<(String, String)>,
) {
    // `list_strategy` looks at a list's name and its parent's name only, so a definition needs
    // one visit per name of the field that led to it (not one per full path).
    let via = path.last().cloned().unwrap_or_default();
    if path.len() > 24 || !seen.insert((def.to_string(), via)) {
        return;
    }
    let props: Vec<(String, Value)> = match defs
        .get(def)
        .and_then(|d| d.get("properties"))
        .and_then(Value::as_object)
    {
        Some(p) => p.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        None => return,
    };
    for (name, prop) in props {
        path.push(name.clone());
        if prop.get("type").and_then(Value::as_str) == Some("array") {
            let ext = match list_strategy(path) {
                ListStrategy::MergeKey(key) => Some((Some(key), "merge")),
                ListStrategy::MergePrimitive => Some((None, "merge")),
                ListStrategy::Replace => None,
            };
            if let Some((key, strategy)) = ext
                && let Some(p) = defs
                    .get_mut(def)
                    .and_then(|d| d.get_mut("properties"))
                    .and_then(|p| p.get_mut(&name))
                    .and_then(Value::as_object_mut)
            {
                p.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
                if let Some(k) = key {
                    p.insert("x-kubernetes-patch-merge-key".into(), json!(k));
                }
            }
            if let Some(d) = prop.get("items").and_then(def_of) {
                tag_lists(defs, d, path, seen);
            }
        } else if let Some(d) = def_of(&prop) {
            tag_lists(defs, d, path, seen);
        } else if let Some(d) = prop.get("additionalProperties").and_then(def_of) {
            tag_lists(defs, d, path, seen);
        }
        path.pop();
    }
}

fn gv_path(r: &ResourceInfo) -> String {
    if r.group.is_empty() {
        format!("/api/{}", r.version)
    } else {
        format!("/apis/{}/{}", r.group, r.version)
    }
}

fn paths(roots: &[crate::schemas::Root]) -> Map<String, Value> {
    let mut out = Map::new();
    for r in RESOURCES {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let schema = match crate::schemas::schema_name(roots, r.group, r.version, r.kind) {
            Some(n) => json!({"$ref": format!("#/definitions/{n}")}),
            None => json!({"type": "object"}),
        };
        let query = |name: &str| json!({"name": name, "in": "query", "type": "string", "uniqueItems": true});
        let path_param =
            |name: &str| json!({"name": name, "in": "path", "required": true, "type": "string"});
        let op = |verb: &str, consumes: &[&str]| {
            json!({
                "operationId": format!("{verb}{}", r.kind),
                "consumes": consumes,
                "produces": ["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"],
                "parameters": [
                    {"name": "body", "in": "body", "required": true, "schema": schema},
                    query("dryRun"), query("fieldManager"), query("fieldValidation"),
                ],
                "responses": {"200": {"description": "OK", "schema": schema}},
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let base = if r.namespaced {
            format!("{}/namespaces/{{namespace}}/{}", gv_path(r), r.resource)
        } else {
            format!("{}/{}", gv_path(r), r.resource)
        };
        let mut common = Vec::new();
        if r.namespaced {
            common.push(path_param("namespace"));
        }
        let bodies = [
            "application/json",
            "application/yaml",
            "application/vnd.kubernetes.protobuf",
        ];
        out.insert(
            base.clone(),
            json!({"post": op("post", &bodies), "parameters": common}),
        );
        if r.is_persisted() {
            let mut named = common.clone();
            named.push(path_param("name"));
            out.insert(
                format!("{base}/{{name}}"),
                json!({
                    "put": op("put", &bodies),
                    "patch": op("patch", &[
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/strategic-merge-patch+json",
                        "application/apply-patch+yaml",
                    ]),
                    "parameters": named,
                }),
            );
        }
    }
    out
}

/// The whole document as a JSON value.
pub fn document() -> Value {
    let (defs, roots) = crate::schemas::components();
    let mut defs: Map<String, Value> = defs.iter().map(|(k, v)| (k.clone(), to_v2(v))).collect();
    let mut seen = HashSet::new();
    for (_, _, _, name) in &roots {
        tag_lists(&mut defs, name, &mut Vec::new(), &mut seen);
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": format!("v{K8S_MAJOR}.{K8S_MINOR}.0+skiff")},
        "paths": paths(&roots),
        "definitions": defs,
    })
}

/// The serialized document, built on first use.
pub fn json_body() -> Bytes {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    BODY.get_or_init(|| Bytes::from(serde_json::to_vec(&document()).unwrap_or_default()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_refs_gvk_and_merge_keys() {
        let d = document();
        assert_eq!(d["swagger"], "2.0");
        let text = serde_json::to_string(&d).unwrap_or_default();
        assert!(!text.contains("#/components/"), "v3 refs left");
        let defs = &d["definitions"];
        let dep = &defs["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            dep["x-kubernetes-group-version-kind"],
            json!([{"group": "apps", "version": "v1", "kind": "Deployment"}])
        );
        let strategy = &defs["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]["strategy"];
        assert_eq!(
            strategy["$ref"],
            "#/definitions/io.k8s.api.apps.v1.DeploymentStrategy"
        );
        assert!(strategy["description"].is_string());
        let pod = &defs["io.k8s.api.core.v1.PodSpec"]["properties"];
        assert_eq!(pod["containers"]["x-kubernetes-patch-merge-key"], "name");
        assert_eq!(pod["containers"]["x-kubernetes-patch-strategy"], "merge");
        assert_eq!(
            pod["containers"]["items"]["$ref"],
            "#/definitions/io.k8s.api.core.v1.Container"
        );
        let c = &defs["io.k8s.api.core.v1.Container"]["properties"];
        assert_eq!(c["ports"]["x-kubernetes-patch-merge-key"], "containerPort");
        assert_eq!(
            c["volumeMounts"]["x-kubernetes-patch-merge-key"],
            "mountPath"
        );
        let svc = &defs["io.k8s.api.core.v1.ServiceSpec"]["properties"];
        assert_eq!(svc["ports"]["x-kubernetes-patch-merge-key"], "port");
        assert!(c["command"].get("x-kubernetes-patch-strategy").is_none());
        let post = &d["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments"]["post"];
        assert_eq!(post["parameters"][0]["in"], "body");
        assert_eq!(
            post["parameters"][0]["schema"]["$ref"],
            "#/definitions/io.k8s.api.apps.v1.Deployment"
        );
        let patch = &d["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert!(
            patch["parameters"]
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x["name"] == "fieldValidation"))
        );
    }
}
