//! Shared informers: one reflector per resource type, read by every controller through a cheap
//! `Store` handle, with a broadcast of changed objects that controllers map to work-queue keys.

use std::sync::Arc;

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::broadcast;

/// One shared reflector: the cache (`store`) and a feed of every applied or deleted object.
pub struct Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// The cache, shared by all readers (objects are `Arc`s, never cloned per reader).
    pub store: Store<K>,
    tx: broadcast::Sender<Arc<K>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Starts watching `api`.
    pub fn spawn(api: Api<K>, what: &'static str) -> Arc<Self> {
        let (reader, writer) = reflector::store::<K>();
        let (tx, _) = broadcast::channel(8192);
        let tx2 = tx.clone();
        let reader2 = reader.clone();
        let task = tokio::spawn(async move {
            let stream = reflector::reflector(
                writer,
                watcher::watcher(api, watcher::Config::default()).default_backoff(),
            );
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        let shared = reader2
                            .get(&ObjectRef::from_obj(&o))
                            .unwrap_or_else(|| Arc::new(o));
                        let _ = tx2.send(shared);
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        let _ = tx2.send(Arc::new(o));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(resource = what, error = %e, "watch failed; retrying"),
                }
            }
        });
        Arc::new(Informer {
            store: reader,
            tx,
            task,
        })
    }

    /// A feed of changed objects from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<K>> {
        self.tx.subscribe()
    }

    /// Waits until the first list has been read.
    pub async fn synced(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// The cached object `ns/name` (`ns` empty for cluster-scoped objects).
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        let r = if ns.is_empty() {
            ObjectRef::new(name)
        } else {
            ObjectRef::new(name).within(ns)
        };
        self.store.get(&r)
    }

    /// Every cached object in namespace `ns`.
    pub fn in_namespace(&self, ns: &str) -> Vec<Arc<K>> {
        self.store
            .state()
            .into_iter()
            .filter(|o| o.meta().namespace.as_deref() == Some(ns))
            .collect()
    }
}

impl<K> Drop for Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Feeds `queue` with the keys `map` derives from each changed object; on a lagged feed every
/// key from `all` is queued (a full resync).
pub fn feed<K, M, A>(informer: &Informer<K>, queue: crate::queue::Queue, map: M, all: A)
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    M: Fn(&K) -> Vec<String> + Send + 'static,
    A: Fn() -> Vec<String> + Send + 'static,
{
    let mut rx = informer.tx.subscribe();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(o) => {
                    for k in map(&o) {
                        queue.add(k);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    for k in all() {
                        queue.add(k);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// The usual wiring of a controller of `kind` whose objects come from `owners` and who owns
/// objects of `owned` (pods, Jobs): every owner change queues its key, every owned object's change
/// queues its controller's key (when it is of `kind`), and every existing owner is queued once.
/// Returns the closure that lists every owner key, for further feeds.
pub fn feed_owner<K, O>(
    owners: &Arc<Informer<K>>,
    owned: &Informer<O>,
    kind: &'static str,
    queue: &crate::queue::Queue,
) -> impl Fn() -> Vec<String> + Clone + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    O: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let inf = owners.clone();
    let all = move || {
        inf.store
            .state()
            .iter()
            .map(|o| crate::util::key(o.meta()))
            .collect::<Vec<_>>()
    };
    feed(
        owners,
        queue.clone(),
        |o: &K| vec![crate::util::key(o.meta())],
        all.clone(),
    );
    feed(
        owned,
        queue.clone(),
        move |o: &O| {
            let ns = o.meta().namespace.as_deref().unwrap_or("");
            match crate::util::controller_ref(o.meta()) {
                Some(r) if r.kind == kind => vec![format!("{ns}/{}", r.name)],
                _ => vec![],
            }
        },
        all.clone(),
    );
    for k in all() {
        queue.add(k);
    }
    all
}
