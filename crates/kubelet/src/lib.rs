//! skiff-kubelet: the node agent. Registers the Node and renews its Lease, runs the pods bound to
//! this node through the runtime, reports their status, and serves the kubelet HTTPS API (logs,
//! exec, attach, port-forward, stats) that the API server proxies to.

pub mod cni;
pub mod config;
pub mod eviction;
pub mod node;
pub mod pods;
pub mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use skiff_net::{Ipv4Cidr, Network, NetworkConfig};
use skiff_runtime::Runtime;

pub use config::{CniPlugins, KubeletConfig, KubeletError, parse_label, parse_taint};
pub use pods::Registry;

/// Waits for the node's pod CIDR (the override, else `spec.podCIDR` once node IPAM set it).
async fn pod_cidr(
    client: &kube::Client,
    cfg: &KubeletConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<Ipv4Cidr>, KubeletError> {
    let parse = |s: &str, what: &str| -> Result<Ipv4Cidr, KubeletError> {
        s.parse()
            .map_err(|e| KubeletError::Invalid(format!("{what} {s:?} is not an IPv4 CIDR: {e}")))
    };
    if let Some(c) = &cfg.pod_cidr_override {
        return parse(c, "--pod-cidr").map(Some);
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let mut logged = false;
    loop {
        if let Ok(Some(n)) = nodes.get_opt(&cfg.node_name).await
            && let Some(c) = n.spec.and_then(|s| s.pod_cidr).filter(|c| !c.is_empty())
        {
            return parse(&c, "node spec.podCIDR").map(Some);
        }
        if !logged {
            tracing::info!(node = %cfg.node_name, "waiting for the node's spec.podCIDR");
            logged = true;
        }
        tokio::select! {
            _ = stop.changed() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Sets up the node's bridge (and the service route) for `cidr`.
pub fn setup_network(cfg: &KubeletConfig, cidr: Ipv4Cidr) -> Result<Network, KubeletError> {
    let mut nc = NetworkConfig::new(cidr, cfg.net_state_dir.clone());
    nc.bridge_name = cfg.bridge_name.clone();
    nc.mtu = cfg.pod_mtu;
    let net = Network::new(nc)?;
    net.ensure_bridge()?;
    if let Some(s) = &cfg.service_cidr {
        let svc: Ipv4Cidr = s.parse().map_err(|e| {
            KubeletError::Invalid(format!("service CIDR {s:?} is not an IPv4 CIDR: {e}"))
        })?;
        net.ensure_service_route(svc)?;
    }
    Ok(net)
}

/// Runs the kubelet: the HTTPS server, node registration and lease, and the pod manager, until
/// `shutdown` completes. Pods keep running after it returns. `ready` gets the server address.
pub async fn run(
    client: kube::Client,
    runtime: Arc<dyn Runtime>,
    cfg: KubeletConfig,
    server_cfg: server::ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce(SocketAddr) + Send,
) -> Result<(), KubeletError> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.root_dir)
        .map_err(config::io_err("creating kubelet dir", &cfg.root_dir))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let registry = Registry::default();

    // 1. The kubelet server, to learn its port.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let mut srv_stop = stop_rx.clone();
    let srv = tokio::spawn(server::serve(
        server_cfg,
        runtime.clone(),
        Arc::new(registry.clone()),
        move |a| {
            let _ = addr_tx.send(a);
        },
        async move {
            let _ = srv_stop.changed().await;
        },
    ));
    let addr = match addr_rx.await {
        Ok(a) => a,
        Err(_) => {
            return match srv.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(KubeletError::Invalid("kubelet server did not start".into())),
            };
        }
    };
    ready(addr);

    // 2. Node and lease.
    let pressure = eviction::SharedPressure::default();
    let evictions = eviction::EvictionRequests::default();
    let (network_ready_tx, network_ready) = tokio::sync::watch::channel(false);
    let mut agent = node::NodeAgent::new(client.clone(), cfg.clone(), runtime.clone(), addr.port())
        .with_pressure(pressure.clone())
        .with_network_ready(network_ready);
    agent.register().await?;
    agent.renew_lease().await?;
    let node_ip = agent.node_ip();
    let agent_task = tokio::spawn(agent.run(stop_rx.clone()));

    // 3. Network, then pods.
    let main = {
        let client = client.clone();
        let cfg = cfg.clone();
        let stop_rx = stop_rx.clone();
        async move {
            let Some(cidr) = pod_cidr(&client, &cfg, stop_rx.clone()).await? else {
                return Ok(());
            };
            let cfg2 = cfg.clone();
            let net = tokio::task::spawn_blocking(move || setup_network(&cfg2, cidr))
                .await
                .map_err(|e| KubeletError::Invalid(format!("network setup task: {e}")))??;
            tracing::info!(pod_cidr = %cidr, bridge = %cfg.bridge_name, "pod network ready");
            let cni = if runtime.manages_pod_network() {
                None
            } else {
                pods::cni_plugins::load(&cfg, cidr)?.map(Arc::new)
            };
            let manager = eviction::Manager::new(
                cfg.eviction.clone(),
                cfg.root_dir.clone(),
                runtime.clone(),
                Arc::new(registry.clone()),
                pressure.clone(),
                evictions.clone(),
            );
            let eviction_task = tokio::spawn(manager.run(stop_rx.clone()));
            if runtime.manages_pod_network() {
                let conf = cni::write(
                    &cfg.cni_conf_dir,
                    &cni::CniNetwork {
                        bridge: &cfg.bridge_name,
                        pod_cidr: cidr,
                        gateway: net.gateway(),
                        mtu: net.mtu(),
                        ipam_dir: &cfg.cni_ipam_dir,
                    },
                )?;
                tracing::info!(
                    conflist = %conf.display(),
                    runtime = %runtime.name(),
                    "wrote the CNI network config for the container runtime: point its CNI conf_dir at this directory and bin_dir at the CNI plugins (/usr/lib/cni)"
                );
            }
            // The node turns Ready now (NodeAgent writes its status at once).
            let _ = network_ready_tx.send(true);
            let sh = Arc::new(pods::Shared {
                events: pods::events::recorder(client.clone(), &cfg.node_name),
                client,
                cfg,
                runtime,
                network: Some(Arc::new(net)),
                cni,
                node_ip,
                registry: registry.0.clone(),
                pressure,
                evictions,
            });
            let r = pods::PodManager::new(sh, stop_rx).run().await;
            eviction_task.abort();
            r
        }
    };
    let mut main = std::pin::pin!(main);
    let mut result = Ok(());
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => {}
        r = &mut main => {
            result = r;
            if result.is_ok() {
                shutdown.await;
            }
        }
    }
    let _ = stop_tx.send(true);
    // Let the pod manager finish its current step.
    let _ = tokio::time::timeout(Duration::from_secs(10), &mut main).await;
    let _ = agent_task.await;
    let _ = srv.await;
    result
}
