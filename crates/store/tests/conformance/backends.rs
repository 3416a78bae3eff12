//! Factories for a fresh store of each backend, with a guard that cleans up on drop.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use skiff_store::{MemoryOptions, Store};

pub type Guard = Box<dyn Any + Send>;

pub async fn memory(window: Option<Duration>) -> (Arc<dyn Store>, Guard) {
    let store = skiff_store::memory_with(MemoryOptions {
        compaction_window: window,
        // small, so that the slow-watcher case really overflows the live buffer
        watch_buffer: 16,
    });
    (store, Box::new(()))
}

pub async fn redb(window: Option<Duration>) -> (Arc<dyn Store>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let store = skiff_store::open_redb(
        &dir.path().join("state.redb"),
        skiff_store::RedbOptions {
            compaction_window: window,
            watch_buffer: 4,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (store, Box::new(dir))
}

pub async fn etcd(window: Option<Duration>) -> (Arc<dyn Store>, Guard) {
    let server = match skiff_store::testing::EtcdServer::start().await {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let store = skiff_store::connect_etcd(
        &server.endpoints(),
        skiff_store::EtcdOptions {
            compaction_window: window,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (store, Box::new(server))
}
