//! Cross-node pod traffic: `host-gw` (a route per peer node's pod CIDR via the peer's node IP,
//! all nodes on one L2) and `vxlan` (one VXLAN device per node, VNI 1 on UDP 8472 by default,
//! with a route, a permanent neighbour entry and an FDB entry per peer, laid out as flannel's
//! vxlan backend does: the device carries `<pod-cidr network>/32`, a peer's pod CIDR is routed
//! onlink via the peer's `<pod-cidr network>` address, whose MAC is the peer's VTEP MAC, whose
//! FDB entry points at the peer's node IP). Also IPv4 forwarding, which both need.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;

use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{LinkVxlan, RouteMessageBuilder};

use crate::netlink;
use crate::{Ipv4Cidr, NetError, Network};

/// The VXLAN device of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// Device name (default `skiff.1`).
    pub name: String,
    /// VXLAN network identifier (default 1).
    pub vni: u32,
    /// UDP port (default 8472, as flannel and k3s use).
    pub port: u16,
    /// This node's IP on the underlay (the tunnel source).
    pub local_ip: Ipv4Addr,
}

impl VxlanConfig {
    /// Defaults: `skiff.1`, VNI 1, port 8472.
    pub fn new(local_ip: Ipv4Addr) -> VxlanConfig {
        VxlanConfig {
            name: "skiff.1".into(),
            vni: 1,
            port: 8472,
            local_ip,
        }
    }
}

/// A peer node as the overlay sees it (from the peer's Node object and annotations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPeer {
    /// The peer's pod CIDR.
    pub pod_cidr: Ipv4Cidr,
    /// The peer's node IP on the underlay.
    pub node_ip: Ipv4Addr,
    /// The MAC of the peer's VXLAN device (what [`Network::ensure_vxlan`] returned there).
    pub vtep_mac: [u8; 6],
}

/// VXLAN header (8) + UDP (8) + IPv4 (20) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The MTU of the caller's default-route interface (None without a default route): the
/// underlay MTU a VXLAN overlay subtracts [`VXLAN_OVERHEAD`] from.
pub fn default_route_mtu() -> Result<Option<u32>, NetError> {
    netlink::run(
        None,
        |h| async move { netlink::default_route_mtu(&h).await },
    )
}

impl Network {
    /// Turns on IPv4 forwarding in the network's namespace (pods reach other nodes and VIPs
    /// through it).
    pub fn enable_ip_forwarding(&self) -> Result<(), NetError> {
        self.sysctl_on("/proc/sys/net/ipv4/ip_forward", "")
    }

    /// Makes bridged IPv4 traffic pass the IP netfilter hooks (`bridge-nf-call-iptables`), so
    /// that a pod reaching a service whose endpoint sits on the same bridge gets its replies
    /// un-DNATed (the reply travels pod to pod over the bridge, never through the routing path).
    pub fn enable_bridge_netfilter(&self) -> Result<(), NetError> {
        self.sysctl_on(
            "/proc/sys/net/bridge/bridge-nf-call-iptables",
            " (is the br_netfilter module loaded? modprobe br_netfilter)",
        )
    }

    /// Writes 1 to the sysctl file `path` inside the network's namespace.
    fn sysctl_on(&self, path: &str, hint: &str) -> Result<(), NetError> {
        let write = || {
            std::fs::write(path, "1")
                .map_err(|e| NetError::io(format!("write 1 to {path}{hint}"), e))
        };
        match self.host_netns_fd() {
            None => write(),
            Some(fd) => std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| NetError::io("enter the network namespace (setns)", e))?;
                    write()
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(NetError::io(
                        "sysctl thread",
                        std::io::Error::other("panicked"),
                    ))
                })
            }),
        }
    }

    /// host-gw: routes `pod_cidr` via `node_ip` (which must be on a directly connected network).
    /// Harmless to call again; replaces a route with another next hop.
    pub fn add_host_gw_route(&self, pod_cidr: Ipv4Cidr, node_ip: Ipv4Addr) -> Result<(), NetError> {
        netlink::run(self.host_netns_fd(), |h| async move {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(pod_cidr.network(), pod_cidr.prefix())
                .gateway(node_ip)
                .build();
            h.route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| NetError::netlink(format!("route {pod_cidr} via {node_ip}"), e))
        })
    }

    /// host-gw: removes the route of `pod_cidr`, if any.
    pub fn remove_host_gw_route(&self, pod_cidr: Ipv4Cidr) -> Result<(), NetError> {
        netlink::run(self.host_netns_fd(), |h| async move {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(pod_cidr.network(), pod_cidr.prefix())
                .build();
            ignore_missing(h.route().del(route).execute().await)
                .map_err(|e| NetError::netlink(format!("delete route of {pod_cidr}"), e))
        })
    }

    /// Creates the VXLAN device if absent (learning off, UDP checksums on), gives it
    /// `<pod-cidr network>/32`, sets it up with the network's MTU, and returns its MAC (peers
    /// need it). TX checksum offload is turned off on the device, as flannel does since k3s#2013
    /// (offloaded checksums of VXLAN-encapsulated packets came out wrong on some kernels/NICs,
    /// so cross-node traffic silently died). Harmless to call again. With vxlan, configure
    /// [`crate::NetworkConfig::mtu`] as the underlay MTU minus [`VXLAN_OVERHEAD`], so pods never
    /// send frames the tunnel cannot carry.
    pub fn ensure_vxlan(&self, cfg: &VxlanConfig) -> Result<[u8; 6], NetError> {
        crate::network::check_ifname(&cfg.name)?;
        let vtep = self.ipam().cidr().network();
        let mtu = self.mtu();
        netlink::run(self.host_netns_fd(), |h| async move {
            let name = cfg.name.as_str();
            if netlink::link_by_name(&h, name).await?.is_none() {
                h.link()
                    .add(
                        LinkVxlan::new(name, cfg.vni)
                            .port(cfg.port)
                            .local(cfg.local_ip)
                            .learning(false)
                            .udp_csum(true)
                            .mtu(mtu)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| NetError::netlink(format!("create vxlan device {name}"), e))?;
                tracing::info!(
                    device = name,
                    vni = cfg.vni,
                    port = cfg.port,
                    "created vxlan device"
                );
            }
            let link =
                netlink::link_by_name(&h, name)
                    .await?
                    .ok_or_else(|| NetError::NoSuchLink {
                        name: name.to_string(),
                    })?;
            let index = link.header.index;
            if !netlink::has_addr(&h, index, vtep).await? {
                netlink::add_addr(&h, index, vtep, 32, name).await?;
            }
            netlink::set_up(&h, index, name).await?;
            ethtool_tx_csum(name, Some(false))?;
            netlink::link_mac(&link)
                .ok_or_else(|| NetError::invalid(name, "the vxlan device has no MAC address"))
        })
    }

    /// Whether TX checksum offload is on for the VXLAN device ([`Network::ensure_vxlan`] turns it
    /// off).
    pub fn vxlan_tx_checksum_offload(&self, cfg: &VxlanConfig) -> Result<bool, NetError> {
        let name = cfg.name.as_str();
        netlink::run(self.host_netns_fd(), |_| async move {
            ethtool_tx_csum(name, None)
        })
    }

    /// Deletes the VXLAN device (with its routes, neighbours and FDB entries), if present.
    pub fn delete_vxlan(&self, cfg: &VxlanConfig) -> Result<(), NetError> {
        let name = cfg.name.as_str();
        netlink::run(self.host_netns_fd(), |h| async move {
            netlink::delete_link(&h, name).await.map(|_| ())
        })
    }

    /// Adds (or updates) a peer: route, neighbour and FDB entry. Harmless to call again.
    pub fn set_vxlan_peer(&self, cfg: &VxlanConfig, peer: &VxlanPeer) -> Result<(), NetError> {
        let name = cfg.name.as_str();
        let peer_vtep = peer.pod_cidr.network();
        netlink::run(self.host_netns_fd(), |h| async move {
            let index = netlink::must_index(&h, name).await?;
            h.neighbours()
                .add(index, IpAddr::V4(peer_vtep))
                .link_layer_address(&peer.vtep_mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    NetError::netlink(format!("add neighbour {peer_vtep} on {name}"), e)
                })?;
            h.neighbours()
                .add_bridge(index, &peer.vtep_mac)
                .flags(NeighbourFlags::Own)
                .destination(IpAddr::V4(peer.node_ip))
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    NetError::netlink(format!("add fdb entry for {} on {name}", peer.node_ip), e)
                })?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(peer.pod_cidr.network(), peer.pod_cidr.prefix())
                .gateway(peer_vtep)
                .output_interface(index)
                .onlink()
                .scope(RouteScope::Universe)
                .build();
            h.route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| NetError::netlink(format!("route {} via {name}", peer.pod_cidr), e))
        })
    }

    /// Removes a peer's route, neighbour and FDB entry (those that exist).
    pub fn remove_vxlan_peer(&self, cfg: &VxlanConfig, peer: &VxlanPeer) -> Result<(), NetError> {
        let name = cfg.name.as_str();
        let peer_vtep = peer.pod_cidr.network();
        netlink::run(self.host_netns_fd(), |h| async move {
            let Some(link) = netlink::link_by_name(&h, name).await? else {
                return Ok(());
            };
            let index = link.header.index;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(peer.pod_cidr.network(), peer.pod_cidr.prefix())
                .output_interface(index)
                .build();
            ignore_missing(h.route().del(route).execute().await)
                .map_err(|e| NetError::netlink(format!("delete route of {}", peer.pod_cidr), e))?;
            let mut neigh = NeighbourMessage::default();
            neigh.header.family = AddressFamily::Inet;
            neigh.header.ifindex = index;
            neigh
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    peer_vtep,
                )));
            ignore_missing(h.neighbours().del(neigh).execute().await)
                .map_err(|e| NetError::netlink(format!("delete neighbour {peer_vtep}"), e))?;
            let mut fdb = NeighbourMessage::default();
            fdb.header.family = AddressFamily::Bridge;
            fdb.header.ifindex = index;
            fdb.header.flags = NeighbourFlags::Own;
            fdb.attributes
                .push(NeighbourAttribute::LinkLayerAddress(peer.vtep_mac.to_vec()));
            fdb.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    peer.node_ip,
                )));
            ignore_missing(h.neighbours().del(fdb).execute().await)
                .map_err(|e| NetError::netlink(format!("delete fdb entry for {}", peer.node_ip), e))
        })
    }
}

/// Treats "no such entry" answers as success (removal is idempotent).
fn ignore_missing(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e))
            if [
                nix::errno::Errno::ESRCH,
                nix::errno::Errno::ENOENT,
                nix::errno::Errno::ENODEV,
            ]
            .iter()
            .any(|c| e.raw_code() == -(*c as i32)) =>
        {
            Ok(())
        }
        other => other,
    }
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value` of linux/ethtool.h.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Reads (`set` None) or sets TX checksum offload of interface `name` in the calling thread's
/// network namespace, with the SIOCETHTOOL ioctl; returns the state read (or the one set).
fn ethtool_tx_csum(name: &str, set: Option<bool>) -> Result<bool, NetError> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| NetError::io("open a socket for ethtool", e))?;
    let mut value = EthtoolValue {
        cmd: if set.is_some() {
            ETHTOOL_STXCSUM
        } else {
            ETHTOOL_GTXCSUM
        },
        data: u32::from(set.unwrap_or(false)),
    };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(NetError::invalid(
            name,
            "an interface name has at most 15 bytes",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name and the ethtool_value that ifru_data
    // points at (both live for the call) and writes only into that ethtool_value.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req) };
    if rc != 0 {
        return Err(NetError::io(
            format!("ethtool tx checksum on {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(set.unwrap_or(value.data != 0))
}
