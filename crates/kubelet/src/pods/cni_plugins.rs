//! Pod networking through external CNI plugins (`--cni-conf-dir`/`--cni-bin-dir`) with the
//! built-in runtime: ADD once the sandbox's netns exists (the pod IP is the result's first
//! IPv4 address), CHECK when a restarted kubelet re-adopts a sandbox, DEL when the sandbox is
//! torn down. The worker calls these instead of the built-in bridge attach.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use skiff_net::cni::{Attachment, CniExecutor, pod_args};

use crate::config::{KubeletError, rt_err};
use crate::pods::Shared;

/// Loads the executor of `cfg.cni_plugins`, and warns when the network does not put pods on
/// skiff's bridge over the node's pod CIDR: the cluster DNS listens on the bridge's gateway
/// address and Service VIPs are routed to the bridge, so other networks reach neither.
pub fn load(
    cfg: &crate::KubeletConfig,
    pod_cidr: skiff_net::Ipv4Cidr,
) -> Result<Option<CniExecutor>, KubeletError> {
    let Some(c) = &cfg.cni_plugins else {
        return Ok(None);
    };
    let ex = c.executor()?;
    let n = ex.network();
    let bridge = n
        .plugins
        .iter()
        .find(|p| p.get("type").and_then(|t| t.as_str()) == Some("bridge"));
    let on_bridge = bridge
        .and_then(|b| b.get("bridge"))
        .and_then(|b| b.as_str())
        == Some(cfg.bridge_name.as_str());
    let subnet_ok = bridge
        .map(|b| b.get("ipam").map(|i| i.to_string()).unwrap_or_default())
        .is_some_and(|ipam| ipam.contains(&format!("\"{pod_cidr}\"")));
    if !on_bridge || !subnet_ok {
        tracing::warn!(
            file = %n.source.display(),
            bridge = %cfg.bridge_name,
            %pod_cidr,
            "the CNI network is not a bridge plugin on skiff's bridge with IPAM over the node's pod CIDR: pods may not reach the cluster DNS and Service VIPs"
        );
    }
    tracing::info!(
        network = %n.name,
        file = %n.source.display(),
        plugins = ?n.plugin_types(),
        "pods are attached by external CNI plugins"
    );
    Ok(Some(ex))
}

/// The pod's interface name, as the kubelet gives it.
pub const IFNAME: &str = "eth0";

async fn netns_of(sh: &Shared, sandbox: &str) -> Result<PathBuf, KubeletError> {
    let st = sh
        .runtime
        .sandbox_status(sandbox)
        .await
        .map_err(rt_err("reading sandbox"))?;
    st.netns
        .ok_or_else(|| KubeletError::Invalid(format!("sandbox {sandbox} has no network namespace")))
}

/// CNI ADD for a pod's sandbox; returns the pod IP.
pub async fn attach(
    sh: &Shared,
    cni: &CniExecutor,
    sandbox: &str,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<Ipv4Addr, KubeletError> {
    let att = Attachment {
        container_id: sandbox.to_string(),
        netns: netns_of(sh, sandbox).await?,
        ifname: IFNAME.into(),
        args: pod_args(namespace, name, sandbox, uid),
    };
    let r = cni.add(&att).await?;
    match r.first_ipv4() {
        Some(ip) => Ok(ip),
        None => {
            // Keep nothing half-made: the next sync retries ADD from scratch.
            if let Err(e) = cni.del(&att).await {
                tracing::warn!(sandbox, error = %e, "CNI DEL after a result without IPv4");
            }
            Err(KubeletError::Invalid(format!(
                "CNI network {:?} gave sandbox {sandbox} no IPv4 address (ips: {:?}); IPv4 pod addresses are required",
                cni.network().name,
                r.ips
            )))
        }
    }
}

/// For a sandbox a previous kubelet made: the cached pod IP, after a CHECK (a failed CHECK is
/// logged; the pod keeps its address). None when no ADD completed: the worker runs ADD.
pub async fn adopt(sh: &Shared, cni: &CniExecutor, sandbox: &str) -> Option<Ipv4Addr> {
    let (r, _) = match cni.cached(sandbox, IFNAME) {
        Ok(Some(c)) => c,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(sandbox, error = %e, "reading the cached CNI result");
            return None;
        }
    };
    let ip = r.first_ipv4()?;
    match netns_of(sh, sandbox).await {
        Ok(netns) => {
            let att = Attachment {
                container_id: sandbox.to_string(),
                netns,
                ifname: IFNAME.into(),
                args: Vec::new(),
            };
            match cni.check(&att).await {
                Ok(()) => tracing::debug!(sandbox, %ip, "CNI CHECK passed"),
                Err(e) => {
                    tracing::warn!(sandbox, %ip, error = %e, "CNI CHECK of a re-adopted pod sandbox failed")
                }
            }
        }
        Err(e) => tracing::warn!(sandbox, error = %e, "cannot CHECK the pod network"),
    }
    Some(ip)
}

/// CNI DEL for a sandbox being removed. An unknown or vanished netns is passed as is (empty
/// when the runtime no longer knows it): plugins release their addresses anyway, as the spec
/// asks; errors are logged, not returned (teardown goes on).
pub async fn detach(sh: &Shared, cni: &CniExecutor, sandbox: &str) {
    let netns = sh
        .runtime
        .sandbox_status(sandbox)
        .await
        .ok()
        .and_then(|s| s.netns)
        .filter(|p| p.exists())
        .unwrap_or_default();
    let att = Attachment {
        container_id: sandbox.to_string(),
        netns,
        ifname: IFNAME.into(),
        args: Vec::new(),
    };
    if let Err(e) = cni.del(&att).await {
        tracing::warn!(sandbox, error = %e, "CNI DEL of the pod network failed");
    }
}
