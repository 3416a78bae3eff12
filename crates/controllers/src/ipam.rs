//! Node IPAM: gives every node a pod CIDR (`spec.podCIDR` / `spec.podCIDRs`) carved from the
//! cluster CIDR. Allocations are derived from the CIDRs nodes already hold, so they survive
//! restarts and leader changes.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::queue::Queue;
use crate::{ControllerError, Ctx};

/// A cluster CIDR split into equal node blocks.
#[derive(Debug, Clone, Copy)]
pub struct Blocks {
    base: u32,
    mask: u8,
    count: u32,
}

impl Blocks {
    /// Splits `cidr` (IPv4) into blocks of prefix length `mask`.
    pub fn new(cidr: &str, mask: u8) -> Result<Blocks, ControllerError> {
        let bad = || {
            ControllerError::Invalid(format!(
                "cluster cidr {cidr:?} is not an IPv4 CIDR shorter than /{mask} (expected e.g. 10.42.0.0/16)"
            ))
        };
        let (ip, len) = cidr.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if len > mask || mask > 30 {
            return Err(bad());
        }
        let net = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Blocks {
            base: u32::from(ip) & net,
            mask,
            count: 1u32 << (mask - len),
        })
    }

    /// The CIDR of block `i`.
    pub fn block(&self, i: u32) -> String {
        let ip = Ipv4Addr::from(self.base + (i << (32 - self.mask)));
        format!("{ip}/{}", self.mask)
    }

    /// The lowest block not in `used`.
    pub fn first_free(&self, used: &HashSet<String>) -> Option<String> {
        (0..self.count)
            .map(|i| self.block(i))
            .find(|c| !used.contains(c))
    }
}

/// Runs the allocator until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let blocks = match Blocks::new(&ctx.config.cluster_cidr, ctx.config.node_cidr_mask) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "node ipam disabled");
            return;
        }
    };
    let queue = Queue::default();
    let nodes = ctx.nodes.clone();
    crate::informer::feed(
        &ctx.nodes,
        queue.clone(),
        |n: &Node| vec![n.metadata.name.clone().unwrap_or_default()],
        move || {
            nodes
                .store
                .state()
                .iter()
                .filter_map(|n| n.metadata.name.clone())
                .collect()
        },
    );
    for n in ctx.nodes.store.state() {
        queue.add(n.metadata.name.clone().unwrap_or_default());
    }
    let given: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    queue
        .work("node-ipam", |name| {
            let ctx = ctx.clone();
            let given = given.clone();
            async move { sync(&ctx, blocks, &given, &name).await.map(|()| None) }
        })
        .await;
}

fn pod_cidr(n: &Node) -> Option<&str> {
    n.spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .filter(|c| !c.is_empty())
}

async fn sync(
    ctx: &Ctx,
    blocks: Blocks,
    given: &Mutex<HashMap<String, String>>,
    name: &str,
) -> Result<(), ControllerError> {
    let Some(node) = ctx.nodes.get("", name) else {
        lock(given).remove(name);
        return Ok(());
    };
    if pod_cidr(&node).is_some() {
        return Ok(());
    }
    let cidr = {
        let mut g = lock(given);
        if let Some(c) = g.get(name) {
            c.clone()
        } else {
            let mut used: HashSet<String> = ctx
                .nodes
                .store
                .state()
                .iter()
                .filter_map(|n| pod_cidr(n).map(str::to_string))
                .collect();
            used.extend(g.values().cloned());
            let Some(c) = blocks.first_free(&used) else {
                return Err(ControllerError::Invalid(format!(
                    "no free pod cidr left in {} for node {name}; use a larger --cluster-cidr",
                    ctx.config.cluster_cidr
                )));
            };
            g.insert(name.to_string(), c.clone());
            c
        }
    };
    tracing::info!(node = name, pod_cidr = %cidr, "allocated pod cidr");
    Api::<Node>::all(ctx.client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})),
        )
        .await?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks() {
        let b = Blocks::new("10.42.0.0/16", 24).unwrap();
        assert_eq!(b.block(0), "10.42.0.0/24");
        assert_eq!(b.block(3), "10.42.3.0/24");
        let used: HashSet<String> = ["10.42.0.0/24".to_string()].into();
        assert_eq!(b.first_free(&used).unwrap(), "10.42.1.0/24");
        assert!(Blocks::new("10.42.0.0/25", 24).is_err());
        assert!(Blocks::new("nope", 24).is_err());
    }
}
