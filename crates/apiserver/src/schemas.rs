//! OpenAPI v3 component schemas of the built-in kinds, generated from k8s-openapi's JSON
//! schemas (feature `schemars`) and tagged with `x-kubernetes-group-version-kind`, so that
//! `kubectl explain` works. Generated on demand (a few MB) rather than kept in memory.

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

#[cfg(test)]
mod tests {
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
