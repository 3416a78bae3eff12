//! The kubelet's configuration and its errors.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Taint;

/// How the kubelet runs.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// The Node's name.
    pub node_name: String,
    /// InternalIP of the node (None: the address of the default-route interface).
    pub node_ip: Option<Ipv4Addr>,
    /// Extra node labels (`--node-label`).
    pub labels: BTreeMap<String, String>,
    /// Node taints (`--node-taint`).
    pub taints: Vec<Taint>,
    /// Add the `node-role.kubernetes.io/control-plane` label (servers).
    pub control_plane: bool,
    /// Kubelet state: pod dirs (volumes, hosts, resolv.conf) and container logs.
    pub root_dir: PathBuf,
    /// IPAM state of the pod network.
    pub net_state_dir: PathBuf,
    /// The pod bridge name (`cni0`).
    pub bridge_name: String,
    /// Where the CNI network config for a runtime that calls CNI itself (an external CRI
    /// runtime) is written (`<data-dir>/agent/etc/cni/net.d`).
    pub cni_conf_dir: PathBuf,
    /// host-local IPAM state of that network (`<data-dir>/agent/cni/networks`).
    pub cni_ipam_dir: PathBuf,
    /// External CNI plugins attach pods instead of the built-in veth attach (built-in runtime
    /// only; `--cni-conf-dir`/`--cni-bin-dir`).
    pub cni_plugins: Option<CniPlugins>,
    /// MTU of the bridge and pod interfaces (None: that of the default-route interface). With a
    /// VXLAN overlay it is the underlay's MTU minus the encapsulation overhead.
    pub pod_mtu: Option<u32>,
    /// Cluster DNS address written into pods' resolv.conf (ClusterFirst).
    pub cluster_dns: Ipv4Addr,
    /// Cluster domain (`cluster.local`).
    pub cluster_domain: String,
    /// The node's resolv.conf: nameservers of dnsPolicy Default pods and search domains of
    /// ClusterFirst pods come from it (`/etc/resolv.conf`, or `--resolv-conf`).
    pub resolv_conf: PathBuf,
    /// Use this pod CIDR instead of waiting for the Node's `spec.podCIDR` (tests).
    pub pod_cidr_override: Option<String>,
    /// The service CIDR, routed to the bridge when set.
    pub service_cidr: Option<String>,
    /// skiff's version, for `nodeInfo.containerRuntimeVersion` (`skiff://<version>`).
    pub version: String,
    /// Lease renewal period (10 s).
    pub lease_interval: Duration,
    /// Node status is written at least this often (60 s), else only on change.
    pub status_interval: Duration,
    /// Pod worker resync period (1 s).
    pub sync_interval: Duration,
    /// First crash-loop back-off (10 s); doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest crash-loop back-off (5 min).
    pub max_backoff: Duration,
    /// Node-pressure eviction and image garbage collection.
    pub eviction: crate::eviction::EvictionConfig,
}

impl KubeletConfig {
    /// Defaults for node `node_name` with state under `root_dir`.
    pub fn new(node_name: impl Into<String>, root_dir: impl Into<PathBuf>) -> KubeletConfig {
        let root_dir = root_dir.into();
        KubeletConfig {
            node_name: node_name.into(),
            node_ip: None,
            labels: BTreeMap::new(),
            taints: Vec::new(),
            control_plane: false,
            net_state_dir: root_dir.join("net"),
            cni_conf_dir: root_dir.join("cni").join("net.d"),
            cni_ipam_dir: root_dir.join("cni").join("networks"),
            root_dir,
            bridge_name: skiff_net::DEFAULT_BRIDGE.to_string(),
            pod_mtu: None,
            cni_plugins: None,
            cluster_dns: Ipv4Addr::new(10, 43, 0, 10),
            cluster_domain: "cluster.local".into(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            pod_cidr_override: None,
            service_cidr: None,
            version: env!("CARGO_PKG_VERSION").to_string(),
            lease_interval: Duration::from_secs(10),
            status_interval: Duration::from_secs(60),
            sync_interval: Duration::from_secs(1),
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            eviction: crate::eviction::EvictionConfig::default(),
        }
    }
}

/// Where the external CNI plugins and their configuration are.
#[derive(Debug, Clone)]
pub struct CniPlugins {
    /// The network configuration dir (`--cni-conf-dir`; the first file in lexical order).
    pub conf_dir: PathBuf,
    /// The plugin dirs (`--cni-bin-dir`), searched in order.
    pub bin_dirs: Vec<PathBuf>,
    /// Where ADD results are cached for DEL and CHECK (`<data-dir>/agent/cni/results`).
    pub cache_dir: PathBuf,
}

impl CniPlugins {
    /// Loads the network and checks that its plugins (and `loopback`) are in the bin dirs.
    pub fn executor(&self) -> Result<skiff_net::cni::CniExecutor, KubeletError> {
        let ex = skiff_net::cni::CniExecutor::load(
            &self.conf_dir,
            self.bin_dirs.clone(),
            self.cache_dir.clone(),
        )?
        .with_loopback();
        ex.check_plugins()?;
        Ok(ex)
    }
}

/// Errors of the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// An API request failed.
    #[error("api: {what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The error.
        source: kube::Error,
    },
    /// The runtime failed.
    #[error("runtime: {what}: {source}")]
    Runtime {
        /// What was being done.
        what: String,
        /// The error.
        source: skiff_runtime::Error,
    },
    /// The pod network failed.
    #[error("network: {0}")]
    Net(#[from] skiff_net::NetError),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Bad configuration or pod spec.
    #[error("{0}")]
    Invalid(String),
    /// The kubelet server failed.
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
}

pub(crate) fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeletError {
    let what = what.into();
    move |source| KubeletError::Api { what, source }
}

pub(crate) fn rt_err(what: impl Into<String>) -> impl FnOnce(skiff_runtime::Error) -> KubeletError {
    let what = what.into();
    move |source| KubeletError::Runtime { what, source }
}

pub(crate) fn io_err(
    what: &str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> KubeletError {
    let what = what.to_string();
    let path = path.into();
    move |source| KubeletError::Io { what, path, source }
}

/// Parses `key=value:Effect` (`--node-taint`).
pub fn parse_taint(s: &str) -> Result<Taint, KubeletError> {
    let bad = || {
        KubeletError::Invalid(format!(
            "taint {s:?} is not key[=value]:Effect (Effect is NoSchedule, PreferNoSchedule or NoExecute)"
        ))
    };
    let (kv, effect) = s.rsplit_once(':').ok_or_else(bad)?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(bad());
    }
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (kv, None),
    };
    if key.is_empty() {
        return Err(bad());
    }
    Ok(Taint {
        key: key.into(),
        value,
        effect: effect.into(),
        time_added: None,
    })
}

/// Parses `key=value` (`--node-label`).
pub fn parse_label(s: &str) -> Result<(String, String), KubeletError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(KubeletError::Invalid(format!(
            "node label {s:?} is not key=value"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_and_labels_parse() {
        let t = parse_taint("dedicated=gpu:NoSchedule").unwrap();
        assert_eq!(
            (t.key.as_str(), t.value.as_deref(), t.effect.as_str()),
            ("dedicated", Some("gpu"), "NoSchedule")
        );
        let t = parse_taint("k:NoExecute").unwrap();
        assert_eq!(t.value, None);
        assert!(parse_taint("k=v").is_err());
        assert!(parse_taint("k=v:Sometimes").is_err());
        assert_eq!(parse_label("a=b").unwrap(), ("a".into(), "b".into()));
        assert!(parse_label("=b").is_err());
        assert!(parse_label("ab").is_err());
    }
}
