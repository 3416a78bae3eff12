//! The table of built-in resources skiff serves: group, version, plural, kind, scope, verbs,
//! short names, categories and subresources (facts of the Kubernetes API).

/// One subresource of a resource (e.g. `pods/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subresource {
    /// The subresource name (`status`, `scale`, `binding`, ...).
    pub name: &'static str,
    /// Kind of the object it accepts/returns.
    pub kind: &'static str,
    /// Group of that kind ("" = same group as the parent).
    pub group: &'static str,
    /// Version of that kind ("" = same version as the parent).
    pub version: &'static str,
    /// Verbs it supports.
    pub verbs: &'static [&'static str],
}

/// One resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceInfo {
    /// API group ("" = core).
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Plural resource name (URL segment).
    pub resource: &'static str,
    /// Singular name.
    pub singular: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Verbs.
    pub verbs: &'static [&'static str],
    /// Short names (`po`, `svc`...).
    pub short_names: &'static [&'static str],
    /// Categories (`all`).
    pub categories: &'static [&'static str],
    /// Subresources.
    pub subresources: &'static [Subresource],
}

impl ResourceInfo {
    /// `group/version` or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `resource` or `resource.group`, as kube-apiserver names it in messages.
    pub fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// `Kind` or `Kind.group`, as kube-apiserver names it in Invalid messages.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// Whether the resource supports `verb`.
    pub fn has_verb(&self, verb: &str) -> bool {
        self.verbs.contains(&verb)
    }

    /// The subresource called `name`, if any.
    pub fn subresource(&self, name: &str) -> Option<&'static Subresource> {
        self.subresources.iter().find(|s| s.name == name)
    }

    /// Store key prefix: `/registry/<group>/<resource>/` (core: no group segment).
    pub fn key_prefix(&self) -> String {
        let group = storage_group(self.group);
        if group.is_empty() {
            format!("/registry/{}/", self.resource)
        } else {
            format!("/registry/{}/{}/", group, self.resource)
        }
    }

    /// Store key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{}/{}", self.key_prefix(), ns, name),
            _ => format!("{}{}", self.key_prefix(), name),
        }
    }

    /// Whether objects of this kind are stored (review kinds are not).
    pub fn is_persisted(&self) -> bool {
        self.has_verb("get")
    }
}

/// kube-apiserver stores a few groups under a shortened or shared prefix; events.k8s.io events
/// are the same objects as core events.
fn storage_group(group: &str) -> &str {
    match group {
        "events.k8s.io" => "",
        "apiextensions.k8s.io" => "apiextensions.k8s.io",
        g => g,
    }
}

/// All verbs of an ordinary read-write resource.
pub const STD: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const NO_COLLECTION: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];
const CREATE_ONLY: &[&str] = &["create"];
const GET_PATCH_UPDATE: &[&str] = &["get", "patch", "update"];
const ALL: &[&str] = &["all"];

const fn sub(name: &'static str, kind: &'static str) -> Subresource {
    Subresource {
        name,
        kind,
        group: "",
        version: "",
        verbs: GET_PATCH_UPDATE,
    }
}
const STATUS: Subresource = sub("status", "");
const SCALE: Subresource = Subresource {
    name: "scale",
    kind: "Scale",
    group: "autoscaling",
    version: "v1",
    verbs: GET_PATCH_UPDATE,
};

#[allow(clippy::too_many_arguments)]
const fn r(
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    verbs: &'static [&'static str],
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
    subresources: &'static [Subresource],
) -> ResourceInfo {
    ResourceInfo {
        group,
        version,
        resource,
        singular,
        kind,
        namespaced,
        verbs,
        short_names,
        categories,
        subresources,
    }
}

/// Every built-in resource, in discovery order per group-version.
pub static RESOURCES: &[ResourceInfo] = &[
    // core/v1
    r(
        "",
        "v1",
        "bindings",
        "binding",
        "Binding",
        true,
        CREATE_ONLY,
        &[],
        &[],
        &[],
    ),
    r(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        STD,
        &["cm"],
        &[],
        &[],
    ),
    r(
        "",
        "v1",
        "endpoints",
        "endpoints",
        "Endpoints",
        true,
        STD,
        &["ep"],
        &[],
        &[],
    ),
    r(
        "",
        "v1",
        "events",
        "event",
        "Event",
        true,
        STD,
        &["ev"],
        &[],
        &[],
    ),
    r(
        "",
        "v1",
        "limitranges",
        "limitrange",
        "LimitRange",
        true,
        STD,
        &["limits"],
        &[],
        &[],
    ),
    r(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        false,
        NO_COLLECTION,
        &["ns"],
        &[],
        &[STATUS, sub("finalize", "")],
    ),
    r(
        "",
        "v1",
        "nodes",
        "node",
        "Node",
        false,
        STD,
        &["no"],
        &[],
        &[
            Subresource {
                name: "proxy",
                kind: "NodeProxyOptions",
                group: "",
                version: "",
                verbs: &["create", "delete", "get", "patch", "update"],
            },
            STATUS,
        ],
    ),
    r(
        "",
        "v1",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        "PersistentVolumeClaim",
        true,
        STD,
        &["pvc"],
        &[],
        &[STATUS],
    ),
    r(
        "",
        "v1",
        "persistentvolumes",
        "persistentvolume",
        "PersistentVolume",
        false,
        STD,
        &["pv"],
        &[],
        &[STATUS],
    ),
    r(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        true,
        STD,
        &["po"],
        ALL,
        &[
            Subresource {
                name: "binding",
                kind: "Binding",
                group: "",
                version: "",
                verbs: CREATE_ONLY,
            },
            Subresource {
                name: "eviction",
                kind: "Eviction",
                group: "policy",
                version: "v1",
                verbs: CREATE_ONLY,
            },
            Subresource {
                name: "log",
                kind: "Pod",
                group: "",
                version: "",
                verbs: &["get"],
            },
            Subresource {
                name: "exec",
                kind: "PodExecOptions",
                group: "",
                version: "",
                verbs: &["create", "get"],
            },
            Subresource {
                name: "attach",
                kind: "PodAttachOptions",
                group: "",
                version: "",
                verbs: &["create", "get"],
            },
            Subresource {
                name: "portforward",
                kind: "PodPortForwardOptions",
                group: "",
                version: "",
                verbs: &["create", "get"],
            },
            STATUS,
        ],
    ),
    r(
        "",
        "v1",
        "podtemplates",
        "podtemplate",
        "PodTemplate",
        true,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "",
        "v1",
        "replicationcontrollers",
        "replicationcontroller",
        "ReplicationController",
        true,
        STD,
        &["rc"],
        ALL,
        &[SCALE, STATUS],
    ),
    r(
        "",
        "v1",
        "resourcequotas",
        "resourcequota",
        "ResourceQuota",
        true,
        STD,
        &["quota"],
        &[],
        &[STATUS],
    ),
    r(
        "",
        "v1",
        "secrets",
        "secret",
        "Secret",
        true,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        STD,
        &["sa"],
        &[],
        &[Subresource {
            name: "token",
            kind: "TokenRequest",
            group: "authentication.k8s.io",
            version: "v1",
            verbs: CREATE_ONLY,
        }],
    ),
    r(
        "",
        "v1",
        "services",
        "service",
        "Service",
        true,
        STD,
        &["svc"],
        ALL,
        &[STATUS],
    ),
    // admissionregistration.k8s.io/v1
    r(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "mutatingwebhookconfiguration",
        "MutatingWebhookConfiguration",
        false,
        STD,
        &[],
        &["api-extensions"],
        &[],
    ),
    r(
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicies",
        "validatingadmissionpolicy",
        "ValidatingAdmissionPolicy",
        false,
        STD,
        &[],
        &["api-extensions"],
        &[STATUS],
    ),
    r(
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicybindings",
        "validatingadmissionpolicybinding",
        "ValidatingAdmissionPolicyBinding",
        false,
        STD,
        &[],
        &["api-extensions"],
        &[],
    ),
    r(
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        "validatingwebhookconfiguration",
        "ValidatingWebhookConfiguration",
        false,
        STD,
        &[],
        &["api-extensions"],
        &[],
    ),
    // apiextensions.k8s.io/v1
    r(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "customresourcedefinition",
        "CustomResourceDefinition",
        false,
        STD,
        &["crd", "crds"],
        &["api-extensions"],
        &[STATUS],
    ),
    // apps/v1
    r(
        "apps",
        "v1",
        "controllerrevisions",
        "controllerrevision",
        "ControllerRevision",
        true,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "apps",
        "v1",
        "daemonsets",
        "daemonset",
        "DaemonSet",
        true,
        STD,
        &["ds"],
        ALL,
        &[STATUS],
    ),
    r(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        true,
        STD,
        &["deploy"],
        ALL,
        &[SCALE, STATUS],
    ),
    r(
        "apps",
        "v1",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        true,
        STD,
        &["rs"],
        ALL,
        &[SCALE, STATUS],
    ),
    r(
        "apps",
        "v1",
        "statefulsets",
        "statefulset",
        "StatefulSet",
        true,
        STD,
        &["sts"],
        ALL,
        &[SCALE, STATUS],
    ),
    // authentication.k8s.io
    r(
        "authentication.k8s.io",
        "v1",
        "selfsubjectreviews",
        "selfsubjectreview",
        "SelfSubjectReview",
        false,
        CREATE_ONLY,
        &[],
        &[],
        &[],
    ),
    r(
        "authentication.k8s.io",
        "v1",
        "tokenreviews",
        "tokenreview",
        "TokenReview",
        false,
        CREATE_ONLY,
        &[],
        &[],
        &[],
    ),
    r(
        "authentication.k8s.io",
        "v1beta1",
        "selfsubjectreviews",
        "selfsubjectreview",
        "SelfSubjectReview",
        false,
        CREATE_ONLY,
        &[],
        &[],
        &[],
    ),
    // authorization.k8s.io/v1
    r(
        "authorization.k8s.io",
        "v1",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        "SelfSubjectAccessReview",
        false,
        CREATE_ONLY,
        &[],
        &[],
        &[],
    ),
    r(
        "authorization.k8s.io",
        "v1",
        "selfsubjectrulesreviews",
        "selfsubjectrulesreview",
        "SelfSubjectRulesReview",
        false,
        CREATE_ONLY,
        &[],
        &[],
        &[],
    ),
    r(
        "authorization.k8s.io",
        "v1",
        "subjectaccessreviews",
        "subjectaccessreview",
        "SubjectAccessReview",
        false,
        CREATE_ONLY,
        &[],
        &[],
        &[],
    ),
    // batch/v1
    r(
        "batch",
        "v1",
        "cronjobs",
        "cronjob",
        "CronJob",
        true,
        STD,
        &["cj"],
        ALL,
        &[STATUS],
    ),
    r(
        "batch",
        "v1",
        "jobs",
        "job",
        "Job",
        true,
        STD,
        &[],
        ALL,
        &[STATUS],
    ),
    // certificates.k8s.io/v1
    r(
        "certificates.k8s.io",
        "v1",
        "certificatesigningrequests",
        "certificatesigningrequest",
        "CertificateSigningRequest",
        false,
        STD,
        &["csr"],
        &[],
        &[sub("approval", ""), STATUS],
    ),
    // coordination.k8s.io/v1
    r(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        STD,
        &[],
        &[],
        &[],
    ),
    // discovery.k8s.io/v1
    r(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
        STD,
        &[],
        &[],
        &[],
    ),
    // events.k8s.io/v1
    r(
        "events.k8s.io",
        "v1",
        "events",
        "event",
        "Event",
        true,
        STD,
        &["ev"],
        &[],
        &[],
    ),
    // networking.k8s.io/v1
    r(
        "networking.k8s.io",
        "v1",
        "ingressclasses",
        "ingressclass",
        "IngressClass",
        false,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "networking.k8s.io",
        "v1",
        "ingresses",
        "ingress",
        "Ingress",
        true,
        STD,
        &["ing"],
        &[],
        &[STATUS],
    ),
    r(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "networkpolicy",
        "NetworkPolicy",
        true,
        STD,
        &["netpol"],
        &[],
        &[],
    ),
    // node.k8s.io/v1
    r(
        "node.k8s.io",
        "v1",
        "runtimeclasses",
        "runtimeclass",
        "RuntimeClass",
        false,
        STD,
        &[],
        &[],
        &[],
    ),
    // policy/v1
    r(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        "PodDisruptionBudget",
        true,
        STD,
        &["pdb"],
        &[],
        &[STATUS],
    ),
    // rbac.authorization.k8s.io/v1
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "clusterrolebinding",
        "ClusterRoleBinding",
        false,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "clusterrole",
        "ClusterRole",
        false,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "rolebinding",
        "RoleBinding",
        true,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "role",
        "Role",
        true,
        STD,
        &[],
        &[],
        &[],
    ),
    // scheduling.k8s.io/v1
    r(
        "scheduling.k8s.io",
        "v1",
        "priorityclasses",
        "priorityclass",
        "PriorityClass",
        false,
        STD,
        &["pc"],
        &[],
        &[],
    ),
    // storage.k8s.io/v1
    r(
        "storage.k8s.io",
        "v1",
        "csidrivers",
        "csidriver",
        "CSIDriver",
        false,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "storage.k8s.io",
        "v1",
        "csinodes",
        "csinode",
        "CSINode",
        false,
        STD,
        &[],
        &[],
        &[],
    ),
    r(
        "storage.k8s.io",
        "v1",
        "storageclasses",
        "storageclass",
        "StorageClass",
        false,
        STD,
        &["sc"],
        &[],
        &[],
    ),
    r(
        "storage.k8s.io",
        "v1",
        "volumeattachments",
        "volumeattachment",
        "VolumeAttachment",
        false,
        STD,
        &[],
        &[],
        &[STATUS],
    ),
];

/// Group-versions in discovery order: (group, versions, preferred version).
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, vs)) => {
                if !vs.contains(&r.version) {
                    vs.push(r.version);
                }
            }
            None => out.push((r.group, vec![r.version])),
        }
    }
    out
}

/// Resources of one group-version.
pub fn resources_of(group: &str, version: &str) -> impl Iterator<Item = &'static ResourceInfo> {
    let group = group.to_string();
    let version = version.to_string();
    RESOURCES
        .iter()
        .filter(move |r| r.group == group && r.version == version)
}

/// Looks a resource up by group, version and plural name.
pub fn find(group: &str, version: &str, resource: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.resource == resource)
}

/// Looks a resource up by apiVersion and kind.
pub fn find_kind(api_version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.kind == kind && r.is_persisted())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_like_kube_apiserver() {
        let pods = find("", "v1", "pods").unwrap();
        assert_eq!(pods.key(Some("default"), "x"), "/registry/pods/default/x");
        let deploy = find("apps", "v1", "deployments").unwrap();
        assert_eq!(
            deploy.key(Some("ns"), "d"),
            "/registry/apps/deployments/ns/d"
        );
        let nodes = find("", "v1", "nodes").unwrap();
        assert_eq!(nodes.key(None, "n1"), "/registry/nodes/n1");
        assert_eq!(deploy.qualified_resource(), "deployments.apps");
        assert_eq!(pods.qualified_resource(), "pods");
    }

    #[test]
    fn table_is_consistent() {
        for r in RESOURCES {
            assert!(!r.verbs.is_empty(), "{}", r.resource);
            assert_eq!(
                RESOURCES
                    .iter()
                    .filter(|o| o.group == r.group
                        && o.version == r.version
                        && o.resource == r.resource)
                    .count(),
                1,
                "duplicate {}",
                r.resource
            );
        }
        assert!(
            groups()
                .iter()
                .any(|(g, vs)| *g == "authentication.k8s.io" && vs == &["v1", "v1beta1"])
        );
        assert_eq!(
            find_kind("apps/v1", "Deployment").unwrap().resource,
            "deployments"
        );
        assert_eq!(find_kind("v1", "ConfigMap").unwrap().resource, "configmaps");
    }
}
