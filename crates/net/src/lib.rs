//! Pod network primitives for skiff, with no Kubernetes types: the node bridge, one veth pair per
//! pod sandbox, host-local IPAM persisted on disk, the service-CIDR route, and nftables tables
//! built from a small typed model and applied atomically.
//!
//! The kubelet calls [`Network::attach`]/[`Network::detach`] with a sandbox's netns path; the
//! service proxy builds a [`nft::Table`] and hands it to [`nft::Nft::apply`]; cross-node traffic
//! uses [`Network::add_host_gw_route`] or [`Network::ensure_vxlan`] + [`Network::set_vxlan_peer`].
//! With external CNI plugins the kubelet uses [`cni::CniExecutor`] (ADD/DEL/CHECK) instead.

mod cidr;
pub mod cni;
mod error;
mod ipam;
mod netlink;
mod network;
pub mod nft;
mod overlay;

pub use cidr::Ipv4Cidr;
pub use error::NetError;
pub use ipam::Ipam;
pub use network::{
    DEFAULT_BRIDGE, FALLBACK_MTU, Network, NetworkConfig, PodInterface, host_veth_name,
};
pub use overlay::{VXLAN_OVERHEAD, VxlanConfig, VxlanPeer, default_route_mtu};
