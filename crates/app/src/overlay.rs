//! Cross-node pod traffic (`--network-backend`), the part of flannel's job that k3s runs in every
//! node: this node publishes its backend in its Node's annotations (flannel's names:
//! `flannel.alpha.coreos.com/backend-type`, `.../backend-data` with the VTEP MAC for vxlan,
//! `.../public-ip`), watches every Node and programs, with the net crate, one route per peer's
//! `spec.podCIDR` via the peer's IP (host-gw) or the VXLAN device with a route, neighbour and FDB
//! entry per peer (vxlan). Entries follow Node changes and deletions. What it created is
//! recorded in `<net-state-dir>/overlay.json`, removed on clean shutdown and by `skiff killall`
//! ([`cleanup`]); routes and devices it did not create are never touched.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use skiff_net::{Ipv4Cidr, Network, NetworkConfig, VxlanConfig, VxlanPeer};
use tokio::sync::watch;

/// Annotation naming the backend (`vxlan`, `host-gw`).
pub const ANN_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// Annotation with the backend's data (vxlan: `{"VNI":1,"VtepMAC":"..."}`).
pub const ANN_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// Annotation with the node's underlay address.
pub const ANN_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// Annotation flannel's kube subnet manager sets.
pub const ANN_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// State file (under the net state dir) of what the overlay created.
pub const STATE_FILE: &str = "overlay.json";

/// How pod traffic crosses nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkBackend {
    /// A route per peer's pod CIDR via the peer's node IP (all nodes on one L2).
    HostGw,
    /// VXLAN (VNI 1, UDP 8472), as k3s's default flannel backend.
    #[default]
    Vxlan,
    /// Nothing: another tool connects the nodes, or there is one node.
    None,
}

impl std::str::FromStr for NetworkBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host-gw" => Ok(NetworkBackend::HostGw),
            "vxlan" => Ok(NetworkBackend::Vxlan),
            "none" => Ok(NetworkBackend::None),
            other => Err(format!(
                "unknown network backend {other:?} (expected host-gw, vxlan or none)"
            )),
        }
    }
}

impl std::fmt::Display for NetworkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkBackend::HostGw => "host-gw",
            NetworkBackend::Vxlan => "vxlan",
            NetworkBackend::None => "none",
        })
    }
}

/// What the overlay of one node needs.
#[derive(Debug, Clone)]
pub(crate) struct OverlayConfig {
    pub backend: NetworkBackend,
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Cidr,
    pub net_state_dir: PathBuf,
    pub mtu: Option<u32>,
}

/// A peer as programmed: its pod CIDR, node IP and (vxlan) VTEP MAC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Peer {
    pod_cidr: String,
    node_ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vtep_mac: Option<String>,
}

/// What the overlay created on this host (persisted for `skiff killall`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    /// This node's pod CIDR (to open the network again in killall).
    #[serde(default)]
    pod_cidr: Option<String>,
    /// The VXLAN device, when this node created one.
    #[serde(default)]
    vxlan_device: Option<String>,
    /// host-gw routes by peer node name.
    #[serde(default)]
    host_gw: BTreeMap<String, Peer>,
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(out)
}

/// The peer a Node describes for `backend`, if it is complete (pod CIDR, IPv4 address and, for
/// vxlan, a vxlan VTEP MAC).
fn peer_of(node: &Node, backend: NetworkBackend) -> Option<Peer> {
    let pod_cidr = node.spec.as_ref()?.pod_cidr.as_deref()?;
    let cidr: Ipv4Cidr = pod_cidr.parse().ok()?;
    let ann = node.metadata.annotations.as_ref();
    let public_ip = ann
        .and_then(|a| a.get(ANN_PUBLIC_IP))
        .and_then(|s| s.parse::<Ipv4Addr>().ok());
    let internal_ip = || {
        node.status
            .as_ref()?
            .addresses
            .as_ref()?
            .iter()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
    };
    let node_ip = public_ip.or_else(internal_ip)?;
    let vtep_mac = match backend {
        NetworkBackend::Vxlan => {
            let a = ann?;
            if a.get(ANN_BACKEND_TYPE).map(String::as_str) != Some("vxlan") {
                return None;
            }
            let data: serde_json::Value = serde_json::from_str(a.get(ANN_BACKEND_DATA)?).ok()?;
            let mac = data.get("VtepMAC")?.as_str()?;
            parse_mac(mac)?;
            Some(mac.to_ascii_lowercase())
        }
        _ => None,
    };
    Some(Peer {
        pod_cidr: cidr.to_string(),
        node_ip,
        vtep_mac,
    })
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

fn load_state(dir: &Path) -> State {
    std::fs::read(state_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_state(dir: &Path, st: &State) {
    let path = state_path(dir);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(st).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), error = %e, "could not record the overlay state");
    }
}

/// Programs and removes peers on this host; owns the persisted state.
struct Programmer {
    cfg: OverlayConfig,
    net: Network,
    vxlan: VxlanConfig,
    state: State,
    /// vxlan peers programmed (by node name).
    vxlan_peers: BTreeMap<String, Peer>,
}

impl Programmer {
    fn vxlan_peer(p: &Peer) -> Option<VxlanPeer> {
        Some(VxlanPeer {
            pod_cidr: p.pod_cidr.parse().ok()?,
            node_ip: p.node_ip,
            vtep_mac: parse_mac(p.vtep_mac.as_deref()?)?,
        })
    }

    fn add(&mut self, name: &str, p: &Peer) -> Result<(), String> {
        match self.cfg.backend {
            NetworkBackend::HostGw => {
                let cidr: Ipv4Cidr = p
                    .pod_cidr
                    .parse()
                    .map_err(|_| format!("pod CIDR {:?} is not an IPv4 CIDR", p.pod_cidr))?;
                // Record first: a crash between the two leaves a record, never an orphan route.
                self.state.host_gw.insert(name.to_string(), p.clone());
                save_state(&self.cfg.net_state_dir, &self.state);
                self.net
                    .add_host_gw_route(cidr, p.node_ip)
                    .map_err(|e| e.to_string())?;
            }
            NetworkBackend::Vxlan => {
                if let Some(vp) = Self::vxlan_peer(p) {
                    self.net
                        .set_vxlan_peer(&self.vxlan, &vp)
                        .map_err(|e| e.to_string())?;
                    self.vxlan_peers.insert(name.to_string(), p.clone());
                }
            }
            NetworkBackend::None => {}
        }
        tracing::info!(peer = name, pod_cidr = %p.pod_cidr, node_ip = %p.node_ip, backend = %self.cfg.backend, "overlay peer programmed");
        Ok(())
    }

    fn remove(&mut self, name: &str) {
        match self.cfg.backend {
            NetworkBackend::HostGw => {
                if let Some(p) = self.state.host_gw.get(name).cloned() {
                    if let Ok(cidr) = p.pod_cidr.parse::<Ipv4Cidr>()
                        && let Err(e) = self.net.remove_host_gw_route(cidr)
                    {
                        tracing::warn!(peer = name, error = %e, "removing a host-gw route");
                    }
                    self.state.host_gw.remove(name);
                    save_state(&self.cfg.net_state_dir, &self.state);
                }
            }
            NetworkBackend::Vxlan => {
                if let Some(p) = self.vxlan_peers.remove(name)
                    && let Some(vp) = Self::vxlan_peer(&p)
                    && let Err(e) = self.net.remove_vxlan_peer(&self.vxlan, &vp)
                {
                    tracing::warn!(peer = name, error = %e, "removing a vxlan peer");
                }
            }
            NetworkBackend::None => {}
        }
        tracing::info!(peer = name, "overlay peer removed");
    }

    fn programmed(&self) -> BTreeMap<String, Peer> {
        match self.cfg.backend {
            NetworkBackend::HostGw => self.state.host_gw.clone(),
            _ => self.vxlan_peers.clone(),
        }
    }

    /// Makes the host match `nodes`.
    fn reconcile(&mut self, nodes: &[Arc<Node>]) {
        let mut want = BTreeMap::new();
        for n in nodes {
            let Some(name) = n.metadata.name.as_deref() else {
                continue;
            };
            if name == self.cfg.node_name || n.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if let Some(p) = peer_of(n, self.cfg.backend) {
                if p.pod_cidr == self.cfg.pod_cidr.to_string() {
                    continue;
                }
                want.insert(name.to_string(), p);
            }
        }
        let have = self.programmed();
        for (name, p) in &have {
            if want.get(name) != Some(p) {
                self.remove(name);
            }
        }
        for (name, p) in &want {
            if have.get(name) != Some(p)
                && let Err(e) = self.add(name, p)
            {
                tracing::warn!(peer = %name, error = %e, "programming an overlay peer; retrying later");
                // Forget it so the next pass retries.
                self.state.host_gw.remove(name);
                self.vxlan_peers.remove(name);
            }
        }
    }

    /// Removes everything this node created (routes, the VXLAN device) and the state file.
    fn teardown(&mut self) {
        let names: Vec<String> = self.programmed().into_keys().collect();
        for n in names {
            self.remove(&n);
        }
        if self.cfg.backend == NetworkBackend::Vxlan {
            match self.net.delete_vxlan(&self.vxlan) {
                Ok(()) => tracing::info!(device = %self.vxlan.name, "vxlan device deleted"),
                Err(e) => {
                    tracing::warn!(device = %self.vxlan.name, error = %e, "deleting the vxlan device")
                }
            }
        }
        let _ = std::fs::remove_file(state_path(&self.cfg.net_state_dir));
    }
}

/// Resolves when `stop` is true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sets this node's flannel annotations, retrying until it works or `stop` fires.
async fn publish(
    nodes: &Api<Node>,
    name: &str,
    annotations: serde_json::Value,
    stop: &watch::Receiver<bool>,
) {
    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
    loop {
        match nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(node = name, error = %e, "publishing the overlay annotations")
            }
        }
        tokio::select! {
            _ = stopped(stop.clone()) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Runs the overlay until `stop` fires, then removes what it created.
pub(crate) async fn run(client: kube::Client, cfg: OverlayConfig, stop: watch::Receiver<bool>) {
    if cfg.backend == NetworkBackend::None {
        tracing::info!("network backend none: no cross-node routes");
        return;
    }
    let mut nc = NetworkConfig::new(cfg.pod_cidr, cfg.net_state_dir.clone());
    nc.mtu = cfg.mtu;
    let net = match Network::new(nc) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "overlay: opening the pod network; no cross-node routes");
            return;
        }
    };
    let vxlan = VxlanConfig::new(cfg.node_ip);
    let mut state = load_state(&cfg.net_state_dir);
    state.pod_cidr = Some(cfg.pod_cidr.to_string());
    let mut annotations = serde_json::json!({
        ANN_BACKEND_TYPE: cfg.backend.to_string(),
        ANN_PUBLIC_IP: cfg.node_ip.to_string(),
        ANN_KUBE_SUBNET_MANAGER: "true",
    });
    if cfg.backend == NetworkBackend::Vxlan {
        state.vxlan_device = Some(vxlan.name.clone());
        save_state(&cfg.net_state_dir, &state);
        let mac = loop {
            match net.ensure_vxlan(&vxlan) {
                Ok(m) => break m,
                Err(e) => {
                    tracing::warn!(error = %e, "creating the vxlan device (is the vxlan module available? skiff check-config); retrying in 5s")
                }
            }
            tokio::select! {
                _ = stopped(stop.clone()) => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        };
        annotations[ANN_BACKEND_DATA] = serde_json::Value::String(
            serde_json::json!({"VNI": vxlan.vni, "VtepMAC": format_mac(&mac)}).to_string(),
        );
        tracing::info!(device = %vxlan.name, vtep_mac = %format_mac(&mac), "vxlan device ready");
    } else {
        save_state(&cfg.net_state_dir, &state);
    }
    let mut prog = Programmer {
        cfg: cfg.clone(),
        net,
        vxlan,
        state,
        vxlan_peers: BTreeMap::new(),
    };
    let nodes: Api<Node> = Api::all(client);
    publish(&nodes, &cfg.node_name, annotations, &stop).await;

    let (reader, writer) = reflector::store::<Node>();
    // Raw watcher events, not `touched_objects()`: that yields the initial list's objects
    // before the store is ready and nothing for the end of the list, so a node that saw no
    // later change would program its routes only at the next resync.
    let mut events = std::pin::pin!(
        reflector(writer, watcher(nodes, watcher::Config::default())).default_backoff()
    );
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    let mut stop_fut = std::pin::pin!(stopped(stop.clone()));
    loop {
        tokio::select! {
            _ = &mut stop_fut => break,
            ev = events.next() => {
                match ev {
                    // Mid-list: the store is not ready yet; InitDone reconciles.
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "overlay node watch");
                        continue;
                    }
                    None => break,
                }
            }
            _ = resync.tick() => {}
        }
        // Never wait for the store here: only polling `events` makes it ready.
        if matches!(
            futures::FutureExt::now_or_never(reader.wait_until_ready()),
            Some(Ok(()))
        ) {
            let nodes = reader.state();
            tokio::task::block_in_place(|| prog.reconcile(&nodes));
        }
    }
    tokio::task::block_in_place(|| prog.teardown());
    tracing::info!("overlay stopped; its routes are removed");
}

/// `skiff killall`: removes what the overlay of `net_state_dir` recorded (host-gw routes, the
/// VXLAN device) in the caller's network namespace. Returns one line per item removed.
pub fn cleanup(net_state_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    if !state_path(net_state_dir).exists() {
        return done;
    }
    let st = load_state(net_state_dir);
    if let Some(cidr) = st
        .pod_cidr
        .as_deref()
        .and_then(|c| c.parse::<Ipv4Cidr>().ok())
        && let Ok(net) = Network::new(NetworkConfig::new(cidr, net_state_dir))
    {
        for (name, p) in &st.host_gw {
            if let Ok(c) = p.pod_cidr.parse::<Ipv4Cidr>()
                && net.remove_host_gw_route(c).is_ok()
            {
                done.push(format!(
                    "removed route {} via {} (node {name})",
                    p.pod_cidr, p.node_ip
                ));
            }
        }
        if let Some(dev) = &st.vxlan_device {
            let vx = VxlanConfig {
                name: dev.clone(),
                ..VxlanConfig::new(Ipv4Addr::UNSPECIFIED)
            };
            if net.delete_vxlan(&vx).is_ok() {
                done.push(format!("removed vxlan device {dev}"));
            }
        }
    }
    let _ = std::fs::remove_file(state_path(net_state_dir));
    done
}

/// The pod MTU for `backend` (vxlan: the default-route MTU, else 1500, minus the overhead).
pub(crate) fn pod_mtu(backend: NetworkBackend) -> Option<u32> {
    match backend {
        NetworkBackend::Vxlan => {
            let underlay = skiff_net::default_route_mtu()
                .ok()
                .flatten()
                .unwrap_or(skiff_net::FALLBACK_MTU);
            Some(underlay.saturating_sub(skiff_net::VXLAN_OVERHEAD).max(576))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    fn node(name: &str, cidr: &str, ip: &str, ann: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.into()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn backends_parse() {
        assert_eq!("host-gw".parse(), Ok(NetworkBackend::HostGw));
        assert_eq!("vxlan".parse(), Ok(NetworkBackend::Vxlan));
        assert_eq!("none".parse(), Ok(NetworkBackend::None));
        assert!("flannel".parse::<NetworkBackend>().is_err());
        assert_eq!(NetworkBackend::default(), NetworkBackend::Vxlan);
    }

    #[test]
    fn peers_come_from_pod_cidr_address_and_vtep_annotations() {
        let n = node("a", "10.42.1.0/24", "192.0.2.1", &[]);
        let p = peer_of(&n, NetworkBackend::HostGw).unwrap();
        assert_eq!(p.pod_cidr, "10.42.1.0/24");
        assert_eq!(p.node_ip, "192.0.2.1".parse::<Ipv4Addr>().unwrap());
        // vxlan needs the peer's VTEP MAC.
        assert_eq!(peer_of(&n, NetworkBackend::Vxlan), None);
        let n = node(
            "a",
            "10.42.1.0/24",
            "192.0.2.1",
            &[
                (ANN_BACKEND_TYPE, "vxlan"),
                (
                    ANN_BACKEND_DATA,
                    r#"{"VNI":1,"VtepMAC":"AA:bb:cc:dd:ee:01"}"#,
                ),
                (ANN_PUBLIC_IP, "198.51.100.7"),
            ],
        );
        let p = peer_of(&n, NetworkBackend::Vxlan).unwrap();
        assert_eq!(p.vtep_mac.as_deref(), Some("aa:bb:cc:dd:ee:01"));
        assert_eq!(p.node_ip, "198.51.100.7".parse::<Ipv4Addr>().unwrap());
        let bad = node(
            "a",
            "10.42.1.0/24",
            "192.0.2.1",
            &[
                (ANN_BACKEND_TYPE, "vxlan"),
                (ANN_BACKEND_DATA, r#"{"VtepMAC":"zz"}"#),
            ],
        );
        assert_eq!(peer_of(&bad, NetworkBackend::Vxlan), None);
        assert_eq!(
            peer_of(&node("b", "", "192.0.2.1", &[]), NetworkBackend::HostGw),
            None
        );
        assert_eq!(
            parse_mac(&format_mac(&[1, 2, 3, 4, 5, 255])),
            Some([1, 2, 3, 4, 5, 255])
        );
    }

    #[test]
    fn cleanup_without_state_does_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(cleanup(tmp.path()).is_empty());
    }
}
