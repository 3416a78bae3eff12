//! The node flags `skiff server` and `skiff agent` share (flattened into both).

use std::net::IpAddr;
use std::path::PathBuf;

/// Node flags of `skiff server` and `skiff agent` (see DESIGN.md, CLI contract).
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// InternalIP of this node (default: the address of the default-route interface).
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// Node label key=value (repeatable).
    #[arg(long = "node-label")]
    node_label: Vec<String>,
    /// Node taint key=value:Effect (repeatable).
    #[arg(long = "node-taint")]
    node_taint: Vec<String>,
    /// Cluster DNS address written into pods' resolv.conf.
    #[arg(long, default_value = "10.43.0.10")]
    cluster_dns: String,
    /// Pod CIDR of this node, instead of waiting for the one node IPAM assigns (tests).
    #[arg(long)]
    pod_cidr: Option<String>,
    /// Port of the kubelet's HTTPS server; 0 picks a free port.
    #[arg(long, default_value_t = 10250)]
    kubelet_port: u16,
    /// resolv.conf whose nameservers the cluster DNS forwards to and dnsPolicy Default pods get
    /// (default: /etc/resolv.conf).
    #[arg(long)]
    resolv_conf: Option<PathBuf>,
    /// How pod traffic reaches other nodes: host-gw (one L2), vxlan (UDP 8472) or none.
    #[arg(long, default_value = "vxlan", value_parser = ["host-gw", "vxlan", "none"])]
    network_backend: String,
    /// A kubelet flag as name=value, as k3s passes them (repeatable): eviction-hard,
    /// eviction-pressure-transition-period, image-gc-high-threshold, image-gc-low-threshold,
    /// minimum-image-ttl-duration, housekeeping-interval.
    #[arg(long = "kubelet-arg")]
    kubelet_arg: Vec<String>,
    /// An external CRI runtime to run pods with instead of the built-in one, e.g.
    /// unix:///run/containerd/containerd.sock (its CNI conf_dir must be
    /// <data-dir>/agent/etc/cni/net.d, where skiff writes the pod network's conflist).
    #[arg(long)]
    container_runtime_endpoint: Option<String>,
    /// Run external CNI plugins (ADD/DEL/CHECK) with the network configuration in this dir (the
    /// first *.conf, *.conflist or *.json in lexical order) instead of the built-in bridge
    /// attach; built-in runtime only. Use bridge `cni0` over the node's pod CIDR so that pods
    /// reach the cluster DNS and Service VIPs.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// Where the CNI plugins are (repeatable, searched in order; default /usr/lib/cni, then
    /// /opt/cni/bin).
    #[arg(long = "cni-bin-dir")]
    cni_bin_dir: Vec<PathBuf>,
}

impl NodeArgs {
    /// The app's node flags; the error names the bad flag.
    pub fn into_flags(self) -> Result<skiff_app::server::NodeFlags, String> {
        let network_backend = self
            .network_backend
            .parse()
            .map_err(|e| format!("--network-backend: {e}"))?;
        Ok(skiff_app::server::NodeFlags {
            node_ip: self.node_ip,
            labels: self.node_label,
            taints: self.node_taint,
            cluster_dns: self.cluster_dns,
            pod_cidr: self.pod_cidr,
            kubelet_port: self.kubelet_port,
            resolv_conf: self.resolv_conf,
            network_backend,
            kubelet_args: self.kubelet_arg,
            container_runtime_endpoint: self.container_runtime_endpoint,
            cni_conf_dir: self.cni_conf_dir,
            cni_bin_dirs: self.cni_bin_dir,
        })
    }
}
