//! OpenAPI v3 component schemas of the built-in kinds, generated from k8s-openapi's JSON
//! schemas (feature `schemars`) and tagged with `x-kubernetes-group-version-kind`, so that
//! `kubectl explain` works. Generated on demand (a few MB) rather than kept in memory.

use std::collections::HashMap;
use std::sync::OnceLock;

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

/// A compact field index for unknown-field checks (built once; the full schemas are dropped).
#[derive(Debug)]
enum Node {
    /// A definition by index.
    Def(usize),
    /// Known properties (name → node); `rest` for additionalProperties alongside.
    Object(HashMap<String, Node>, Option<Box<Node>>),
    /// A map with value schema.
    Map(Box<Node>),
    /// A list with item schema.
    Array(Box<Node>),
    /// Anything goes (scalars, preserve-unknown-fields, free-form objects).
    Any,
}

struct Index {
    defs: Vec<Node>,
    roots: HashMap<(String, String), usize>,
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

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let (defs, roots) = components();
        let names: HashMap<String, usize> = defs
            .keys()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        let nodes = defs.values().map(|v| to_node(v, &names)).collect();
        let roots = roots
            .into_iter()
            .filter_map(|(g, v, k, n)| {
                let av = if g.is_empty() {
                    v.to_string()
                } else {
                    format!("{g}/{v}")
                };
                names.get(&n).map(|i| ((av, k.to_string()), *i))
            })
            .collect();
        Index { defs: nodes, roots }
    })
}

fn walk(ix: &Index, node: &Node, v: &Value, path: &str, out: &mut Vec<String>) {
    let node = match node {
        Node::Def(i) => match ix.defs.get(*i) {
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
        (Node::Def(_), _) => walk(ix, node, v, path, out),
        (Node::Object(props, extra), Value::Object(m)) => {
            for (k, val) in m {
                match props.get(k) {
                    Some(n) => walk(ix, n, val, &join(k), out),
                    None => match extra {
                        Some(e) => walk(ix, e, val, &join(k), out),
                        None => out.push(join(k)),
                    },
                }
            }
        }
        (Node::Map(e), Value::Object(m)) => {
            for (k, val) in m {
                walk(ix, e, val, &join(k), out);
            }
        }
        (Node::Array(e), Value::Array(a)) => {
            for (i, val) in a.iter().enumerate() {
                walk(ix, e, val, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Field paths of `obj` (an `apiVersion`/`kind` object) that its schema does not know.
pub fn unknown_fields(api_version: &str, kind: &str, obj: &Value) -> Vec<String> {
    let ix = index();
    let Some(root) = ix.roots.get(&(api_version.to_string(), kind.to_string())) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(ix, &Node::Def(*root), obj, "", &mut out);
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
