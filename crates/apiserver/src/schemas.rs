//! OpenAPI v3 component schemas of the built-in kinds, generated from k8s-openapi's JSON
//! schemas (feature `schemars`) and tagged with `x-kubernetes-group-version-kind`, so that
//! `kubectl explain` works. Generated on demand (a few MB) rather than kept in memory.

use std::collections::HashMap;

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

/// (group, version, kind, schema name) of every kind with a schema.
pub type Root = (&'static str, &'static str, &'static str, String);

macro_rules! roots {
    ($gen:ident, $out:ident; $( $g:literal $v:literal $k:literal => $t:ty ),* $(,)?) => {
        $(
            let _ = $gen.subschema_for::<$t>();
            $out.push(($g, $v, $k, <$t as JsonSchema>::schema_name().into_owned()));
        )*
    };
}

/// All component schemas and the roots (kinds) among them.
pub fn components() -> (Map<String, Value>, Vec<Root>) {
    use k8s_openapi::api as a;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as crd;
    let mut generator = SchemaSettings::openapi3().into_generator();
    let mut out: Vec<Root> = Vec::new();
    roots!(generator, out;
        "" "v1" "Binding" => a::core::v1::Binding,
        "" "v1" "ConfigMap" => a::core::v1::ConfigMap,
        "" "v1" "Endpoints" => a::core::v1::Endpoints,
        "" "v1" "Event" => a::core::v1::Event,
        "" "v1" "LimitRange" => a::core::v1::LimitRange,
        "" "v1" "Namespace" => a::core::v1::Namespace,
        "" "v1" "Node" => a::core::v1::Node,
        "" "v1" "PersistentVolumeClaim" => a::core::v1::PersistentVolumeClaim,
        "" "v1" "PersistentVolume" => a::core::v1::PersistentVolume,
        "" "v1" "Pod" => a::core::v1::Pod,
        "" "v1" "PodTemplate" => a::core::v1::PodTemplate,
        "" "v1" "ReplicationController" => a::core::v1::ReplicationController,
        "" "v1" "ResourceQuota" => a::core::v1::ResourceQuota,
        "" "v1" "Secret" => a::core::v1::Secret,
        "" "v1" "ServiceAccount" => a::core::v1::ServiceAccount,
        "" "v1" "Service" => a::core::v1::Service,
        "admissionregistration.k8s.io" "v1" "MutatingWebhookConfiguration" => a::admissionregistration::v1::MutatingWebhookConfiguration,
        "admissionregistration.k8s.io" "v1" "ValidatingAdmissionPolicy" => a::admissionregistration::v1::ValidatingAdmissionPolicy,
        "admissionregistration.k8s.io" "v1" "ValidatingAdmissionPolicyBinding" => a::admissionregistration::v1::ValidatingAdmissionPolicyBinding,
        "admissionregistration.k8s.io" "v1" "ValidatingWebhookConfiguration" => a::admissionregistration::v1::ValidatingWebhookConfiguration,
        "apiextensions.k8s.io" "v1" "CustomResourceDefinition" => crd::CustomResourceDefinition,
        "apps" "v1" "ControllerRevision" => a::apps::v1::ControllerRevision,
        "apps" "v1" "DaemonSet" => a::apps::v1::DaemonSet,
        "apps" "v1" "Deployment" => a::apps::v1::Deployment,
        "apps" "v1" "ReplicaSet" => a::apps::v1::ReplicaSet,
        "apps" "v1" "StatefulSet" => a::apps::v1::StatefulSet,
        "authentication.k8s.io" "v1" "SelfSubjectReview" => a::authentication::v1::SelfSubjectReview,
        "authentication.k8s.io" "v1" "TokenRequest" => a::authentication::v1::TokenRequest,
        "authentication.k8s.io" "v1" "TokenReview" => a::authentication::v1::TokenReview,
        "authorization.k8s.io" "v1" "SelfSubjectAccessReview" => a::authorization::v1::SelfSubjectAccessReview,
        "authorization.k8s.io" "v1" "SelfSubjectRulesReview" => a::authorization::v1::SelfSubjectRulesReview,
        "authorization.k8s.io" "v1" "SubjectAccessReview" => a::authorization::v1::SubjectAccessReview,
        "autoscaling" "v1" "Scale" => a::autoscaling::v1::Scale,
        "batch" "v1" "CronJob" => a::batch::v1::CronJob,
        "batch" "v1" "Job" => a::batch::v1::Job,
        "certificates.k8s.io" "v1" "CertificateSigningRequest" => a::certificates::v1::CertificateSigningRequest,
        "coordination.k8s.io" "v1" "Lease" => a::coordination::v1::Lease,
        "discovery.k8s.io" "v1" "EndpointSlice" => a::discovery::v1::EndpointSlice,
        "events.k8s.io" "v1" "Event" => a::events::v1::Event,
        "networking.k8s.io" "v1" "IngressClass" => a::networking::v1::IngressClass,
        "networking.k8s.io" "v1" "Ingress" => a::networking::v1::Ingress,
        "networking.k8s.io" "v1" "NetworkPolicy" => a::networking::v1::NetworkPolicy,
        "node.k8s.io" "v1" "RuntimeClass" => a::node::v1::RuntimeClass,
        "policy" "v1" "Eviction" => a::policy::v1::Eviction,
        "policy" "v1" "PodDisruptionBudget" => a::policy::v1::PodDisruptionBudget,
        "rbac.authorization.k8s.io" "v1" "ClusterRoleBinding" => a::rbac::v1::ClusterRoleBinding,
        "rbac.authorization.k8s.io" "v1" "ClusterRole" => a::rbac::v1::ClusterRole,
        "rbac.authorization.k8s.io" "v1" "RoleBinding" => a::rbac::v1::RoleBinding,
        "rbac.authorization.k8s.io" "v1" "Role" => a::rbac::v1::Role,
        "scheduling.k8s.io" "v1" "PriorityClass" => a::scheduling::v1::PriorityClass,
        "storage.k8s.io" "v1" "CSIDriver" => a::storage::v1::CSIDriver,
        "storage.k8s.io" "v1" "CSINode" => a::storage::v1::CSINode,
        "storage.k8s.io" "v1" "StorageClass" => a::storage::v1::StorageClass,
        "storage.k8s.io" "v1" "VolumeAttachment" => a::storage::v1::VolumeAttachment,
    );
    let mut defs = generator.take_definitions(true);
    for (g, v, k, name) in &out {
        if let Some(s) = defs.get_mut(name).and_then(Value::as_object_mut) {
            s.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": g, "version": v, "kind": k}]),
            );
        }
    }
    (defs, out)
}

/// The schema name of `group`/`kind`, if skiff has one.
pub fn schema_name(roots: &[Root], group: &str, version: &str, kind: &str) -> Option<String> {
    roots
        .iter()
        .find(|(g, v, k, _)| *g == group && *v == version && *k == kind)
        .map(|(_, _, _, n)| n.clone())
}

/// A field index node, as built from the schemas by [`field_index_source`] (the generator and
/// the freshness test); the server itself walks the generated static copy in `field_index.rs`.
#[derive(Debug, PartialEq)]
enum Node {
    /// A definition by index.
    Def(usize),
    /// Known properties (name → node); `rest` for additionalProperties alongside.
    Object(std::collections::BTreeMap<String, Node>, Option<Box<Node>>),
    /// A map with value schema.
    Map(Box<Node>),
    /// A list with item schema.
    Array(Box<Node>),
    /// Anything goes (scalars, preserve-unknown-fields, free-form objects).
    Any,
}

fn def_ref(schema: &Value) -> Option<&str> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return r.strip_prefix("#/components/schemas/");
    }
    match schema
        .get("allOf")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        Some([one]) => def_ref(one),
        _ => None,
    }
}

fn to_node(schema: &Value, names: &HashMap<String, usize>) -> Node {
    if let Some(name) = def_ref(schema) {
        return names.get(name).map_or(Node::Any, |i| Node::Def(*i));
    }
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return Node::Any;
    }
    if let Some(items) = schema.get("items") {
        return Node::Array(Box::new(to_node(items, names)));
    }
    let extra = schema
        .get("additionalProperties")
        .filter(|a| a.is_object())
        .map(|a| Box::new(to_node(a, names)));
    match schema.get("properties").and_then(Value::as_object) {
        Some(props) => Node::Object(
            props
                .iter()
                .map(|(k, v)| (k.clone(), to_node(v, names)))
                .collect(),
            extra,
        ),
        None => match extra {
            Some(e) => Node::Map(e),
            None => Node::Any,
        },
    }
}

/// The field index built from the schemas: one node per definition (in name order), and the
/// (apiVersion, kind, definition) roots sorted for binary search.
fn build_index() -> (Vec<Node>, Vec<(String, String, usize)>) {
    let (defs, roots) = components();
    let names: HashMap<String, usize> = defs
        .keys()
        .enumerate()
        .map(|(i, k)| (k.clone(), i))
        .collect();
    let nodes = defs.values().map(|v| to_node(v, &names)).collect();
    let mut roots: Vec<(String, String, usize)> = roots
        .into_iter()
        .filter_map(|(g, v, k, n)| {
            let av = if g.is_empty() {
                v.to_string()
            } else {
                format!("{g}/{v}")
            };
            names.get(&n).map(|i| (av, k.to_string(), *i))
        })
        .collect();
    roots.sort();
    (nodes, roots)
}

fn render(n: &Node, out: &mut String) {
    use std::fmt::Write;
    match n {
        Node::Def(i) => {
            let _ = write!(out, "D({i})");
        }
        Node::Any => out.push('A'),
        Node::Map(e) => {
            out.push_str("M(&");
            render(e, out);
            out.push(')');
        }
        Node::Array(e) => {
            out.push_str("L(&");
            render(e, out);
            out.push(')');
        }
        Node::Object(props, extra) => {
            out.push_str("O(&[");
            for (i, (k, v)) in props.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "({k:?}, ");
                render(v, out);
                out.push(')');
            }
            out.push_str("], ");
            match extra {
                Some(e) => {
                    out.push_str("Some(&");
                    render(e, out);
                    out.push(')');
                }
                None => out.push_str("None"),
            }
            out.push(')');
        }
    }
}

/// The Rust source of `field_index.rs`, generated from the k8s-openapi schemas. Used by
/// `examples/gen_field_index.rs` and by the test that keeps the checked-in file current.
#[doc(hidden)]
pub fn field_index_source() -> String {
    let (nodes, roots) = build_index();
    let mut o = String::from(
        "//! Known fields of every built-in kind, for unknown-field checks (`fieldValidation`).\n\
         //! GENERATED by `cargo run -p skiff-apiserver --example gen_field_index` from\n\
         //! k8s-openapi's schemas. Do not edit. A static table instead of an index built at run\n\
         //! time: building it from the schemas cost ~3 MiB of heap for the server's lifetime.\n\n\
         use crate::schemas::FieldNode;\n\
         use crate::schemas::FieldNode::{Any as A, Array as L, Def as D, Map as M, Object as O};\n\n\
         /// (apiVersion, kind, index into `DEFS`), sorted.\n\
         #[rustfmt::skip]\n\
         pub(crate) static ROOTS: &[(&str, &str, u16)] = &[\n",
    );
    for (av, k, i) in &roots {
        o.push_str(&format!("    ({av:?}, {k:?}, {i}),\n"));
    }
    o.push_str(
        "];\n\n/// One node per OpenAPI definition, in definition-name order.\n\
         #[rustfmt::skip]\n\
         pub(crate) static DEFS: &[FieldNode] = &[\n",
    );
    for n in &nodes {
        o.push_str("    ");
        render(n, &mut o);
        o.push_str(",\n");
    }
    o.push_str("];\n");
    o
}

/// A node of the generated field index (`field_index.rs`): what an object's fields may be.
#[derive(Debug)]
pub(crate) enum FieldNode {
    /// A definition, by index into `DEFS`.
    Def(u16),
    /// Known properties sorted by name; `additionalProperties` alongside, if any.
    Object(
        &'static [(&'static str, FieldNode)],
        Option<&'static FieldNode>,
    ),
    /// A map with this value schema.
    Map(&'static FieldNode),
    /// A list with this item schema.
    Array(&'static FieldNode),
    /// Anything goes (scalars, preserve-unknown-fields, free-form objects).
    Any,
}

fn walk(node: &FieldNode, v: &Value, path: &str, out: &mut Vec<String>) {
    use crate::field_index::DEFS;
    let node = match node {
        FieldNode::Def(i) => match DEFS.get(usize::from(*i)) {
            Some(n) => n,
            None => return,
        },
        n => n,
    };
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (node, v) {
        (FieldNode::Def(_), _) => walk(node, v, path, out),
        (FieldNode::Object(props, extra), Value::Object(m)) => {
            for (k, val) in m {
                match props.binary_search_by(|(name, _)| (*name).cmp(k.as_str())) {
                    Ok(i) => walk(&props[i].1, val, &join(k), out),
                    Err(_) => match extra {
                        Some(e) => walk(e, val, &join(k), out),
                        None => out.push(join(k)),
                    },
                }
            }
        }
        (FieldNode::Map(e), Value::Object(m)) => {
            for (k, val) in m {
                walk(e, val, &join(k), out);
            }
        }
        (FieldNode::Array(e), Value::Array(a)) => {
            for (i, val) in a.iter().enumerate() {
                walk(e, val, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Field paths of `obj` (an `apiVersion`/`kind` object) that its schema does not know.
pub fn unknown_fields(api_version: &str, kind: &str, obj: &Value) -> Vec<String> {
    use crate::field_index::ROOTS;
    let Ok(i) = ROOTS.binary_search_by(|(av, k, _)| (*av, *k).cmp(&(api_version, kind))) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(&FieldNode::Def(ROOTS[i].2), obj, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_fields_are_found_with_paths() {
        let d = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x", "labels": {"a": "b"}, "bogus": 1},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagee": "typo", "resources": {"limits": {"cpu": "1"}}}]}}}});
        assert_eq!(
            super::unknown_fields("apps/v1", "Deployment", &d),
            vec![
                "metadata.bogus".to_string(),
                "spec.template.spec.containers[0].imagee".to_string()
            ]
        );
        let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"any-key": "v"}});
        assert!(super::unknown_fields("v1", "ConfigMap", &cm).is_empty());
    }

    use super::*;

    #[test]
    fn generated_field_index_is_current() {
        let want = field_index_source();
        let have = include_str!("field_index.rs");
        assert!(
            want == have,
            "src/field_index.rs is stale: run `cargo run -p skiff-apiserver --example gen_field_index`"
        );
    }

    #[test]
    fn kinds_have_schemas_with_gvk() {
        let (defs, roots) = components();
        let name = schema_name(&roots, "apps", "v1", "Deployment").unwrap();
        assert_eq!(name, "io.k8s.api.apps.v1.Deployment");
        let d = &defs[&name];
        assert_eq!(
            d["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        assert!(d["properties"]["spec"].is_object());
        assert!(defs.contains_key("io.k8s.api.core.v1.Container"));
        for r in skiff_api::RESOURCES.iter().filter(|r| r.is_persisted()) {
            assert!(
                schema_name(&roots, r.group, r.version, r.kind).is_some(),
                "no schema for {} {}",
                r.api_version(),
                r.kind
            );
        }
    }
}
