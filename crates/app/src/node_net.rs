//! The node's service network (server and agent): once the node's pod CIDR is known, make sure
//! the pod bridge (with the gateway address) and the service-CIDR route exist, set the sysctls
//! the data path needs, then run the overlay (cross-node routes), the service proxy (`inet skiff`
//! table, deleted on shutdown) and the node-local cluster DNS on `<gateway>:53`, until the node
//! stops.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use skiff_kubelet::KubeletConfig;
use skiff_net::Ipv4Cidr;
use tokio::sync::watch;

use crate::node::{NodeClients, NodeConfig};
use crate::server::AppError;

/// What the service network of one node needs, checked before anything starts.
#[derive(Debug, Clone)]
pub(crate) struct ServicesSetup {
    node_name: String,
    node_ip: Option<Ipv4Addr>,
    cluster_dns: Ipv4Addr,
    cluster_cidr: Option<Ipv4Cidr>,
    pod_cidr_override: Option<Ipv4Cidr>,
    resolv_conf: PathBuf,
    network_backend: crate::overlay::NetworkBackend,
}

fn parse_cidr(flag: &str, s: &str) -> Result<Ipv4Cidr, AppError> {
    s.parse()
        .map_err(|e| AppError::Config(format!("{flag} {s:?} is not an IPv4 CIDR: {e}")))
}

/// Resolves when `stop` is true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps `d`; true when `stop` fired meanwhile (or before).
async fn sleep_or_stop(stop: &watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = stopped(stop.clone()) => true,
        _ = tokio::time::sleep(d) => *stop.borrow(),
    }
}

impl ServicesSetup {
    /// Checks the flags the proxy and the DNS use.
    pub(crate) fn new(cfg: &NodeConfig, kcfg: &KubeletConfig) -> Result<ServicesSetup, AppError> {
        Ok(ServicesSetup {
            node_name: cfg.node_name.clone(),
            node_ip: kcfg.node_ip,
            cluster_dns: kcfg.cluster_dns,
            cluster_cidr: cfg
                .cluster_cidr
                .as_deref()
                .map(|c| parse_cidr("--cluster-cidr", c))
                .transpose()?,
            pod_cidr_override: cfg
                .pod_cidr
                .as_deref()
                .map(|c| parse_cidr("--pod-cidr", c))
                .transpose()?,
            resolv_conf: kcfg.resolv_conf.clone(),
            network_backend: cfg.network_backend,
        })
    }

    /// The override, else the Node's `spec.podCIDR` once node IPAM set it; None when stopped.
    async fn pod_cidr(
        &self,
        client: &kube::Client,
        stop: &watch::Receiver<bool>,
    ) -> Option<Ipv4Cidr> {
        if let Some(c) = self.pod_cidr_override {
            return Some(c);
        }
        let nodes: Api<Node> = Api::all(client.clone());
        loop {
            match nodes.get_opt(&self.node_name).await {
                Ok(Some(n)) => {
                    if let Some(c) = n.spec.and_then(|s| s.pod_cidr).filter(|c| !c.is_empty()) {
                        match c.parse::<Ipv4Cidr>() {
                            Ok(cidr) => return Some(cidr),
                            Err(e) => {
                                tracing::warn!(node = %self.node_name, pod_cidr = %c, error = %e, "node spec.podCIDR is not an IPv4 CIDR")
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(node = %self.node_name, error = %e, "reading the node"),
            }
            if sleep_or_stop(stop, Duration::from_secs(1)).await {
                return None;
            }
        }
    }

    /// Upstream resolvers of the cluster DNS: the resolv.conf's nameservers, without the
    /// node's own DNS addresses (that would loop).
    fn upstreams(&self, gateway: Ipv4Addr) -> Vec<SocketAddr> {
        match skiff_dns::read_resolv_conf(&self.resolv_conf) {
            Ok(v) => v
                .into_iter()
                .filter(|a| a.ip() != gateway && a.ip() != self.cluster_dns)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "no DNS upstreams: names outside the cluster will not resolve");
                Vec::new()
            }
        }
    }

    /// Runs until `stop` fires: waits for the pod CIDR, ensures the bridge and the service
    /// route, sets the sysctls, then runs the proxy and the DNS.
    pub(crate) async fn run(
        self,
        clients: NodeClients,
        kcfg: KubeletConfig,
        stop: watch::Receiver<bool>,
    ) {
        let Some(cidr) = self.pod_cidr(&clients.proxy, &stop).await else {
            return;
        };
        let Some(gateway) = cidr.nth(1) else {
            tracing::error!(pod_cidr = %cidr, "the pod CIDR has no gateway address; no service proxy or DNS");
            return;
        };
        // The kubelet ensures the same bridge; both are idempotent.
        loop {
            let k = kcfg.clone();
            match tokio::task::spawn_blocking(move || skiff_kubelet::setup_network(&k, cidr)).await
            {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => tracing::warn!(error = %e, "pod bridge not ready; retrying in 1s"),
                Err(e) => tracing::warn!(error = %e, "pod bridge task failed; retrying in 1s"),
            }
            if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                return;
            }
        }
        let _ = tokio::task::spawn_blocking(set_sysctls).await;

        let node_ip = skiff_kubelet::node::detect_node_ip(self.node_ip);
        let proxy_cfg = skiff_proxy::ProxyConfig {
            node_name: self.node_name.clone(),
            node_ips: vec![node_ip],
            cluster_dns: Some(self.cluster_dns),
            dns_target: Some(gateway),
            pod_cidr: Some(cidr),
            cluster_cidr: self.cluster_cidr,
            delete_table_on_shutdown: true,
            ..Default::default()
        };
        let upstreams = self.upstreams(gateway);
        let dns_cfg = skiff_dns::DnsConfig {
            listen: SocketAddr::from((gateway, 53)),
            resolv_conf: None,
            upstreams,
            ..Default::default()
        };
        tracing::info!(
            node_ip = %node_ip,
            pod_cidr = %cidr,
            dns = %dns_cfg.listen,
            upstreams = ?dns_cfg.upstreams,
            "starting the service proxy and the cluster DNS"
        );
        let overlay_cfg = crate::overlay::OverlayConfig {
            backend: self.network_backend,
            node_name: self.node_name.clone(),
            node_ip,
            pod_cidr: cidr,
            net_state_dir: kcfg.net_state_dir.clone(),
            mtu: kcfg.pod_mtu,
        };
        tokio::join!(
            crate::overlay::run(clients.kubelet, overlay_cfg, stop.clone()),
            run_proxy(clients.proxy, proxy_cfg, stop.clone()),
            run_dns(clients.dns, dns_cfg, stop.clone()),
        );
    }
}

/// The proxy until `stop`; restarted after an error.
async fn run_proxy(
    client: kube::Client,
    cfg: skiff_proxy::ProxyConfig,
    stop: watch::Receiver<bool>,
) {
    loop {
        let r = skiff_proxy::run(client.clone(), cfg.clone(), stopped(stop.clone())).await;
        let done = *stop.borrow();
        match r {
            Ok(()) if done => return,
            Ok(()) => tracing::error!("service proxy ended; restarting in 2s"),
            Err(e) if done => {
                tracing::error!(error = %e, "service proxy shutdown failed");
                return;
            }
            Err(e) => tracing::error!(error = %e, "service proxy failed; restarting in 2s"),
        }
        if sleep_or_stop(&stop, Duration::from_secs(2)).await {
            return;
        }
    }
}

/// The DNS server until `stop`; restarted after an error (e.g. the address not bindable yet).
async fn run_dns(client: kube::Client, cfg: skiff_dns::DnsConfig, stop: watch::Receiver<bool>) {
    loop {
        let r = skiff_dns::run(client.clone(), cfg.clone(), stopped(stop.clone())).await;
        if *stop.borrow() {
            if let Err(e) = r {
                tracing::error!(error = %e, "cluster dns shutdown failed");
            }
            tracing::info!(listen = %cfg.listen, "cluster dns stopped");
            return;
        }
        match r {
            Ok(()) => tracing::error!("cluster dns ended; restarting in 2s"),
            Err(e) => tracing::error!(error = %e, "cluster dns failed; restarting in 2s"),
        }
        if sleep_or_stop(&stop, Duration::from_secs(2)).await {
            return;
        }
    }
}

/// Sets `key` (a path under /proc/sys) to `want`; logs what it did.
fn set_sysctl(key: &str, want: &str) {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let had = std::fs::read_to_string(&path).map(|s| s.trim().to_string());
    match had {
        Ok(v) if v == want => tracing::info!(sysctl = key, value = want, "sysctl already set"),
        Ok(v) => match std::fs::write(&path, want) {
            Ok(()) => tracing::info!(sysctl = key, from = %v, to = want, "sysctl set"),
            Err(e) => tracing::warn!(sysctl = key, value = %v, want, error = %e, "sysctl not set"),
        },
        Err(e) => tracing::warn!(sysctl = key, error = %e, "sysctl not readable"),
    }
}

/// `net.ipv4.ip_forward=1` (pods reach the outside and NodePorts forward), and
/// `net.bridge.bridge-nf-call-iptables=1` when br_netfilter is (or can be) loaded, so that
/// replies between pods on the bridge pass conntrack and service DNAT is undone.
fn set_sysctls() {
    set_sysctl("net.ipv4.ip_forward", "1");
    let bridge = Path::new("/proc/sys/net/bridge");
    if !bridge.exists() {
        let loaded = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        tracing::info!(loaded, "loading br_netfilter");
    }
    if bridge.exists() {
        set_sysctl("net.bridge.bridge-nf-call-iptables", "1");
    } else {
        tracing::warn!(
            "br_netfilter is not available: a pod reaching a service backend on the same bridge may get no answer"
        );
    }
}
