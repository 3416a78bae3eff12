//! Resource arithmetic: quantity parsing, a pod's effective requests (init-container rule,
//! sidecars, overhead) and a node's allocatable, as integers (milli-CPU, bytes, counts).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Requests assumed for scoring when a container asks for no CPU (milli-cores), as kube-scheduler does.
pub const DEFAULT_MILLI_CPU: i64 = 100;
/// Requests assumed for scoring when a container asks for no memory (bytes).
pub const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// A vector of resources: CPU in milli-cores, memory and ephemeral storage in bytes, and any other
/// (extended) resource by name as an integer count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU in milli-cores.
    pub milli_cpu: i64,
    /// Memory in bytes.
    pub memory: i64,
    /// Ephemeral storage in bytes.
    pub ephemeral_storage: i64,
    /// Extended resources (`nvidia.com/gpu`, hugepages-*, ...).
    pub scalar: BTreeMap<String, i64>,
}

/// Parses a Kubernetes quantity (`100m`, `1.5`, `128Mi`, `1G`, `1e3`) into its value.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0f64.powi(3),
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        e if e.starts_with('e') || e.starts_with('E') => 10f64.powi(e[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    Some(n * mult)
}

fn milli(q: &Quantity) -> i64 {
    parse_quantity(&q.0)
        .map(|v| (v * 1000.0).ceil() as i64)
        .unwrap_or(0)
}

fn value(q: &Quantity) -> i64 {
    parse_quantity(&q.0).map(|v| v.ceil() as i64).unwrap_or(0)
}

impl Resources {
    /// Builds a vector from a resource list (`requests`, `allocatable`, `overhead`).
    pub fn from_list(list: &BTreeMap<String, Quantity>) -> Self {
        let mut r = Resources::default();
        for (name, q) in list {
            r.set(name, q);
        }
        r
    }

    fn set(&mut self, name: &str, q: &Quantity) {
        match name {
            "cpu" => self.milli_cpu = milli(q),
            "memory" => self.memory = value(q),
            "ephemeral-storage" => self.ephemeral_storage = value(q),
            // pods is a node capacity, not a request; handled by the caller.
            "pods" => {}
            other => {
                self.scalar.insert(other.to_string(), value(q));
            }
        }
    }

    /// Adds `o` to `self`.
    pub fn add(&mut self, o: &Resources) {
        self.milli_cpu += o.milli_cpu;
        self.memory += o.memory;
        self.ephemeral_storage += o.ephemeral_storage;
        for (k, v) in &o.scalar {
            *self.scalar.entry(k.clone()).or_default() += v;
        }
    }

    /// Subtracts `o` from `self`.
    pub fn sub(&mut self, o: &Resources) {
        self.milli_cpu -= o.milli_cpu;
        self.memory -= o.memory;
        self.ephemeral_storage -= o.ephemeral_storage;
        for (k, v) in &o.scalar {
            *self.scalar.entry(k.clone()).or_default() -= v;
        }
    }

    /// Element-wise maximum.
    pub fn max_with(&mut self, o: &Resources) {
        self.milli_cpu = self.milli_cpu.max(o.milli_cpu);
        self.memory = self.memory.max(o.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(o.ephemeral_storage);
        for (k, v) in &o.scalar {
            let e = self.scalar.entry(k.clone()).or_default();
            *e = (*e).max(*v);
        }
    }
}

/// A container's requests; a resource with a limit but no request requests its limit (what API
/// defaulting does).
fn container_requests(c: &Container) -> Resources {
    let Some(r) = c.resources.as_ref() else {
        return Resources::default();
    };
    let mut list = r.limits.clone().unwrap_or_default();
    list.extend(r.requests.clone().unwrap_or_default());
    Resources::from_list(&list)
}

/// Requests of one container with kube-scheduler's non-zero defaults for CPU and memory.
fn container_non_zero(c: &Container) -> (i64, i64) {
    let r = c.resources.as_ref();
    let get = |name: &str| {
        r.and_then(|r| r.requests.as_ref())
            .and_then(|m| m.get(name))
            .or_else(|| r.and_then(|r| r.limits.as_ref()).and_then(|m| m.get(name)))
    };
    let cpu = get("cpu").map(milli).unwrap_or(DEFAULT_MILLI_CPU);
    let mem = get("memory").map(value).unwrap_or(DEFAULT_MEMORY);
    (cpu, mem)
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The pod's effective request: the larger of (app containers + sidecars) and the peak during
/// init (each regular init container plus the sidecars started before it), plus pod overhead.
/// Requests default to limits when only limits are set.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = pod.spec.as_ref() else {
        return Resources::default();
    };
    let mut apps = Resources::default();
    for c in &spec.containers {
        apps.add(&container_requests(c));
    }
    let mut sidecars = Resources::default();
    let mut init_peak = Resources::default();
    for c in spec.init_containers.iter().flatten() {
        let req = container_requests(c);
        if is_sidecar(c) {
            sidecars.add(&req);
            init_peak.max_with(&sidecars);
        } else {
            let mut during = sidecars.clone();
            during.add(&req);
            init_peak.max_with(&during);
        }
    }
    let mut total = apps;
    total.add(&sidecars);
    total.max_with(&init_peak);
    if let Some(o) = spec.overhead.as_ref() {
        total.add(&Resources::from_list(o));
    }
    total
}

/// CPU (milli) and memory requests used for scoring, with 100m / 200Mi for containers that ask
/// for nothing (so that best-effort pods still spread).
pub fn pod_non_zero(pod: &Pod) -> (i64, i64) {
    let Some(spec) = pod.spec.as_ref() else {
        return (0, 0);
    };
    let (mut cpu, mut mem) = (0, 0);
    let (mut sc_cpu, mut sc_mem) = (0, 0);
    let (mut peak_cpu, mut peak_mem) = (0, 0);
    for c in &spec.containers {
        let (a, b) = container_non_zero(c);
        cpu += a;
        mem += b;
    }
    for c in spec.init_containers.iter().flatten() {
        let (a, b) = container_non_zero(c);
        if is_sidecar(c) {
            sc_cpu += a;
            sc_mem += b;
            peak_cpu = peak_cpu.max(sc_cpu);
            peak_mem = peak_mem.max(sc_mem);
        } else {
            peak_cpu = peak_cpu.max(sc_cpu + a);
            peak_mem = peak_mem.max(sc_mem + b);
        }
    }
    let mut cpu = (cpu + sc_cpu).max(peak_cpu);
    let mut mem = (mem + sc_mem).max(peak_mem);
    if let Some(o) = spec.overhead.as_ref() {
        cpu += o.get("cpu").map(milli).unwrap_or(0);
        mem += o.get("memory").map(value).unwrap_or(0);
    }
    (cpu, mem)
}

/// A node's allocatable resources (falling back to capacity) and its pod limit.
pub fn node_allocatable(node: &Node) -> (Resources, i64) {
    let status = node.status.as_ref();
    let list = status
        .and_then(|s| s.allocatable.as_ref())
        .or_else(|| status.and_then(|s| s.capacity.as_ref()));
    let Some(list) = list else {
        return (Resources::default(), 0);
    };
    let pods = list.get("pods").map(value).unwrap_or(0);
    (Resources::from_list(list), pods)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};

    fn c(cpu: &str, mem: &str) -> Container {
        let mut req = BTreeMap::new();
        if !cpu.is_empty() {
            req.insert("cpu".to_string(), Quantity(cpu.into()));
        }
        if !mem.is_empty() {
            req.insert("memory".to_string(), Quantity(mem.into()));
        }
        Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: Some(req),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1.5"), Some(1.5));
        assert_eq!(parse_quantity("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("12x"), None);
        assert_eq!(milli(&Quantity("250m".into())), 250);
        assert_eq!(milli(&Quantity("1".into())), 1000);
    }

    #[test]
    fn init_containers_use_the_effective_request_rule() {
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![c("100m", "100Mi"), c("200m", "")],
                init_containers: Some(vec![c("500m", "50Mi"), c("100m", "1Gi")]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = pod_requests(&pod);
        assert_eq!(r.milli_cpu, 500, "max(sum apps=300, max init=500)");
        assert_eq!(r.memory, 1024 * 1024 * 1024, "max(100Mi, 1Gi)");
    }

    #[test]
    fn sidecars_add_to_apps_and_to_later_inits() {
        let mut sidecar = c("200m", "");
        sidecar.restart_policy = Some("Always".into());
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![c("100m", "")],
                init_containers: Some(vec![sidecar, c("250m", "")]),
                overhead: Some([("cpu".to_string(), Quantity("10m".into()))].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        // apps + sidecar = 300m; init peak = sidecar 200m + init 250m = 450m; + 10m overhead.
        assert_eq!(pod_requests(&pod).milli_cpu, 460);
    }

    #[test]
    fn non_zero_defaults() {
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![c("", ""), c("300m", "")],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(pod_non_zero(&pod), (400, 2 * DEFAULT_MEMORY));
        assert_eq!(pod_requests(&pod).milli_cpu, 300);
    }
}
