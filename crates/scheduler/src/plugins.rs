//! Filters and scores over a node's cached state: cordon, nodeName, nodeSelector/affinity,
//! taints/tolerations, resource fit, host ports; least-allocated, balanced, preferred affinity,
//! PreferNoSchedule. Reason strings follow kube-scheduler's wording.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};

use crate::resources::{Resources, node_allocatable, pod_non_zero, pod_requests};

/// Reason strings (kube-scheduler's, so the FailedScheduling message reads the same).
pub mod reason {
    /// NodeUnschedulable.
    pub const UNSCHEDULABLE: &str = "node(s) were unschedulable";
    /// NodeName.
    pub const NODE_NAME: &str = "node(s) didn't match the requested node name";
    /// NodeAffinity (selector and required affinity).
    pub const AFFINITY: &str = "node(s) didn't match Pod's node affinity/selector";
    /// NodePorts.
    pub const PORTS: &str = "node(s) didn't have free ports for the requested pod ports";
    /// NodeResourcesFit, pod count.
    pub const TOO_MANY_PODS: &str = "Too many pods";
}

/// One reason a node failed a filter. `resolvable` says whether evicting pods could help
/// (kube-scheduler's Unschedulable vs UnschedulableAndUnresolvable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The reason text.
    pub reason: String,
    /// Whether preemption could make the node fit.
    pub resolvable: bool,
}

impl Failure {
    fn hard(reason: impl Into<String>) -> Self {
        Failure {
            reason: reason.into(),
            resolvable: false,
        }
    }
    fn soft(reason: impl Into<String>) -> Self {
        Failure {
            reason: reason.into(),
            resolvable: true,
        }
    }
}

/// A host port in use: (host IP, protocol, port).
pub type HostPort = (String, String, i32);

/// The scheduler's view of one node: the object plus what the pods on it already use.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node object.
    pub node: Arc<Node>,
    /// Allocatable resources.
    pub allocatable: Resources,
    /// Allocatable pod count.
    pub allowed_pods: i64,
    /// Sum of the effective requests of pods on the node.
    pub requested: Resources,
    /// Sum of the non-zero CPU/memory requests (for scoring).
    pub non_zero: (i64, i64),
    /// Number of pods on the node.
    pub pod_count: i64,
    /// Host ports in use, with a use count.
    pub ports: HashMap<HostPort, u32>,
    /// The pods on the node by namespace/name (for inter-pod affinity).
    pub pods: HashMap<String, Arc<Pod>>,
    /// How many of them have required anti-affinity terms.
    pub anti_affinity_pods: usize,
    /// `spec.unschedulable` (cached: the filters run for hundreds of nodes per pod and need not
    /// touch the node object when it has no taints and is not cordoned).
    pub unschedulable: bool,
    /// Whether the node has any taint (cached, as `unschedulable`).
    pub tainted: bool,
}

impl NodeInfo {
    /// A node with no pods.
    pub fn new(node: Arc<Node>) -> Self {
        let (allocatable, allowed_pods) = node_allocatable(&node);
        let (unschedulable, tainted) = node_flags(&node);
        NodeInfo {
            unschedulable,
            tainted,
            node,
            allocatable,
            allowed_pods,
            requested: Resources::default(),
            non_zero: (0, 0),
            pod_count: 0,
            ports: HashMap::new(),
            pods: HashMap::new(),
            anti_affinity_pods: 0,
        }
    }

    /// Replaces the node object, keeping the pod accounting.
    pub fn set_node(&mut self, node: Arc<Node>) {
        let (allocatable, allowed_pods) = node_allocatable(&node);
        (self.unschedulable, self.tainted) = node_flags(&node);
        self.node = node;
        self.allocatable = allocatable;
        self.allowed_pods = allowed_pods;
    }

    /// Accounts a pod on this node.
    pub fn add_pod(&mut self, p: &PodInfo) {
        self.requested.add(&p.requests);
        self.non_zero.0 += p.non_zero.0;
        self.non_zero.1 += p.non_zero.1;
        self.pod_count += 1;
        if self.pods.insert(p.key(), p.pod.clone()).is_none()
            && crate::interpod::has_required_anti_affinity(&p.pod)
        {
            self.anti_affinity_pods += 1;
        }
        for hp in &p.host_ports {
            *self.ports.entry(hp.clone()).or_default() += 1;
        }
    }

    /// Removes a pod's accounting from this node.
    pub fn remove_pod(&mut self, p: &PodInfo) {
        self.requested.sub(&p.requests);
        self.non_zero.0 -= p.non_zero.0;
        self.non_zero.1 -= p.non_zero.1;
        self.pod_count -= 1;
        if self.pods.remove(&p.key()).is_some()
            && crate::interpod::has_required_anti_affinity(&p.pod)
        {
            self.anti_affinity_pods -= 1;
        }
        for hp in &p.host_ports {
            if let Some(n) = self.ports.get_mut(hp) {
                *n -= 1;
                if *n == 0 {
                    self.ports.remove(hp);
                }
            }
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or("")
    }

    /// The node's labels.
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.node.metadata.labels.as_ref()
    }

    fn taints(&self) -> &[Taint] {
        if !self.tainted {
            return &[];
        }
        self.node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or(&[])
    }
}

/// `spec.unschedulable` and whether `spec.taints` is non-empty.
fn node_flags(node: &Node) -> (bool, bool) {
    let spec = node.spec.as_ref();
    (
        spec.and_then(|s| s.unschedulable).unwrap_or(false),
        spec.and_then(|s| s.taints.as_ref())
            .is_some_and(|t| !t.is_empty()),
    )
}

/// What the scheduler precomputes about a pod once per attempt.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// The pod.
    pub pod: Arc<Pod>,
    /// Effective requests.
    pub requests: Resources,
    /// Non-zero CPU/memory requests for scoring.
    pub non_zero: (i64, i64),
    /// Host ports the pod asks for.
    pub host_ports: Vec<HostPort>,
}

impl PodInfo {
    /// Precomputes requests and host ports.
    pub fn new(pod: Arc<Pod>) -> Self {
        let requests = pod_requests(&pod);
        let non_zero = pod_non_zero(&pod);
        let mut host_ports = Vec::new();
        if let Some(spec) = pod.spec.as_ref() {
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            for c in spec.containers.iter().chain(sidecars) {
                for p in c.ports.iter().flatten() {
                    if let Some(hp) = p.host_port.filter(|p| *p > 0) {
                        let ip = p
                            .host_ip
                            .clone()
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| "0.0.0.0".into());
                        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                        host_ports.push((ip, proto, hp));
                    }
                }
            }
        }
        PodInfo {
            pod,
            requests,
            non_zero,
            host_ports,
        }
    }

    /// namespace/name of the pod.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.pod.metadata.namespace.as_deref().unwrap_or(""),
            self.pod.metadata.name.as_deref().unwrap_or("")
        )
    }

    fn tolerations(&self) -> &[Toleration] {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_deref())
            .unwrap_or(&[])
    }
}

/// Runs every filter; returns the reasons the node does not fit (empty = fits).
pub fn filter(pod: &PodInfo, node: &NodeInfo) -> Vec<Failure> {
    if let Some(f) = node_unschedulable(pod, node)
        .or_else(|| node_name(pod, node))
        .or_else(|| node_affinity(pod, node))
        .or_else(|| taints(pod, node))
    {
        return vec![f];
    }
    let fit = resources_fit(pod, node);
    if !fit.is_empty() {
        return fit;
    }
    host_ports(pod, node).into_iter().collect()
}

/// A cordoned node (`spec.unschedulable`) fits only pods that tolerate the unschedulable taint.
pub fn node_unschedulable(pod: &PodInfo, node: &NodeInfo) -> Option<Failure> {
    if !node.unschedulable {
        return None;
    }
    let taint = Taint {
        key: "node.kubernetes.io/unschedulable".into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    };
    if pod.tolerations().iter().any(|t| tolerates(t, &taint)) {
        None
    } else {
        Some(Failure::hard(reason::UNSCHEDULABLE))
    }
}

/// `spec.nodeName` set on a pod in the queue (rare: the pod names its node but is unbound).
pub fn node_name(pod: &PodInfo, node: &NodeInfo) -> Option<Failure> {
    match pod.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        Some(n) if !n.is_empty() && n != node.name() => Some(Failure::hard(reason::NODE_NAME)),
        _ => None,
    }
}

/// `nodeSelector` and required node affinity.
pub fn node_affinity(pod: &PodInfo, node: &NodeInfo) -> Option<Failure> {
    if node_matches_pod_selectors(&pod.pod, &node.node) {
        None
    } else {
        Some(Failure::hard(reason::AFFINITY))
    }
}

/// Whether `node` satisfies the pod's nodeSelector and required node affinity.
pub fn node_matches_pod_selectors(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    let no_affinity = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .is_none_or(|na| {
            na.required_during_scheduling_ignored_during_execution
                .is_none()
        });
    if no_affinity && spec.node_selector.as_ref().is_none_or(|s| s.is_empty()) {
        return true;
    }
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    if let Some(sel) = spec.node_selector.as_ref()
        && sel.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    match required {
        None => true,
        Some(sel) => sel
            .node_selector_terms
            .iter()
            .any(|t| term_matches(t, labels, node.metadata.name.as_deref().unwrap_or(""))),
    }
}

/// A node selector term: all expressions and fields match; an empty term matches nothing.
pub fn term_matches(
    term: &NodeSelectorTerm,
    labels: &BTreeMap<String, String>,
    node_name: &str,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or(&[]);
    let fields = term.match_fields.as_deref().unwrap_or(&[]);
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|e| requirement_matches(e, labels.get(&e.key).map(String::as_str)))
        && fields.iter().all(|f| {
            // metadata.name is the only field a node selector may name.
            f.key == "metadata.name" && requirement_matches(f, Some(node_name))
        })
}

/// One requirement against the value of its key (None = the label is absent).
pub fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), [bound]) = (value, values) else {
                return false;
            };
            let (Ok(v), Ok(b)) = (v.parse::<i64>(), bound.parse::<i64>()) else {
                return false;
            };
            if r.operator == "Gt" { v > b } else { v < b }
        }
        _ => false,
    }
}

/// Whether a toleration tolerates a taint.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = t.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    let key = t.key.as_deref().unwrap_or("");
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            !key.is_empty()
                && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    }
}

/// NoSchedule and NoExecute taints must be tolerated; names the first one that is not.
pub fn taints(pod: &PodInfo, node: &NodeInfo) -> Option<Failure> {
    let tols = pod.tolerations();
    node.taints()
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tols.iter().any(|tol| tolerates(tol, t)))
        .map(|t| {
            Failure::hard(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                t.key,
                t.value.as_deref().unwrap_or("")
            ))
        })
}

/// Requests against allocatable minus what the node's pods request; one reason per resource.
pub fn resources_fit(pod: &PodInfo, node: &NodeInfo) -> Vec<Failure> {
    let mut out = Vec::new();
    if node.pod_count + 1 > node.allowed_pods {
        out.push(Failure::soft(reason::TOO_MANY_PODS));
    }
    let req = &pod.requests;
    let (a, used) = (&node.allocatable, &node.requested);
    let mut check = |name: &str, want: i64, alloc: i64, used: i64| {
        if want > 0 && want > alloc - used {
            out.push(Failure {
                reason: format!("Insufficient {name}"),
                resolvable: want <= alloc,
            });
        }
    };
    check("cpu", req.milli_cpu, a.milli_cpu, used.milli_cpu);
    check("memory", req.memory, a.memory, used.memory);
    check(
        "ephemeral-storage",
        req.ephemeral_storage,
        a.ephemeral_storage,
        used.ephemeral_storage,
    );
    for (name, want) in &req.scalar {
        let alloc = a.scalar.get(name).copied().unwrap_or(0);
        let used = used.scalar.get(name).copied().unwrap_or(0);
        check(name, *want, alloc, used);
    }
    out
}

/// Host ports: same protocol and port conflict when either IP is 0.0.0.0 or the IPs are equal.
pub fn host_ports(pod: &PodInfo, node: &NodeInfo) -> Option<Failure> {
    if pod.host_ports.is_empty() || node.ports.is_empty() {
        return None;
    }
    let conflict = pod.host_ports.iter().any(|(ip, proto, port)| {
        node.ports.keys().any(|(uip, uproto, uport)| {
            uport == port && uproto == proto && (ip == uip || ip == "0.0.0.0" || uip == "0.0.0.0")
        })
    });
    conflict.then(|| Failure::soft(reason::PORTS))
}

/// Plugin weights (kube-scheduler's defaults).
const W_FIT: i64 = 1;
const W_BALANCED: i64 = 1;
const W_AFFINITY: i64 = 2;
const W_TAINT: i64 = 3;

/// Least allocated (0..100): free fraction of CPU and memory after placing the pod, averaged.
pub fn least_allocated(pod: &PodInfo, node: &NodeInfo) -> i64 {
    let part = |req: i64, alloc: i64| {
        if alloc <= 0 || req > alloc {
            0
        } else {
            (alloc - req) * 100 / alloc
        }
    };
    let cpu = part(node.non_zero.0 + pod.non_zero.0, node.allocatable.milli_cpu);
    let mem = part(node.non_zero.1 + pod.non_zero.1, node.allocatable.memory);
    (cpu + mem) / 2
}

/// Balanced allocation (0..100): 100 × (1 − the standard deviation of the CPU and memory fractions).
pub fn balanced_allocation(pod: &PodInfo, node: &NodeInfo) -> i64 {
    let frac = |req: i64, alloc: i64| {
        if alloc <= 0 {
            1.0
        } else {
            (req as f64 / alloc as f64).min(1.0)
        }
    };
    let cpu = frac(
        node.requested.milli_cpu + pod.requests.milli_cpu,
        node.allocatable.milli_cpu,
    );
    let mem = frac(
        node.requested.memory + pod.requests.memory,
        node.allocatable.memory,
    );
    let std = (cpu - mem).abs() / 2.0;
    ((1.0 - std) * 100.0) as i64
}

/// Sum of the weights of the pod's preferred node-affinity terms that the node matches.
pub fn preferred_affinity_raw(pod: &PodInfo, node: &NodeInfo) -> i64 {
    let prefs = pod
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.preferred_during_scheduling_ignored_during_execution
                .as_deref()
        })
        .unwrap_or(&[]);
    if prefs.is_empty() {
        return 0;
    }
    let empty = BTreeMap::new();
    let labels = node.labels().unwrap_or(&empty);
    prefs
        .iter()
        .filter(|p| term_matches(&p.preference, labels, node.name()))
        .map(|p| i64::from(p.weight))
        .sum()
}

/// Number of PreferNoSchedule taints the pod does not tolerate.
pub fn prefer_no_schedule_raw(pod: &PodInfo, node: &NodeInfo) -> i64 {
    if !node.tainted {
        return 0;
    }
    let tols: Vec<&Toleration> = pod
        .tolerations()
        .iter()
        .filter(|t| {
            t.effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == "PreferNoSchedule")
        })
        .collect();
    node.taints()
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule")
        .filter(|t| !tols.iter().any(|tol| tolerates(tol, t)))
        .count() as i64
}

/// Total weighted score of each feasible node (same order as `nodes`).
pub fn score(pod: &PodInfo, nodes: &[&NodeInfo]) -> Vec<i64> {
    let aff: Vec<i64> = nodes
        .iter()
        .map(|n| preferred_affinity_raw(pod, n))
        .collect();
    let taint: Vec<i64> = nodes
        .iter()
        .map(|n| prefer_no_schedule_raw(pod, n))
        .collect();
    let max_aff = aff.iter().copied().max().unwrap_or(0);
    let max_taint = taint.iter().copied().max().unwrap_or(0);
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let aff_norm = if max_aff > 0 {
                aff[i] * 100 / max_aff
            } else {
                0
            };
            let taint_norm = if max_taint > 0 {
                100 - taint[i] * 100 / max_taint
            } else {
                100
            };
            W_FIT * least_allocated(pod, n)
                + W_BALANCED * balanced_allocation(pod, n)
                + W_AFFINITY * aff_norm
                + W_TAINT * taint_norm
        })
        .collect()
}

/// kube-scheduler's FitError message: `0/N nodes are available: <count reason, sorted>.`
/// followed by the preemption verdict.
pub fn fit_error_message(total: usize, per_node: &[Vec<Failure>], preemption: &str) -> String {
    let mut hist: BTreeMap<&str, usize> = BTreeMap::new();
    for fs in per_node {
        let mut seen = HashSet::new();
        for f in fs {
            if seen.insert(f.reason.as_str()) {
                *hist.entry(f.reason.as_str()).or_default() += 1;
            }
        }
    }
    let mut parts: Vec<String> = hist.iter().map(|(r, c)| format!("{c} {r}")).collect();
    parts.sort();
    let mut msg = format!("0/{total} nodes are available:");
    if !parts.is_empty() {
        msg.push_str(&format!(" {}.", parts.join(", ")));
    }
    if !preemption.is_empty() {
        msg.push_str(&format!(" {preemption}"));
    }
    msg
}

/// The preemption verdict when no victims are considered: nodes whose failure is resolvable
/// would need lower-priority pods to evict.
pub fn preemption_message(total: usize, per_node: &[Vec<Failure>], never: bool) -> String {
    if never {
        return "preemption: not eligible due to preemptionPolicy=Never.".into();
    }
    let mut not_helpful = 0;
    let mut no_victims = 0;
    for fs in per_node {
        if fs.iter().all(|f| f.resolvable) && !fs.is_empty() {
            no_victims += 1;
        } else {
            not_helpful += 1;
        }
    }
    let mut parts = Vec::new();
    if no_victims > 0 {
        parts.push(format!(
            "{no_victims} No preemption victims found for incoming pod"
        ));
    }
    if not_helpful > 0 {
        parts.push(format!(
            "{not_helpful} Preemption is not helpful for scheduling"
        ));
    }
    parts.sort();
    format!(
        "preemption: 0/{total} nodes are available: {}.",
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Affinity, Container, ContainerPort, NodeAffinity, NodeSelector, NodeSpec, NodeStatus,
        PodSpec, PreferredSchedulingTerm, ResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, cpu: &str, mem: &str, pods: &str) -> Node {
        let alloc: BTreeMap<String, Quantity> = [
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(mem.into())),
            ("pods".to_string(), Quantity(pods.into())),
            ("nvidia.com/gpu".to_string(), Quantity("1".into())),
        ]
        .into();
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    [
                        ("zone".to_string(), "a".to_string()),
                        ("cores".to_string(), "8".to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(alloc),
                ..Default::default()
            }),
        }
    }

    fn pod(cpu: &str, mem: &str) -> Pod {
        let mut req = BTreeMap::new();
        if !cpu.is_empty() {
            req.insert("cpu".to_string(), Quantity(cpu.into()));
        }
        if !mem.is_empty() {
            req.insert("memory".to_string(), Quantity(mem.into()));
        }
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some(req),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn info(n: Node) -> NodeInfo {
        NodeInfo::new(Arc::new(n))
    }

    fn pinfo(p: Pod) -> PodInfo {
        PodInfo::new(Arc::new(p))
    }

    fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn cordoned_node_is_filtered_unless_tolerated() {
        let mut n = node("n1", "1", "1Gi", "10");
        n.spec = Some(NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let n = info(n);
        let mut p = pod("", "");
        assert_eq!(
            node_unschedulable(&pinfo(p.clone()), &n).map(|f| f.reason),
            Some(reason::UNSCHEDULABLE.to_string())
        );
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("node.kubernetes.io/unschedulable".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
        assert_eq!(node_unschedulable(&pinfo(p), &n), None);
    }

    #[test]
    fn node_name_filter() {
        let mut p = pod("", "");
        p.spec.as_mut().unwrap().node_name = Some("n2".into());
        let p = pinfo(p);
        assert!(node_name(&p, &info(node("n1", "1", "1Gi", "10"))).is_some());
        assert!(node_name(&p, &info(node("n2", "1", "1Gi", "10"))).is_none());
    }

    #[test]
    fn node_selector_and_required_affinity() {
        let n = info(node("n1", "1", "1Gi", "10"));
        let mut p = pod("", "");
        p.spec.as_mut().unwrap().node_selector =
            Some([("zone".to_string(), "b".to_string())].into());
        assert_eq!(
            node_affinity(&pinfo(p.clone()), &n).map(|f| f.reason),
            Some(reason::AFFINITY.into())
        );
        p.spec.as_mut().unwrap().node_selector =
            Some([("zone".to_string(), "a".to_string())].into());
        assert_eq!(node_affinity(&pinfo(p.clone()), &n), None);

        let with_terms = |terms: Vec<NodeSelectorTerm>| {
            let mut p = p.clone();
            p.spec.as_mut().unwrap().affinity = Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: terms,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            node_affinity(&pinfo(p), &n).is_none()
        };
        let expr = |r| NodeSelectorTerm {
            match_expressions: Some(vec![r]),
            ..Default::default()
        };
        assert!(with_terms(vec![expr(req("zone", "In", &["a", "b"]))]));
        assert!(!with_terms(vec![expr(req("zone", "NotIn", &["a"]))]));
        assert!(with_terms(vec![expr(req("zone", "Exists", &[]))]));
        assert!(!with_terms(vec![expr(req("zone", "DoesNotExist", &[]))]));
        assert!(with_terms(vec![expr(req("gpu", "DoesNotExist", &[]))]));
        assert!(with_terms(vec![expr(req("cores", "Gt", &["4"]))]));
        assert!(!with_terms(vec![expr(req("cores", "Lt", &["4"]))]));
        assert!(
            !with_terms(vec![expr(req("zone", "Gt", &["4"]))]),
            "non-integer label"
        );
        // terms are ORed; an empty term matches nothing
        assert!(with_terms(vec![
            expr(req("zone", "In", &["x"])),
            expr(req("zone", "In", &["a"]))
        ]));
        assert!(!with_terms(vec![NodeSelectorTerm::default()]));
        let field = |name: &str| NodeSelectorTerm {
            match_fields: Some(vec![req("metadata.name", "In", &[name])]),
            ..Default::default()
        };
        assert!(with_terms(vec![field("n1")]));
        assert!(!with_terms(vec![field("n2")]));
    }

    #[test]
    fn taints_and_tolerations() {
        let mut n = node("n1", "1", "1Gi", "10");
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "dedicated".into(),
                value: Some("gpu".into()),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let n = info(n);
        let mut p = pod("", "");
        assert_eq!(
            taints(&pinfo(p.clone()), &n).map(|f| f.reason),
            Some("node(s) had untolerated taint {dedicated: gpu}".into())
        );
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("dedicated".into()),
            value: Some("cpu".into()),
            ..Default::default()
        }]);
        assert!(taints(&pinfo(p.clone()), &n).is_some(), "wrong value");
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("dedicated".into()),
            value: Some("gpu".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
        assert!(taints(&pinfo(p.clone()), &n).is_none());
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        }]);
        assert!(
            taints(&pinfo(p.clone()), &n).is_none(),
            "empty key + Exists tolerates all"
        );
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            ..Default::default()
        }]);
        assert!(taints(&pinfo(p), &n).is_some(), "effect mismatch");
    }

    #[test]
    fn prefer_no_schedule_only_scores() {
        let mut n = node("n1", "1", "1Gi", "10");
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "soft".into(),
                effect: "PreferNoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let tainted = info(n);
        let clean = info(node("n2", "1", "1Gi", "10"));
        let p = pinfo(pod("", ""));
        assert!(filter(&p, &tainted).is_empty());
        assert_eq!(prefer_no_schedule_raw(&p, &tainted), 1);
        let s = score(&p, &[&tainted, &clean]);
        assert!(s[1] > s[0], "{s:?}");
    }

    #[test]
    fn resource_fit_reasons() {
        let mut n = info(node("n1", "2", "1Gi", "2"));
        let existing = pinfo(pod("1500m", "512Mi"));
        n.add_pod(&existing);
        let reasons = |p: Pod, n: &NodeInfo| -> Vec<String> {
            resources_fit(&pinfo(p), n)
                .into_iter()
                .map(|f| f.reason)
                .collect()
        };
        assert!(reasons(pod("500m", "512Mi"), &n).is_empty());
        assert_eq!(
            reasons(pod("600m", "600Mi"), &n),
            vec!["Insufficient cpu", "Insufficient memory"]
        );
        let f = resources_fit(&pinfo(pod("3", "")), &n);
        assert!(
            !f[0].resolvable,
            "more than allocatable: preemption cannot help"
        );
        let mut gpu = pod("", "");
        gpu.spec.as_mut().unwrap().containers[0]
            .resources
            .as_mut()
            .unwrap()
            .requests
            .as_mut()
            .unwrap()
            .insert("nvidia.com/gpu".into(), Quantity("2".into()));
        assert_eq!(reasons(gpu, &n), vec!["Insufficient nvidia.com/gpu"]);
        n.add_pod(&pinfo(pod("", "")));
        assert_eq!(reasons(pod("", ""), &n), vec![reason::TOO_MANY_PODS]);
        n.remove_pod(&existing);
        assert!(reasons(pod("1", ""), &n).is_empty());
    }

    #[test]
    fn host_port_conflicts() {
        let with_port = |ip: &str, port: i32, proto: &str| {
            let mut p = pod("", "");
            p.spec.as_mut().unwrap().containers[0].ports = Some(vec![ContainerPort {
                container_port: 80,
                host_port: Some(port),
                host_ip: Some(ip.into()),
                protocol: Some(proto.into()),
                ..Default::default()
            }]);
            pinfo(p)
        };
        let mut n = info(node("n1", "1", "1Gi", "10"));
        n.add_pod(&with_port("10.0.0.1", 8080, "TCP"));
        assert!(host_ports(&with_port("0.0.0.0", 8080, "TCP"), &n).is_some());
        assert!(host_ports(&with_port("10.0.0.1", 8080, "TCP"), &n).is_some());
        assert!(host_ports(&with_port("10.0.0.2", 8080, "TCP"), &n).is_none());
        assert!(host_ports(&with_port("10.0.0.1", 8080, "UDP"), &n).is_none());
        assert!(host_ports(&with_port("10.0.0.1", 8081, "TCP"), &n).is_none());
    }

    #[test]
    fn least_allocated_and_balanced() {
        let empty = info(node("n1", "4", "4Gi", "10"));
        let mut busy = info(node("n2", "4", "4Gi", "10"));
        busy.add_pod(&pinfo(pod("2", "2Gi")));
        let p = pinfo(pod("1", "1Gi"));
        assert_eq!(least_allocated(&p, &empty), 75);
        assert_eq!(least_allocated(&p, &busy), 25);
        assert_eq!(balanced_allocation(&p, &empty), 100);
        let lopsided = pinfo(pod("4", "0"));
        assert_eq!(balanced_allocation(&lopsided, &empty), 50);
        let s = score(&p, &[&empty, &busy]);
        assert!(s[0] > s[1]);
    }

    #[test]
    fn preferred_affinity_scores() {
        let a = info(node("n1", "1", "1Gi", "10"));
        let mut nb = node("n2", "1", "1Gi", "10");
        nb.metadata.labels = Some([("zone".to_string(), "b".to_string())].into());
        let b = info(nb);
        let mut p = pod("", "");
        p.spec.as_mut().unwrap().affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    PreferredSchedulingTerm {
                        weight: 50,
                        preference: NodeSelectorTerm {
                            match_expressions: Some(vec![req("zone", "In", &["b"])]),
                            ..Default::default()
                        },
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        });
        let p = pinfo(p);
        assert_eq!(preferred_affinity_raw(&p, &a), 0);
        assert_eq!(preferred_affinity_raw(&p, &b), 50);
        let s = score(&p, &[&a, &b]);
        assert!(s[1] > s[0], "{s:?}");
    }

    #[test]
    fn fit_error_message_format() {
        let taint = Failure::hard("node(s) had untolerated taint {k: v}");
        let cpu = Failure::soft("Insufficient cpu");
        let per_node = vec![vec![cpu], vec![taint.clone()], vec![taint]];
        let pre = preemption_message(3, &per_node, false);
        assert_eq!(
            fit_error_message(3, &per_node, &pre),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {k: v}. \
             preemption: 0/3 nodes are available: 1 No preemption victims found for incoming pod, \
             2 Preemption is not helpful for scheduling."
        );
    }
}
