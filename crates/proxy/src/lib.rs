//! The service proxy: watches Services and EndpointSlices and keeps one nftables table
//! (`inet skiff`) equal to them, replaced atomically and debounced; writes node addresses to
//! LoadBalancer services' status (the built-in service load balancer) and makes sure the
//! `kube-system/kube-dns` Service exists at the cluster DNS address.
//!
//! Entry point: [`run`]. The rule shape lives in [`rules`] (pure, unit-tested).

pub mod rules;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use skiff_net::Ipv4Cidr;
use skiff_net::nft::{Family, Nft};

pub use rules::build_table;

/// Errors of the service proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// An nftables or netns operation failed.
    #[error("service proxy: {0}")]
    Net(#[from] skiff_net::NetError),
    /// The API rejected a call.
    #[error("service proxy: api call {op} failed: {source}")]
    Api {
        /// What was being done.
        op: String,
        /// The client error.
        source: kube::Error,
    },
    /// The configuration cannot work.
    #[error("service proxy: invalid configuration: {0}")]
    Config(String),
}

/// What lets a packet from 127.0.0.1 be routed to a pod after DNAT (localhost NodePorts).
const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// How the proxy runs on this node.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// This node's name (endpoints with this `nodeName` are local).
    pub node_name: String,
    /// Node addresses: NodePorts and LoadBalancer ports answer on them, and they are written to
    /// LoadBalancer services' `status.loadBalancer.ingress`.
    pub node_ips: Vec<Ipv4Addr>,
    /// The cluster DNS service address (`--cluster-dns`, 10.43.0.10); None: no DNS VIP rules and
    /// no kube-dns Service.
    pub cluster_dns: Option<Ipv4Addr>,
    /// Where the cluster DNS address is DNAT'ed to: the node-local DNS server (the bridge gateway).
    pub dns_target: Option<Ipv4Addr>,
    /// Port of the node-local DNS server (53).
    pub dns_port: u16,
    /// This node's pod CIDR and the cluster CIDR: when both are set, pod traffic leaving the
    /// cluster CIDR is masqueraded by this table.
    pub pod_cidr: Option<Ipv4Cidr>,
    /// See `pod_cidr`.
    pub cluster_cidr: Option<Ipv4Cidr>,
    /// The table name (`skiff`); tests may use another.
    pub table: String,
    /// Apply the table inside this network namespace instead of the caller's (tests).
    pub netns: Option<PathBuf>,
    /// Wait this long after a change before rebuilding, to batch bursts.
    pub debounce: Duration,
    /// Create `kube-system/kube-dns` at `cluster_dns` when it is missing (servers: true).
    pub ensure_dns_service: bool,
    /// Write node addresses to LoadBalancer services' status (one node per cluster: the server).
    pub write_lb_status: bool,
    /// Packet mark meaning "masquerade in postrouting".
    pub masquerade_mark: u32,
    /// Delete the table when `run` returns after shutdown (`skiff server` cleanup).
    pub delete_table_on_shutdown: bool,
    /// NodePorts also answer on 127.0.0.1 from the node itself, as kube-proxy's iptables mode
    /// does by default (`--iptables-localhost-nodeports`): sets `route_localnet=1` in the
    /// namespace and drops new connections to 127.0.0.0/8 that come from elsewhere
    /// (CVE-2020-8558). Turned off by itself when the sysctl cannot be written. Off by default:
    /// with `route_localnet=1` on a host, VXLAN between lab nodes on that host stopped passing
    /// traffic (cause not found yet), so `skiff server` does not turn it on.
    pub localhost_node_ports: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            node_name: String::new(),
            node_ips: Vec::new(),
            cluster_dns: Some(Ipv4Addr::new(10, 43, 0, 10)),
            dns_target: None,
            dns_port: 53,
            pod_cidr: None,
            cluster_cidr: None,
            table: skiff_net::nft::SKIFF_TABLE.to_string(),
            netns: None,
            debounce: Duration::from_millis(100),
            ensure_dns_service: true,
            write_lb_status: true,
            masquerade_mark: 0x4000,
            delete_table_on_shutdown: false,
            localhost_node_ports: false,
        }
    }
}

/// Creates `kube-system/kube-dns` with `cluster_ip` (ports 53/UDP, 53/TCP, 9153/TCP) if absent.
pub async fn ensure_dns_service(
    client: &kube::Client,
    cluster_ip: Ipv4Addr,
) -> Result<bool, ProxyError> {
    let api: Api<Service> = Api::namespaced(client.clone(), "kube-system");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "kube-dns",
            "namespace": "kube-system",
            "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}
        },
        "spec": {
            "clusterIP": cluster_ip.to_string(),
            "selector": {"k8s-app": "kube-dns"},
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153}
            ]
        }
    }))
    .map_err(|e| ProxyError::Config(format!("kube-dns service object: {e}")))?;
    // Another node may have created it: a create naming the same clusterIP would then be
    // refused for the IP (422) before the name conflict (409), as kube-apiserver does.
    match api.get_opt("kube-dns").await {
        Ok(Some(_)) => return Ok(false),
        Ok(None) => {}
        Err(source) => {
            return Err(ProxyError::Api {
                op: "get service kube-system/kube-dns".into(),
                source,
            });
        }
    }
    match api.create(&PostParams::default(), &svc).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(source) => Err(ProxyError::Api {
            op: "create service kube-system/kube-dns".into(),
            source,
        }),
    }
}

/// Runs the proxy until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    cfg: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    if cfg.dns_target.is_some() && cfg.cluster_dns.is_none() {
        return Err(ProxyError::Config(
            "dns_target is set but cluster_dns is not; set both or neither".into(),
        ));
    }
    let nft = Arc::new(match &cfg.netns {
        Some(p) => Nft::in_netns(p)?,
        None => Nft::new(),
    });
    let mut cfg = cfg;
    if cfg.localhost_node_ports {
        match nft.write_sysctl(ROUTE_LOCALNET, "1") {
            Ok(had) => {
                tracing::info!(sysctl = ROUTE_LOCALNET, had = %had, "NodePorts answer on 127.0.0.1")
            }
            Err(e) => {
                tracing::warn!(error = %e, "NodePorts will not answer on 127.0.0.1");
                cfg.localhost_node_ports = false;
            }
        }
    }
    let changed = Arc::new(tokio::sync::Notify::new());

    let (svc_reader, svc_writer) = reflector::store::<Service>();
    let (eps_reader, eps_writer) = reflector::store::<EndpointSlice>();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let changed = changed.clone();
        let stream = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(svc_writer);
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "service watch error; retrying");
                }
                changed.notify_one();
            }
        });
    }
    {
        let changed = changed.clone();
        let stream = watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(eps_writer);
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "endpointslice watch error; retrying");
                }
                changed.notify_one();
            }
        });
    }
    if cfg.ensure_dns_service
        && let Some(ip) = cfg.cluster_dns
    {
        let client = client.clone();
        tasks.spawn(async move {
            loop {
                match ensure_dns_service(&client, ip).await {
                    Ok(created) => {
                        tracing::info!(created, cluster_ip = %ip, "kube-dns service present");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "kube-dns service not ensured; retrying in 2s");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        });
    }

    let sync = async {
        let _ = svc_reader.wait_until_ready().await;
        let _ = eps_reader.wait_until_ready().await;
        let mut last: Option<String> = None;
        let mut lb_written: BTreeMap<String, Vec<String>> = BTreeMap::new();
        loop {
            let services: Vec<Service> = svc_reader.state().iter().map(|s| (**s).clone()).collect();
            let slices: Vec<EndpointSlice> =
                eps_reader.state().iter().map(|s| (**s).clone()).collect();
            let table = build_table(&cfg, &services, &slices);
            match table.render() {
                Ok(text) if last.as_deref() == Some(text.as_str()) => {}
                Ok(text) => {
                    let started = std::time::Instant::now();
                    let nft2 = nft.clone();
                    let res = tokio::task::spawn_blocking(move || nft2.apply(&table)).await;
                    match res {
                        Ok(Ok(())) => {
                            tracing::info!(
                                services = services.len(),
                                slices = slices.len(),
                                bytes = text.len(),
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "service rules synced"
                            );
                            last = Some(text);
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "applying service rules failed; retrying in 1s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "rule sync task failed; retrying in 1s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "service rules do not render"),
            }
            if cfg.write_lb_status {
                write_lb_status(&client, &cfg, &services, &mut lb_written).await;
            }
            changed.notified().await;
            tokio::time::sleep(cfg.debounce).await;
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = sync => {}
    }
    tasks.abort_all();
    if cfg.delete_table_on_shutdown {
        nft.delete_table(Family::Inet, &cfg.table)?;
        tracing::info!(table = %cfg.table, "service rules removed");
    }
    Ok(())
}

/// Node addresses into `status.loadBalancer.ingress` of LoadBalancer services that lack them.
async fn write_lb_status(
    client: &kube::Client,
    cfg: &ProxyConfig,
    services: &[Service],
    written: &mut BTreeMap<String, Vec<String>>,
) {
    let want: Vec<String> = cfg.node_ips.iter().map(|ip| ip.to_string()).collect();
    if want.is_empty() {
        return;
    }
    for svc in services {
        let is_lb = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
        if !is_lb {
            continue;
        }
        let have: Vec<String> = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .map(|i| i.iter().filter_map(|x| x.ip.clone()).collect())
            .unwrap_or_default();
        if have == want {
            continue;
        }
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let key = format!(
            "{ns}/{name}@{}",
            svc.metadata.resource_version.clone().unwrap_or_default()
        );
        if written.get(&key) == Some(&want) {
            continue; // already patched this version; the watch will catch up
        }
        let api: Api<Service> = Api::namespaced(client.clone(), &ns);
        let ingress: Vec<serde_json::Value> = want
            .iter()
            .map(|ip| serde_json::json!({"ip": ip}))
            .collect();
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}});
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(service = %format!("{ns}/{name}"), ingress = ?want, "load balancer status written");
                written.insert(key, want.clone());
            }
            Err(e) => {
                tracing::warn!(service = %format!("{ns}/{name}"), error = %e, "load balancer status not written")
            }
        }
    }
}
