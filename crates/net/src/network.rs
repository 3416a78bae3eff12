//! The node's pod network: one bridge with the gateway address, one veth pair per pod sandbox
//! (pod side `eth0` in the sandbox's netns, host side on the bridge with hairpin mode on), and
//! addresses from the host-local [`Ipam`].
//!
//! All calls block (netlink on a helper thread); call them from `spawn_blocking` in async code.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{
    LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use sha2::{Digest, Sha256};

use crate::netlink::{self, open_netns};
use crate::{Ipam, Ipv4Cidr, NetError};

/// The default bridge name.
pub const DEFAULT_BRIDGE: &str = "cni0";
/// The MTU used when there is no default route to learn it from.
pub const FALLBACK_MTU: u32 = 1500;

/// How the node's pod network is laid out.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Bridge name (at most 15 bytes; default `cni0`).
    pub bridge_name: String,
    /// The node's pod CIDR, e.g. 10.42.0.0/24.
    pub pod_cidr: Ipv4Cidr,
    /// The bridge's address (default: the first host address of the pod CIDR).
    pub gateway: Option<Ipv4Addr>,
    /// MTU for the bridge and veths (default: that of the default-route interface, else 1500).
    pub mtu: Option<u32>,
    /// Where IPAM state lives (e.g. `<data-dir>/agent/net`).
    pub state_dir: PathBuf,
    /// The network namespace the bridge lives in (default: the caller's). Tests point this at a
    /// namespace they created, so the host's own network is never touched.
    pub host_netns: Option<PathBuf>,
}

impl NetworkConfig {
    /// Defaults: bridge `cni0`, gateway = first address, MTU detected, the caller's namespace.
    pub fn new(pod_cidr: Ipv4Cidr, state_dir: impl Into<PathBuf>) -> NetworkConfig {
        NetworkConfig {
            bridge_name: DEFAULT_BRIDGE.to_string(),
            pod_cidr,
            gateway: None,
            mtu: None,
            state_dir: state_dir.into(),
            host_netns: None,
        }
    }
}

/// What a pod got from [`Network::attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Prefix length of the pod CIDR.
    pub prefix: u8,
    /// The default gateway inside the pod (the bridge address).
    pub gateway: Ipv4Addr,
    /// The pod interface's MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Name of the host end of the veth pair.
    pub host_veth: String,
    /// The interface name inside the pod.
    pub ifname: String,
    /// MTU of the pod interface.
    pub mtu: u32,
}

/// A node's pod network.
#[derive(Debug)]
pub struct Network {
    cfg: NetworkConfig,
    gateway: Ipv4Addr,
    mtu: u32,
    ipam: Ipam,
    host_netns: Option<OwnedFd>,
    /// The bridge's ifindex as the last [`Network::ensure_bridge`] found it: attaches use it
    /// without asking again (a stale one fails the attach's first try, which then ensures the
    /// bridge and tries once more).
    bridge_index: Mutex<Option<u32>>,
}

impl Network {
    /// Checks the config, opens the IPAM state and detects the MTU. Creates no links.
    pub fn new(cfg: NetworkConfig) -> Result<Network, NetError> {
        check_ifname(&cfg.bridge_name)?;
        let gateway = match cfg.gateway {
            Some(g) => g,
            None => cfg.pod_cidr.nth(1).ok_or_else(|| {
                NetError::invalid(cfg.pod_cidr.to_string(), "the pod CIDR has no host address")
            })?,
        };
        let ipam = Ipam::new(cfg.state_dir.join("ipam"), cfg.pod_cidr, gateway)?;
        let host_netns = cfg.host_netns.as_deref().map(open_netns).transpose()?;
        let mtu = match cfg.mtu {
            Some(m) if (68..=65535).contains(&m) => m,
            Some(m) => return Err(NetError::invalid(m.to_string(), "an MTU is 68..=65535")),
            None => netlink::run(host_netns.as_ref(), |h| async move {
                netlink::default_route_mtu(&h).await
            })?
            .unwrap_or(FALLBACK_MTU),
        };
        Ok(Network {
            cfg,
            gateway,
            mtu,
            ipam,
            host_netns,
            bridge_index: Mutex::new(None),
        })
    }

    /// The bridge's address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The MTU given to the bridge and every pod interface.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The bridge's name.
    pub fn bridge_name(&self) -> &str {
        &self.cfg.bridge_name
    }

    pub(crate) fn host_netns_fd(&self) -> Option<&OwnedFd> {
        self.host_netns.as_ref()
    }

    /// The address allocator.
    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// Creates the bridge if absent, gives it the gateway address if missing, and sets it up.
    /// Harmless to call again.
    pub fn ensure_bridge(&self) -> Result<(), NetError> {
        let (name, gw, prefix, mtu) = (
            self.cfg.bridge_name.as_str(),
            self.gateway,
            self.cfg.pod_cidr.prefix(),
            self.mtu,
        );
        netlink::run(self.host_netns.as_ref(), |h| async move {
            let index = match netlink::link_by_name(&h, name).await? {
                Some(link) => link.header.index,
                None => {
                    match h
                        .link()
                        .add(LinkBridge::new(name).mtu(mtu).build())
                        .execute()
                        .await
                    {
                        Ok(()) => tracing::info!(bridge = name, %gw, mtu, "created pod bridge"),
                        // Created concurrently (the kubelet and the node's DNS both ensure it).
                        Err(e) if is_eexist(&e) => {}
                        Err(e) => {
                            return Err(NetError::netlink(format!("create bridge {name}"), e));
                        }
                    }
                    netlink::must_index(&h, name).await?
                }
            };
            if !netlink::has_addr(&h, index, gw).await? {
                match netlink::add_addr(&h, index, gw, prefix, &format!("bridge {name}")).await {
                    Ok(()) => {}
                    // Added concurrently: check it is there now.
                    Err(e) if netlink::has_addr(&h, index, gw).await? => {
                        tracing::debug!(bridge = name, error = %e, "gateway address added concurrently");
                    }
                    Err(e) => return Err(e),
                }
            }
            netlink::set_up(&h, index, &format!("bridge {name}")).await?;
            Ok(index)
        })
        .map(|index| {
            if let Ok(mut cached) = self.bridge_index.lock() {
                *cached = Some(index);
            }
        })
    }

    fn cached_bridge_index(&self) -> Option<u32> {
        self.bridge_index.lock().ok().and_then(|c| *c)
    }

    /// Deletes the bridge (and with it nothing else: pods must be detached first). Harmless when
    /// it is already gone.
    pub fn delete_bridge(&self) -> Result<(), NetError> {
        let name = self.cfg.bridge_name.as_str();
        netlink::run(self.host_netns.as_ref(), |h| async move {
            netlink::delete_link(&h, name).await.map(|_| ())
        })
    }

    /// Routes `service_cidr` to the bridge (scope link), so that a packet to a service VIP
    /// that no rule translated never leaves the machine. Harmless to call again.
    pub fn ensure_service_route(&self, service_cidr: Ipv4Cidr) -> Result<(), NetError> {
        let name = self.cfg.bridge_name.as_str();
        netlink::run(self.host_netns.as_ref(), |h| async move {
            let index = netlink::must_index(&h, name).await?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(service_cidr.network(), service_cidr.prefix())
                .output_interface(index)
                .scope(RouteScope::Link)
                .build();
            h.route().add(route).replace().execute().await.map_err(|e| {
                NetError::netlink(format!("route service CIDR {service_cidr} to {name}"), e)
            })
        })
    }

    /// Removes the route of `service_cidr` to the bridge if present.
    pub fn delete_service_route(&self, service_cidr: Ipv4Cidr) -> Result<(), NetError> {
        let name = self.cfg.bridge_name.as_str();
        netlink::run(self.host_netns.as_ref(), |h| async move {
            let Some(link) = netlink::link_by_name(&h, name).await? else {
                return Ok(());
            };
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(service_cidr.network(), service_cidr.prefix())
                .output_interface(link.header.index)
                .scope(RouteScope::Link)
                .build();
            match h.route().del(route).execute().await {
                Ok(()) => Ok(()),
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code() == -(nix::errno::Errno::ESRCH as i32) =>
                {
                    Ok(())
                }
                Err(e) => Err(NetError::netlink(
                    format!("delete route of {service_cidr} on {name}"),
                    e,
                )),
            }
        })
    }

    /// Gives sandbox `sandbox_id` an interface `ifname` in the network namespace at
    /// `netns_path`: an address from the pool, a default route via the gateway, `lo` up. Creates
    /// the bridge if needed. Attaching an already attached sandbox rebuilds its interface with
    /// the same address. Leaves nothing behind on failure.
    pub fn attach(
        &self,
        sandbox_id: &str,
        netns_path: &Path,
        ifname: &str,
    ) -> Result<PodInterface, NetError> {
        let started = Instant::now();
        check_ifname(ifname)?;
        let pod_netns = open_netns(netns_path)?;
        let known_bridge = self.cached_bridge_index();
        if known_bridge.is_none() {
            self.ensure_bridge()?;
        }
        let ip = self.ipam.allocate(sandbox_id)?;
        let mut result = self.wire(sandbox_id, &pod_netns, ifname, ip);
        if let (Err(error), Some(_)) = (&result, known_bridge) {
            // The bridge may be gone or rebuilt since it was last seen: make sure of it and try
            // once more (wire rebuilds what the first try left).
            tracing::debug!(sandbox = sandbox_id, %error, "attach failed with the known bridge; ensuring it and retrying");
            if let Ok(mut cached) = self.bridge_index.lock() {
                *cached = None;
            }
            result = self
                .ensure_bridge()
                .and_then(|()| self.wire(sandbox_id, &pod_netns, ifname, ip));
        }
        match result {
            Ok(pod) => {
                tracing::debug!(
                    sandbox = sandbox_id,
                    %ip,
                    veth = %pod.host_veth,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "pod attached"
                );
                Ok(pod)
            }
            Err(err) => {
                let host = host_veth_name(sandbox_id);
                let cleanup = netlink::run(self.host_netns.as_ref(), |h| async move {
                    netlink::delete_link(&h, &host).await
                });
                if let Err(error) = cleanup {
                    tracing::warn!(sandbox = sandbox_id, %error, "cleanup after failed attach");
                }
                if let Err(error) = self.ipam.release(sandbox_id) {
                    tracing::warn!(sandbox = sandbox_id, %error, "release after failed attach");
                }
                Err(err)
            }
        }
    }

    fn wire(
        &self,
        sandbox_id: &str,
        pod_netns: &OwnedFd,
        ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<PodInterface, NetError> {
        let host = host_veth_name(sandbox_id);
        let peer = peer_veth_name(sandbox_id);
        let Some(bridge_index) = self.cached_bridge_index() else {
            return Err(NetError::NoSuchLink {
                name: self.cfg.bridge_name.clone(),
            });
        };
        let mac = pod_mac(sandbox_id);
        let (bridge, mtu) = (self.cfg.bridge_name.as_str(), self.mtu);
        let (hostr, peerr) = (host.as_str(), peer.as_str());
        // Every request below takes the kernel's global rtnl lock, which a burst of pods starting
        // together contends for (with namespace creation, among others), so an attach asks as
        // little as it can: the bridge index is known, the pod end is created with its MAC (no
        // lookup of it afterwards), and `lo` is ifindex 1 in every namespace. (The pod end
        // cannot be created up: a veth end opens only once its peer is linked, after both
        // are registered.)
        //
        // One RTM_NEWLINK makes the whole pair: the host end on the bridge and up, the pod end
        // created in the sandbox's namespace under its final name. Creating the pod end on the
        // host and then moving and renaming it costs an RCU barrier and two RCU grace periods,
        // all under rtnl. One queue per end spares the grace period of shrinking the default
        // per-CPU queues of a registered device.
        let create = |h: rtnetlink::Handle| {
            let mac = mac.to_vec();
            async move {
                let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
                    .name(ifname)
                    .mtu(mtu)
                    .address(mac)
                    .setns_by_fd(pod_netns.as_raw_fd())
                    .append_extra_attribute(LinkAttribute::NumTxQueues(1))
                    .append_extra_attribute(LinkAttribute::NumRxQueues(1))
                    .build();
                let msg = LinkVeth::new(hostr, ifname)
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
                    .mtu(mtu)
                    .controller(bridge_index)
                    .append_extra_attribute(LinkAttribute::NumTxQueues(1))
                    .append_extra_attribute(LinkAttribute::NumRxQueues(1))
                    .up()
                    .build();
                let mut made = false;
                for attempt in 0..2 {
                    match h.link().add(msg.clone()).execute().await {
                        Ok(()) => {
                            made = true;
                            break;
                        }
                        // A leftover from an earlier attach of the same sandbox is rebuilt
                        // from scratch (deleting the host end deletes the pod end too). `peerr`
                        // is where older versions created the pod end before moving it.
                        Err(e) if is_eexist(&e) && attempt == 0 => {
                            netlink::delete_link(&h, hostr).await?;
                            netlink::delete_link(&h, peerr).await?;
                        }
                        Err(e) if is_eexist(&e) => {}
                        Err(e) => {
                            return Err(NetError::netlink(
                                format!(
                                    "create veth pair {hostr} (on {bridge}) / {ifname} (in the sandbox)"
                                ),
                                e,
                            ));
                        }
                    }
                }
                if !made {
                    return Ok(false);
                }
                let host_index = netlink::must_index(&h, hostr).await?;
                h.link()
                    .set_port(LinkBridgePort::new(host_index).hairpin(true).build())
                    .execute()
                    .await
                    .map_err(|e| {
                        NetError::netlink(format!("turn on hairpin mode on {hostr}"), e)
                    })?;
                Ok(true)
            }
        };
        if !netlink::run(self.host_netns.as_ref(), create)? {
            // A stale interface of that name in the sandbox (e.g. left by another network)
            // blocks the pod end: remove it and try once more.
            netlink::run(Some(pod_netns), |h| async move {
                if let Some(old) = netlink::link_by_name(&h, ifname).await? {
                    h.link()
                        .del(old.header.index)
                        .execute()
                        .await
                        .map_err(|e| {
                            NetError::netlink(format!("delete stale {ifname} in the sandbox"), e)
                        })?;
                }
                Ok(())
            })?;
            if !netlink::run(self.host_netns.as_ref(), create)? {
                return Err(NetError::invalid(
                    ifname,
                    format!("{hostr} or {ifname} in the sandbox already exists"),
                ));
            }
        }
        let (gw, prefix) = (self.gateway, self.cfg.pod_cidr.prefix());
        netlink::run(Some(pod_netns), |h| async move {
            let index = netlink::must_index(&h, ifname).await?;
            netlink::add_addr(&h, index, ip, prefix, ifname).await?;
            netlink::set_up(&h, index, ifname).await?;
            netlink::set_up(&h, LOOPBACK_IFINDEX, "lo").await?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .output_interface(index)
                .gateway(gw)
                .build();
            h.route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| NetError::netlink(format!("add default route via {gw}"), e))
        })?;
        Ok(PodInterface {
            ip,
            prefix,
            gateway: gw,
            mac: format_mac(mac),
            host_veth: host,
            ifname: ifname.to_string(),
            mtu,
        })
    }

    /// Removes sandbox `sandbox_id`'s veth pair and releases its address. Harmless when already
    /// detached, and when the namespace at `netns_path` is gone. The pair is removed from the host
    /// side (which removes the pod end too), so `netns_path` is only logged; it is taken to keep
    /// the call shaped like CNI DEL.
    pub fn detach(&self, sandbox_id: &str, netns_path: &Path) -> Result<(), NetError> {
        let host = host_veth_name(sandbox_id);
        let peer = peer_veth_name(sandbox_id);
        let (hostr, peerr) = (host.as_str(), peer.as_str());
        netlink::run(self.host_netns.as_ref(), |h| async move {
            netlink::delete_link(&h, hostr).await?;
            // A half-made attach may have left the peer on this side.
            netlink::delete_link(&h, peerr).await?;
            Ok(())
        })?;
        let released = self.ipam.release(sandbox_id)?;
        tracing::debug!(sandbox = sandbox_id, netns = %netns_path.display(), ip = ?released, "pod detached");
        Ok(())
    }
}

/// `lo`'s ifindex: the kernel registers the loopback device first in every network namespace,
/// with this index.
const LOOPBACK_IFINDEX: u32 = 1;

/// The pod interface's MAC: locally administered, unicast, from the sandbox id's SHA-256 (so a
/// rebuilt interface keeps it, and no lookup is needed to report it).
pub fn pod_mac(sandbox_id: &str) -> [u8; 6] {
    let h = Sha256::digest(format!("skiff-pod-mac:{sandbox_id}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&h[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// The host-side veth name of a sandbox: `veth` + 11 hex digits of the id's SHA-256, so that
/// detach finds it from the id alone (also after a restart).
pub fn host_veth_name(sandbox_id: &str) -> String {
    format!("veth{}", &id_hash(sandbox_id)[..11])
}

fn peer_veth_name(sandbox_id: &str) -> String {
    format!("vpod{}", &id_hash(sandbox_id)[..11])
}

fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Interface names: 1..=15 bytes, no '/', ':' or whitespace.
pub(crate) fn check_ifname(name: &str) -> Result<(), NetError> {
    let reason = if name.is_empty() || name.len() > 15 {
        Some("an interface name has 1 to 15 bytes")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("an interface name must not contain '/', ':' or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetError::invalid(name, reason)),
        None => Ok(()),
    }
}

fn is_eexist(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -(nix::errno::Errno::EEXIST as i32))
}

#[cfg(test)]
mod tests {

    #[test]
    fn pod_macs_are_local_unicast_and_stable_per_sandbox() {
        let a = pod_mac("sandbox-a");
        assert_eq!(a, pod_mac("sandbox-a"));
        assert_ne!(a, pod_mac("sandbox-b"));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }

    use super::*;

    #[test]
    fn veth_names_are_stable_and_short() {
        let a = host_veth_name("sandbox-a");
        assert_eq!(a, host_veth_name("sandbox-a"));
        assert_ne!(a, host_veth_name("sandbox-b"));
        assert_eq!(a.len(), 15);
        assert!(check_ifname(&a).is_ok());
        assert!(check_ifname(&peer_veth_name("x")).is_ok());
        assert!(check_ifname("a-name-that-is-too-long").is_err());
        assert_eq!(format_mac([0xaa, 0, 1, 2, 3, 0xff]), "aa:00:01:02:03:ff");
    }
}
