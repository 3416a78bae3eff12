//! The node half of `skiff server` and `skiff agent`: the built-in runtime, the kubelet with its
//! HTTPS server, and, once the node's pod CIDR is known, the pod bridge, the cross-node overlay
//! (`--network-backend`), the service proxy (`inet skiff` nftables table) and the node-local
//! cluster DNS on the bridge gateway, each with its own API client; and `skiff killall`, which
//! removes everything the node half of a data dir created on the host.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use skiff_kubelet::KubeletConfig;
use skiff_runtime::{BuiltinRuntime, CriRuntime, ImageStore, Runtime, RuntimeConfig};

use crate::node_net::ServicesSetup;
pub use crate::overlay::NetworkBackend;
use crate::server::AppError;

/// Node flags shared by `skiff server` and `skiff agent`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name.
    pub node_name: String,
    /// InternalIP (None: detected).
    pub node_ip: Option<IpAddr>,
    /// `k=v` labels.
    pub labels: Vec<String>,
    /// `k=v:Effect` taints.
    pub taints: Vec<String>,
    /// Cluster DNS address for pods.
    pub cluster_dns: String,
    /// Pod CIDR override (else the Node's spec.podCIDR).
    pub pod_cidr: Option<String>,
    /// Service CIDR (routed to the bridge).
    pub service_cidr: Option<String>,
    /// Kubelet HTTPS port (0 = free port).
    pub kubelet_port: u16,
    /// Address the kubelet server binds.
    pub bind_address: IpAddr,
    /// Label the node as control plane.
    pub control_plane: bool,
    /// Cluster (pod) CIDR: pod traffic leaving it is masqueraded.
    pub cluster_cidr: Option<String>,
    /// resolv.conf giving the DNS upstreams and pods' dnsPolicy Default nameservers
    /// (None: `/etc/resolv.conf`).
    pub resolv_conf: Option<PathBuf>,
    /// How pod traffic reaches other nodes.
    pub network_backend: NetworkBackend,
    /// `--kubelet-arg name=value` (eviction and image GC settings).
    pub kubelet_args: Vec<String>,
    /// An external CRI runtime (`unix:///…sock`) instead of the built-in one.
    pub container_runtime_endpoint: Option<String>,
    /// External CNI plugins' conf dir (`--cni-conf-dir`), built-in runtime only.
    pub cni_conf_dir: Option<PathBuf>,
    /// Their bin dirs (`--cni-bin-dir`; empty: [`DEFAULT_CNI_BIN_DIRS`]).
    pub cni_bin_dirs: Vec<PathBuf>,
}

/// Where CNI plugins are looked for without `--cni-bin-dir`: Debian's package, then the
/// upstream default.
pub const DEFAULT_CNI_BIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// The kubelet server's TLS material.
#[derive(Clone)]
pub struct NodeTls {
    /// Serving certificate (PEM) for the node's name and IP, signed by the cluster CA.
    pub serving_cert_pem: String,
    /// Its key (PEM).
    pub serving_key_pem: String,
    /// CA (PEM) that clients of the kubelet (the API server) must present a certificate of.
    pub client_ca_pem: String,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").finish_non_exhaustive()
    }
}

/// The API clients of the node's components, one identity each.
#[derive(Clone)]
pub struct NodeClients {
    /// The kubelet (`system:node:<name>`).
    pub kubelet: kube::Client,
    /// The service proxy (`system:kube-proxy`).
    pub proxy: kube::Client,
    /// The cluster DNS (`system:kube-dns`).
    pub dns: kube::Client,
}

/// The cgroup under which this data dir's pods live: `skiff` for the default data dir, else
/// `skiff-<hash of the path>` so that two servers on one machine never share one.
pub fn cgroup_parent(data_dir: &Path) -> String {
    let p = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    if p == Path::new("/var/lib/skiff") {
        return "skiff".into();
    }
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("skiff-{:08x}", h as u32)
}

/// Opens the built-in runtime of a data dir.
pub fn open_runtime(data_dir: &Path) -> Result<BuiltinRuntime, AppError> {
    let agent = data_dir.join("agent");
    let images = ImageStore::open(agent.join("images"))
        .map_err(|e| AppError::Config(format!("image store under {}: {e}", agent.display())))?;
    let exe = std::env::current_exe().map_err(|source| AppError::Io {
        what: "finding the skiff binary for the shim".into(),
        source,
    })?;
    let rt = BuiltinRuntime::new(RuntimeConfig {
        state_dir: agent.join("runtime"),
        images,
        shim_command: vec![exe.into_os_string(), "shim".into()],
        cgroup_parent: cgroup_parent(data_dir),
    })
    .map_err(|e| AppError::Config(format!("runtime under {}: {e}", agent.display())))?;
    let regs_path = data_dir.join("registries.yaml");
    match skiff_runtime::pull::RegistriesConfig::load(&regs_path) {
        Ok(r) => Ok(rt.with_registries(r)),
        Err(e) => Err(AppError::Config(format!("{}: {e}", regs_path.display()))),
    }
}

/// Where skiff writes the pod network's CNI config for an external CRI runtime (its CNI
/// `conf_dir`), as k3s writes flannel's for its containerd.
pub fn cni_conf_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("agent").join("etc").join("cni").join("net.d")
}

/// The file recording the CRI endpoint a data dir's node half last used (for `skiff killall`).
fn endpoint_file(data_dir: &Path) -> PathBuf {
    data_dir
        .join("agent")
        .join("etc")
        .join("container-runtime-endpoint")
}

/// Connects to an external CRI runtime; an unreachable one is a configuration error (exit 2).
pub async fn connect_cri(data_dir: &Path, endpoint: &str) -> Result<CriRuntime, AppError> {
    let rt = CriRuntime::connect(endpoint).await.map_err(|e| {
        AppError::Config(format!(
            "--container-runtime-endpoint {endpoint}: {e}; start the runtime (e.g. `systemctl start containerd`) or give the right socket, or omit the flag to use skiff's built-in runtime"
        ))
    })?;
    let f = endpoint_file(data_dir);
    if let Some(dir) = f.parent() {
        std::fs::create_dir_all(dir).map_err(|source| AppError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
    }
    std::fs::write(&f, endpoint).map_err(|source| AppError::Io {
        what: format!("writing {}", f.display()),
        source,
    })?;
    tracing::info!(
        endpoint,
        runtime = %rt.name(),
        version = %rt.version().unwrap_or_default(),
        cni_conf_dir = %cni_conf_dir(data_dir).display(),
        "using an external CRI runtime: pods' networks come from its CNI config, which skiff writes into cni_conf_dir"
    );
    Ok(rt)
}

/// The record of the CNI plugin settings a data dir's node half last used (for `skiff killall`).
fn cni_record_file(data_dir: &Path) -> PathBuf {
    data_dir.join("agent").join("etc").join("cni-plugins.json")
}

/// The external CNI plugins of `--cni-conf-dir`/`--cni-bin-dir`, checked now (a bad conf dir
/// or a missing plugin is a configuration error, exit 2).
fn cni_plugins(
    data_dir: &Path,
    cfg: &NodeConfig,
) -> Result<Option<skiff_kubelet::CniPlugins>, AppError> {
    let Some(conf_dir) = &cfg.cni_conf_dir else {
        if !cfg.cni_bin_dirs.is_empty() {
            return Err(AppError::Config(
                "--cni-bin-dir needs --cni-conf-dir (the network configuration to run the plugins with)".into(),
            ));
        }
        return Ok(None);
    };
    if cfg.container_runtime_endpoint.is_some() {
        return Err(AppError::Config(
            "--cni-conf-dir cannot be used with --container-runtime-endpoint: the external runtime calls CNI itself; set its CNI conf_dir and bin_dir instead".into(),
        ));
    }
    let bin_dirs: Vec<PathBuf> = if cfg.cni_bin_dirs.is_empty() {
        DEFAULT_CNI_BIN_DIRS.iter().map(PathBuf::from).collect()
    } else {
        cfg.cni_bin_dirs.clone()
    };
    let p = skiff_kubelet::CniPlugins {
        conf_dir: conf_dir.clone(),
        bin_dirs,
        cache_dir: data_dir.join("agent").join("cni").join("results"),
    };
    p.executor()
        .map_err(|e| AppError::Config(format!("--cni-conf-dir/--cni-bin-dir: {e}")))?;
    Ok(Some(p))
}

/// Records (or forgets) the CNI plugin settings for `skiff killall`.
fn record_cni_plugins(
    data_dir: &Path,
    p: Option<&skiff_kubelet::CniPlugins>,
) -> Result<(), AppError> {
    let f = cni_record_file(data_dir);
    let Some(p) = p else {
        let _ = std::fs::remove_file(&f);
        return Ok(());
    };
    let v = serde_json::json!({
        "confDir": p.conf_dir,
        "binDirs": p.bin_dirs,
        "cacheDir": p.cache_dir,
    });
    let io = |source| AppError::Io {
        what: format!("writing {}", f.display()),
        source,
    };
    if let Some(d) = f.parent() {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    std::fs::write(&f, v.to_string()).map_err(io)
}

/// `skiff killall`: CNI DEL of every pod attachment the recorded plugins still have, so that
/// their addresses (host-local leases) and host interfaces are released.
async fn killall_cni(data_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(text) = std::fs::read_to_string(cni_record_file(data_dir)) else {
        return done;
    };
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Rec {
        conf_dir: PathBuf,
        bin_dirs: Vec<PathBuf>,
        cache_dir: PathBuf,
    }
    let rec: Rec = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            done.push(format!("CNI plugin record unreadable, no CNI DEL run: {e}"));
            return done;
        }
    };
    let ex = match skiff_net::cni::CniExecutor::load(&rec.conf_dir, rec.bin_dirs, rec.cache_dir) {
        Ok(ex) => ex.with_loopback(),
        Err(e) => {
            done.push(format!("CNI config not loadable, no CNI DEL run: {e}"));
            return done;
        }
    };
    for mut a in ex.cached_attachments() {
        if !a.netns.exists() {
            a.netns = PathBuf::new();
        }
        match ex.del(&a).await {
            Ok(()) => done.push(format!("CNI DEL of sandbox {}", a.container_id)),
            Err(e) => done.push(format!("CNI DEL of sandbox {}: {e}", a.container_id)),
        }
    }
    done
}

fn kubelet_config(data_dir: &Path, cfg: &NodeConfig) -> Result<KubeletConfig, AppError> {
    let mut k = KubeletConfig::new(
        cfg.node_name.clone(),
        data_dir.join("agent").join("kubelet"),
    );
    k.net_state_dir = data_dir.join("agent").join("net");
    k.cni_conf_dir = cni_conf_dir(data_dir);
    k.cni_ipam_dir = data_dir.join("agent").join("cni").join("networks");
    k.node_ip = match cfg.node_ip {
        Some(IpAddr::V4(a)) => Some(a),
        Some(IpAddr::V6(a)) => {
            return Err(AppError::Config(format!(
                "--node-ip {a}: only IPv4 node addresses are supported"
            )));
        }
        None => None,
    };
    for l in &cfg.labels {
        let (key, v) = skiff_kubelet::parse_label(l)
            .map_err(|e| AppError::Config(format!("--node-label: {e}")))?;
        k.labels.insert(key, v);
    }
    for t in &cfg.taints {
        k.taints.push(
            skiff_kubelet::parse_taint(t)
                .map_err(|e| AppError::Config(format!("--node-taint: {e}")))?,
        );
    }
    k.cluster_dns = cfg.cluster_dns.parse::<Ipv4Addr>().map_err(|_| {
        AppError::Config(format!(
            "--cluster-dns {:?} is not an IPv4 address",
            cfg.cluster_dns
        ))
    })?;
    k.pod_cidr_override = cfg.pod_cidr.clone();
    k.service_cidr = cfg.service_cidr.clone();
    k.control_plane = cfg.control_plane;
    k.pod_mtu = crate::overlay::pod_mtu(cfg.network_backend);
    k.cni_plugins = cni_plugins(data_dir, cfg)?;
    if let Some(r) = &cfg.resolv_conf {
        k.resolv_conf = r.clone();
    }
    k.eviction.image_fs = Some(data_dir.join("agent").join("images"));
    for a in &cfg.kubelet_args {
        k.eviction.apply_kubelet_arg(a).map_err(AppError::Config)?;
    }
    k.eviction.validate().map_err(AppError::Config)?;
    Ok(k)
}

/// The kubelet server's address: the API server dials the node's InternalIP, so with a loopback
/// `--bind-address` and a non-loopback `--node-ip` the kubelet listens on the node IP.
fn kubelet_bind_address(cfg: &NodeConfig) -> IpAddr {
    match cfg.node_ip {
        Some(ip) if cfg.bind_address.is_loopback() && !ip.is_loopback() => ip,
        _ => cfg.bind_address,
    }
}

/// Starts runtime + kubelet + kubelet server, and the node's service network (bridge, proxy,
/// DNS) once the pod CIDR is known; runs until `stop` fires. Returns the task (it ends when
/// everything stopped) and, once bound, the kubelet server's address.
pub async fn start(
    data_dir: &Path,
    cfg: &NodeConfig,
    clients: NodeClients,
    tls: &NodeTls,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(tokio::task::JoinHandle<()>, SocketAddr), AppError> {
    let kcfg = kubelet_config(data_dir, cfg)?;
    record_cni_plugins(data_dir, kcfg.cni_plugins.as_ref())?;
    let services = ServicesSetup::new(cfg, &kcfg)?;
    let client = clients.kubelet.clone();
    let runtime: Arc<dyn Runtime> = match &cfg.container_runtime_endpoint {
        Some(ep) => Arc::new(connect_cri(data_dir, ep).await?),
        None => Arc::new(open_runtime(data_dir)?),
    };
    let server_cfg = skiff_kubelet::server::ServerConfig {
        listen: SocketAddr::new(kubelet_bind_address(cfg), cfg.kubelet_port),
        serving_cert_pem: tls.serving_cert_pem.clone(),
        serving_key_pem: tls.serving_key_pem.clone(),
        client_ca_pem: tls.client_ca_pem.clone(),
    };
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let kcfg2 = kcfg.clone();
    let services_stop = stop.clone();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        let r = skiff_kubelet::run(client, runtime, kcfg, server_cfg, shutdown, move |a| {
            let _ = addr_tx.send(a);
        })
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "kubelet stopped");
        }
    });
    match addr_rx.await {
        Ok(a) => {
            tracing::info!(kubelet = %a, node = %cfg.node_name, "kubelet server listening");
            let svc_stop = services_stop.clone();
            let svc_task = tokio::spawn(services.run(clients, kcfg2, svc_stop));
            let task = tokio::spawn(async move {
                let _ = task.await;
                let _ = svc_task.await;
            });
            Ok((task, a))
        }
        Err(_) => {
            let _ = task.await;
            Err(AppError::Config(format!(
                "the kubelet could not start (is --kubelet-port {} free?)",
                cfg.kubelet_port
            )))
        }
    }
}

/// Removes what the node half of `data_dir` (a server's or an agent's) created on this host:
/// every container and sandbox (and their shims), the pod cgroup subtree, the bridge and pod
/// veths, the overlay's routes and VXLAN device, skiff's nftables table, and mounts under the
/// data dir. With an external CRI runtime (recorded at start), only the sandboxes skiff made
/// in it are removed. Returns what it did, one line per item.
pub async fn killall(data_dir: &Path, bridge: &str) -> Result<Vec<String>, AppError> {
    let mut done = crate::overlay::cleanup(&data_dir.join("agent").join("net"));
    // Pods run by an external CRI runtime: only the sandboxes skiff created (CRI metadata
    // namespace `skiff`) are stopped and removed; the runtime itself and anything else it runs
    // are left alone. The runtime tears their networks down (CNI DEL).
    if let Ok(ep) = std::fs::read_to_string(endpoint_file(data_dir)) {
        let ep = ep.trim();
        match CriRuntime::connect(ep).await {
            Ok(cri) => {
                for sb in cri.list_sandboxes().await.unwrap_or_default() {
                    let _ = cri.stop_sandbox(&sb.id, std::time::Duration::ZERO).await;
                    for c in cri.list_containers().await.unwrap_or_default() {
                        if c.sandbox_id.as_deref() == Some(sb.id.as_str()) {
                            let _ = cri.remove_container(&c.id).await;
                        }
                    }
                    match cri.remove_sandbox(&sb.id).await {
                        Ok(()) => done.push(format!("removed {} sandbox {}", cri.name(), sb.id)),
                        Err(e) => done.push(format!("{} sandbox {}: {e}", cri.name(), sb.id)),
                    }
                }
            }
            Err(e) => done.push(format!(
                "container runtime {ep} not reachable, its skiff pods were left: {e}"
            )),
        }
    }
    done.extend(killall_cni(data_dir).await);
    let rt_dir = data_dir.join("agent").join("runtime");
    if rt_dir.exists() {
        let rt = open_runtime(data_dir)?;
        for sb in BuiltinRuntime::list_sandboxes(&rt).unwrap_or_default() {
            let veth = skiff_net::host_veth_name(&sb.id);
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &veth])
                .stderr(std::process::Stdio::null())
                .status();
            match BuiltinRuntime::remove_sandbox(&rt, &sb.id).await {
                Ok(()) => done.push(format!("removed sandbox {}", sb.id)),
                Err(e) => done.push(format!("sandbox {}: {e}", sb.id)),
            }
        }
        for c in rt.list().await.unwrap_or_default() {
            match rt.remove(&c.id).await {
                Ok(()) => done.push(format!("removed container {}", c.id)),
                Err(e) => done.push(format!("container {}: {e}", c.id)),
            }
        }
        if rt.remove_cgroup_parent().is_ok() {
            done.push(format!("removed cgroup {}", cgroup_parent(data_dir)));
        }
        rt.release_pins_mount();
    }
    let st = std::process::Command::new("ip")
        .args(["link", "del", bridge])
        .stderr(std::process::Stdio::null())
        .status();
    if st.is_ok_and(|s| s.success()) {
        done.push(format!("removed bridge {bridge}"));
    }
    let nft = skiff_net::nft::Nft::new();
    if nft
        .table_exists(skiff_net::nft::Family::Inet, "skiff")
        .unwrap_or(false)
        && nft
            .delete_table(skiff_net::nft::Family::Inet, "skiff")
            .is_ok()
    {
        done.push("removed nftables table inet skiff".into());
    }
    // Mounts under the data dir, deepest first.
    let prefix: PathBuf =
        std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let prefix = format!("{}/", prefix.display());
    if let Ok(t) = std::fs::read_to_string("/proc/self/mountinfo") {
        let mut mps: Vec<String> = t
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mps {
            if nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH).is_ok() {
                done.push(format!("unmounted {m}"));
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parent_is_per_data_dir() {
        let a = cgroup_parent(Path::new("/tmp/a-data-dir-that-does-not-exist"));
        let b = cgroup_parent(Path::new("/tmp/b-data-dir-that-does-not-exist"));
        assert_ne!(a, b);
        assert!(a.starts_with("skiff-") && a.len() == 14, "{a}");
        assert_eq!(
            a,
            cgroup_parent(Path::new("/tmp/a-data-dir-that-does-not-exist"))
        );
    }
}
