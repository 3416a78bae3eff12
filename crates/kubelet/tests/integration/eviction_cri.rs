//! Image garbage collection by the eviction manager with an external CRI runtime: Debian's real
//! containerd (per test, in a temp dir: `crate::containerd`), shared with another client.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use skiff_kubelet::eviction::{EvictionConfig, Manager};
use skiff_kubelet::server::{PodLookup, PodRef};
use skiff_runtime::{CriRuntime, Runtime};

use crate::containerd::{BUSYBOX, Containerd, PAUSE};

/// A node with no pods of its own.
struct NoPods;

impl PodLookup for NoPods {
    fn pod(&self, _namespace: &str, _name: &str) -> Option<PodRef> {
        None
    }
    fn pods(&self) -> Vec<PodRef> {
        Vec::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_gc_with_containerd_deletes_only_unused_unpinned_images() {
    const UNUSED: &str = "skiff.local/kubelet-gc-unused:test";
    let ctd = Containerd::start();
    ctd.import(UNUSED, &["true"]);
    // Another client of this containerd runs a container from BUSYBOX (and so a sandbox from
    // PAUSE, containerd's sandbox image).
    ctd.run_foreign(BUSYBOX).await;
    let cri = Arc::new(CriRuntime::connect(&ctd.endpoint()).await.unwrap());
    let runtime: Arc<dyn Runtime> = cri.clone();

    let mut cfg = EvictionConfig::default();
    for arg in [
        "image-gc-low-threshold=0",
        "image-gc-high-threshold=0",
        "minimum-image-ttl-duration=0s",
        "eviction-hard=",
    ] {
        cfg.apply_kubelet_arg(arg).unwrap();
    }
    // The configured image dir does not exist: image GC can only work on the filesystem
    // containerd reports.
    let root = tempfile::tempdir().unwrap();
    cfg.image_fs = Some(root.path().join("no-such-images-dir"));
    let mut manager = Manager::new(
        cfg,
        root.path().to_path_buf(),
        runtime,
        Arc::new(NoPods),
        Arc::default(),
        Arc::default(),
    );
    manager.tick().await;

    assert!(
        cri.image_status(UNUSED).await.unwrap().is_none(),
        "the unused image was not collected; containerd log:\n{}",
        ctd.log()
    );
    // In use by someone else's container, and pinned (the sandbox image): kept.
    assert!(cri.image_status(BUSYBOX).await.unwrap().is_some());
    assert!(cri.image_status(PAUSE).await.unwrap().is_some());
    // Another round changes nothing.
    manager.tick().await;
    assert_eq!(cri.list_images().await.unwrap().len(), 2);
}
