//! The Node object: registration (labels, taints, capacity, addresses, nodeInfo, conditions,
//! daemon endpoint), the Lease in `kube-node-lease` renewed every 10 s, and node status written
//! only when it changed or once a minute.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ContainerImage, DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints,
    NodeSpec, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use skiff_runtime::Runtime;

use crate::config::{KubeletConfig, KubeletError, api_err};

/// Pods per node.
pub const MAX_PODS: i64 = 110;

pub(crate) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The node's InternalIP: the flag, else the address the kernel would use for the default route,
/// else loopback. A connected UDP socket sends nothing; it only asks the routing table.
pub fn detect_node_ip(flag: Option<Ipv4Addr>) -> Ipv4Addr {
    if let Some(ip) = flag {
        return ip;
    }
    let probe = || -> std::io::Result<Ipv4Addr> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect("192.0.2.1:9")?;
        match s.local_addr()?.ip() {
            std::net::IpAddr::V4(a) => Ok(a),
            std::net::IpAddr::V6(_) => Ok(Ipv4Addr::LOCALHOST),
        }
    };
    probe().unwrap_or(Ipv4Addr::LOCALHOST)
}

pub(crate) fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// (total, available) bytes of the file system holding `path`.
pub(crate) fn disk_bytes(path: &std::path::Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frsize = st.fragment_size() as u64;
    Some((
        st.blocks() as u64 * frsize,
        st.blocks_available() as u64 * frsize,
    ))
}

fn uname_field(f: impl Fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr) -> String {
    nix::sys::utsname::uname()
        .map(|u| f(&u).to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".into())
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

fn machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Node labels: well-known ones, the control-plane role, then `--node-label`s.
pub fn node_labels(cfg: &KubeletConfig) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert("kubernetes.io/hostname".into(), cfg.node_name.clone());
    l.insert("kubernetes.io/os".into(), "linux".into());
    l.insert("kubernetes.io/arch".into(), go_arch().into());
    l.insert("beta.kubernetes.io/os".into(), "linux".into());
    l.insert("beta.kubernetes.io/arch".into(), go_arch().into());
    if cfg.control_plane {
        l.insert(
            "node-role.kubernetes.io/control-plane".into(),
            "true".into(),
        );
    }
    l.extend(cfg.labels.clone());
    l
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> NodeCondition {
    NodeCondition {
        type_: kind.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now()),
        last_transition_time: Some(now()),
    }
}

/// The node status as measured now (heartbeat times set to now).
pub async fn node_status(
    cfg: &KubeletConfig,
    node_ip: Ipv4Addr,
    port: u16,
    runtime: &dyn Runtime,
    pressure: &crate::eviction::SharedPressure,
    network_ready: bool,
) -> NodeStatus {
    use crate::eviction::Condition;
    let holds = |c: Condition| pressure.read().is_ok_and(|p| p.holds(c));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let mem_kib = meminfo_kib("MemTotal:").unwrap_or(0);
    let (disk_total, _) = disk_bytes(&cfg.root_dir).unwrap_or((0, 0));
    let mut capacity = BTreeMap::new();
    capacity.insert("cpu".to_string(), Quantity(cpus.to_string()));
    capacity.insert("memory".to_string(), Quantity(format!("{mem_kib}Ki")));
    capacity.insert(
        "ephemeral-storage".to_string(),
        Quantity(format!("{}Ki", disk_total / 1024)),
    );
    capacity.insert("pods".to_string(), Quantity(MAX_PODS.to_string()));
    capacity.insert("hugepages-2Mi".to_string(), Quantity("0".into()));
    capacity.insert("hugepages-1Gi".to_string(), Quantity("0".into()));
    // Allocatable = capacity minus the hard eviction thresholds (memory 100Mi, disk 10%).
    let mut allocatable = capacity.clone();
    allocatable.insert(
        "memory".to_string(),
        Quantity(format!("{}Ki", mem_kib.saturating_sub(100 * 1024))),
    );
    allocatable.insert(
        "ephemeral-storage".to_string(),
        Quantity(format!("{}", disk_total / 10 * 9)),
    );
    let mut images: Vec<ContainerImage> = runtime
        .list_images()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|i| {
            let mut names = i.names;
            names.push(i.id);
            ContainerImage {
                names: Some(names),
                size_bytes: Some(i.size as i64),
            }
        })
        .collect();
    images.sort_by_key(|i| std::cmp::Reverse(i.size_bytes));
    images.truncate(50);
    NodeStatus {
        capacity: Some(capacity),
        allocatable: Some(allocatable),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: node_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: cfg.node_name.clone(),
            },
        ]),
        conditions: Some(vec![
            if holds(Condition::Memory) {
                condition(
                    "MemoryPressure",
                    "True",
                    "KubeletHasInsufficientMemory",
                    "kubelet has insufficient memory available",
                )
            } else {
                condition(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                )
            },
            if holds(Condition::Disk) {
                condition(
                    "DiskPressure",
                    "True",
                    "KubeletHasDiskPressure",
                    "kubelet has disk pressure",
                )
            } else {
                condition(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "kubelet has no disk pressure",
                )
            },
            if holds(Condition::Pid) {
                condition(
                    "PIDPressure",
                    "True",
                    "KubeletHasInsufficientPID",
                    "kubelet has insufficient PID available",
                )
            } else {
                condition(
                    "PIDPressure",
                    "False",
                    "KubeletHasSufficientPID",
                    "kubelet has sufficient PID available",
                )
            },
            if network_ready {
                condition(
                    "Ready",
                    "True",
                    "KubeletReady",
                    "kubelet is posting ready status",
                )
            } else {
                // The kubelet's words while the CNI network is not set up yet.
                condition(
                    "Ready",
                    "False",
                    "KubeletNotReady",
                    "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized",
                )
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(port),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: go_arch().into(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            container_runtime_version: format!(
                "{}://{}",
                runtime.name(),
                runtime.version().unwrap_or_else(|| cfg.version.clone())
            ),
            kernel_version: uname_field(|u| u.release()),
            kube_proxy_version: format!("v1.35.0-skiff.{}", cfg.version),
            kubelet_version: format!("v1.35.0-skiff.{}", cfg.version),
            machine_id: machine_id(),
            operating_system: "linux".into(),
            os_image: os_image(),
            system_uuid: std::fs::read_to_string("/sys/class/dmi/id/product_uuid")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            ..Default::default()
        }),
        images: Some(images),
        ..Default::default()
    }
}

/// The status with heartbeat and transition times cleared, for change detection.
fn comparable(st: &NodeStatus) -> serde_json::Value {
    let mut st = st.clone();
    for c in st.conditions.iter_mut().flatten() {
        c.last_heartbeat_time = None;
        c.last_transition_time = None;
    }
    serde_json::to_value(&st).unwrap_or_default()
}

/// Keeps the previous transition times of conditions whose status did not change.
fn carry_transitions(new: &mut NodeStatus, old: Option<&NodeStatus>) {
    let Some(old) = old.and_then(|o| o.conditions.as_ref()) else {
        return;
    };
    for c in new.conditions.iter_mut().flatten() {
        if let Some(o) = old.iter().find(|o| o.type_ == c.type_)
            && o.status == c.status
            && o.last_transition_time.is_some()
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

/// Registers and maintains the Node and its Lease.
pub struct NodeAgent {
    client: kube::Client,
    cfg: Arc<KubeletConfig>,
    runtime: Arc<dyn Runtime>,
    node_ip: Ipv4Addr,
    port: u16,
    last_written: Option<(serde_json::Value, Instant)>,
    pressure: crate::eviction::SharedPressure,
    /// Whether the pod network is set up: the node is Ready only then (as the kubelet is
    /// NotReady until its CNI network is), so that pods are not sent to a node that cannot start
    /// them yet. None: no network to wait for.
    network_ready: Option<tokio::sync::watch::Receiver<bool>>,
}

impl NodeAgent {
    /// An agent for the node in `cfg` whose kubelet server listens on `port`.
    pub fn new(
        client: kube::Client,
        cfg: Arc<KubeletConfig>,
        runtime: Arc<dyn Runtime>,
        port: u16,
    ) -> NodeAgent {
        let node_ip = detect_node_ip(cfg.node_ip);
        NodeAgent {
            client,
            cfg,
            runtime,
            node_ip,
            port,
            last_written: None,
            pressure: Arc::default(),
            network_ready: None,
        }
    }

    /// The node is Ready only once `ready` turns true (the pod network is set up); its status is
    /// written at once when it does.
    pub fn with_network_ready(mut self, ready: tokio::sync::watch::Receiver<bool>) -> NodeAgent {
        self.network_ready = Some(ready);
        self
    }

    fn network_is_ready(&self) -> bool {
        self.network_ready.as_ref().is_none_or(|r| *r.borrow())
    }

    /// Takes the pressure conditions from this state (the eviction manager's).
    pub fn with_pressure(mut self, pressure: crate::eviction::SharedPressure) -> NodeAgent {
        self.pressure = pressure;
        self
    }

    /// The node's InternalIP.
    pub fn node_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    /// Creates the Node, or updates labels, taints and status of an existing one.
    pub async fn register(&mut self) -> Result<Node, KubeletError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let status = node_status(
            &self.cfg,
            self.node_ip,
            self.port,
            &*self.runtime,
            &self.pressure,
            self.network_is_ready(),
        )
        .await;
        let taints = (!self.cfg.taints.is_empty()).then(|| self.cfg.taints.clone());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(self.cfg.node_name.clone()),
                labels: Some(node_labels(&self.cfg)),
                annotations: Some(BTreeMap::from([(
                    "node.alpha.kubernetes.io/ttl".to_string(),
                    "0".to_string(),
                )])),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: taints.clone(),
                ..Default::default()
            }),
            status: Some(status.clone()),
        };
        let created = match nodes.create(&PostParams::default(), &node).await {
            Ok(n) => {
                tracing::info!(node = %self.cfg.node_name, "node registered");
                n
            }
            Err(kube::Error::Api(ae)) if ae.code == 409 => {
                let patch = serde_json::json!({
                    "metadata": {"labels": node_labels(&self.cfg)},
                    "spec": {"taints": taints},
                });
                nodes
                    .patch(
                        &self.cfg.node_name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map_err(api_err(format!("updating node {}", self.cfg.node_name)))?;
                self.write_status(true).await?;
                tracing::info!(node = %self.cfg.node_name, "node re-registered");
                nodes
                    .get(&self.cfg.node_name)
                    .await
                    .map_err(api_err(format!("reading node {}", self.cfg.node_name)))?
            }
            Err(e) => {
                return Err(api_err(format!("creating node {}", self.cfg.node_name))(e));
            }
        };
        self.last_written = Some((comparable(&status), Instant::now()));
        Ok(created)
    }

    /// Writes node status when it changed, or when `force`, or once per status interval.
    /// Returns whether it wrote.
    pub async fn write_status(&mut self, force: bool) -> Result<bool, KubeletError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut status = node_status(
            &self.cfg,
            self.node_ip,
            self.port,
            &*self.runtime,
            &self.pressure,
            self.network_is_ready(),
        )
        .await;
        let cmp = comparable(&status);
        let due = match &self.last_written {
            None => true,
            Some((prev, at)) => *prev != cmp || at.elapsed() >= self.cfg.status_interval,
        };
        if !force && !due {
            return Ok(false);
        }
        let current = nodes
            .get_status(&self.cfg.node_name)
            .await
            .map_err(api_err(format!("reading node {}", self.cfg.node_name)))?;
        carry_transitions(&mut status, current.status.as_ref());
        let patch = serde_json::json!({"status": status});
        nodes
            .patch_status(
                &self.cfg.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(api_err(format!(
                "writing status of node {}",
                self.cfg.node_name
            )))?;
        self.last_written = Some((cmp, Instant::now()));
        Ok(true)
    }

    /// Creates or renews the node's Lease.
    pub async fn renew_lease(&self) -> Result<(), KubeletError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let name = &self.cfg.node_name;
        let renew = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let duration = (self.cfg.lease_interval.as_secs() * 4).max(1) as i32;
        match leases
            .get_opt(name)
            .await
            .map_err(api_err("reading lease"))?
        {
            Some(mut l) => {
                let spec = l.spec.get_or_insert_with(Default::default);
                spec.renew_time = Some(renew);
                spec.holder_identity = Some(name.clone());
                spec.lease_duration_seconds = Some(duration);
                leases
                    .replace(name, &PostParams::default(), &l)
                    .await
                    .map_err(api_err(format!("renewing lease kube-node-lease/{name}")))?;
            }
            None => {
                let nodes: Api<Node> = Api::all(self.client.clone());
                let owner = nodes.get_opt(name).await.ok().flatten().map(|n| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: name.clone(),
                        uid: n.metadata.uid.unwrap_or_default(),
                        ..Default::default()
                    }
                });
                let l = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some("kube-node-lease".into()),
                        owner_references: owner.map(|o| vec![o]),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(name.clone()),
                        lease_duration_seconds: Some(duration),
                        renew_time: Some(renew),
                        ..Default::default()
                    }),
                };
                leases
                    .create(&PostParams::default(), &l)
                    .await
                    .map_err(api_err(format!("creating lease kube-node-lease/{name}")))?;
            }
        }
        Ok(())
    }

    /// Renews the lease every lease interval and checks status every 10 s until `stop` fires.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut lease_tick = tokio::time::interval(self.cfg.lease_interval);
        let mut status_tick =
            tokio::time::interval(self.cfg.lease_interval.min(Duration::from_secs(10)));
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut network = self.network_ready.clone();
        loop {
            let network_changed = async {
                match network.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => return,
                changed = network_changed => {
                    if !changed {
                        // The sender is gone (the kubelet is stopping): readiness is final.
                        network = None;
                        continue;
                    }
                    if let Err(e) = self.write_status(false).await {
                        tracing::warn!(error = %e, "node status update failed");
                    }
                }
                _ = lease_tick.tick() => {
                    if let Err(e) = self.renew_lease().await {
                        tracing::warn!(error = %e, "lease renewal failed");
                    }
                }
                _ = status_tick.tick() => {
                    if let Err(e) = self.write_status(false).await {
                        tracing::warn!(error = %e, "node status update failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_include_role_and_flags() {
        let mut cfg = KubeletConfig::new("n1", "/tmp/x");
        cfg.control_plane = true;
        cfg.labels.insert("zone".into(), "a".into());
        let l = node_labels(&cfg);
        assert_eq!(l["kubernetes.io/hostname"], "n1");
        assert_eq!(l["node-role.kubernetes.io/control-plane"], "true");
        assert_eq!(l["zone"], "a");
        assert_eq!(l["kubernetes.io/os"], "linux");
    }

    #[test]
    fn comparable_ignores_heartbeats() {
        let a = NodeStatus {
            conditions: Some(vec![condition("Ready", "True", "r", "m")]),
            ..Default::default()
        };
        let mut b = a.clone();
        if let Some(c) = b.conditions.as_mut() {
            c[0].last_heartbeat_time =
                Some(Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap()));
        }
        assert_eq!(comparable(&a), comparable(&b));
        if let Some(c) = b.conditions.as_mut() {
            c[0].status = "False".into();
        }
        assert_ne!(comparable(&a), comparable(&b));
    }
}
