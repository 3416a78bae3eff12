//! The in-memory backend: same semantics as the durable ones (revisions, history, watch,
//! compaction), for unit tests of other crates. Nothing survives the process.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::history::{self, Batch, HistorySource};
use crate::{
    DEFAULT_COMPACTION_WINDOW, Event, KeyValue, RangeRequest, RangeResponse, Revision, Store,
    StoreError, WatchStream, check_key, compactor,
};

/// Options of the in-memory store.
#[derive(Clone, Debug)]
pub struct MemoryOptions {
    /// History older than this is compacted automatically; `None` keeps all history.
    pub compaction_window: Option<Duration>,
    /// How many committed writes a watcher may fall behind before it re-reads from history.
    pub watch_buffer: usize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            compaction_window: Some(DEFAULT_COMPACTION_WINDOW),
            watch_buffer: 4096,
        }
    }
}

#[derive(Default)]
struct State {
    kvs: BTreeMap<String, KeyValue>,
    /// Every event with revision >= `compacted` (contiguous: one event per revision).
    history: VecDeque<Event>,
    revision: Revision,
    compacted: Revision,
}

struct Shared {
    state: Mutex<State>,
    tx: broadcast::Sender<Batch>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the store, so a poisoned lock is simply taken over.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The in-memory store. Construct it with [`crate::memory`] or [`memory_with`].
pub struct MemoryStore {
    shared: Arc<Shared>,
}

/// A fresh in-memory store with these options. Automatic compaction runs when called inside a
/// tokio runtime (it stops when the store is dropped).
pub fn memory_with(opts: MemoryOptions) -> Arc<dyn Store> {
    let (tx, _) = broadcast::channel(opts.watch_buffer.max(1));
    let store: Arc<dyn Store> = Arc::new(MemoryStore {
        shared: Arc::new(Shared {
            state: Mutex::new(State::default()),
            tx,
        }),
    });
    if let Some(window) = opts.compaction_window {
        compactor::spawn(&store, window);
    }
    store
}

impl State {
    /// Appends one write: bumps the revision, records history, returns the event.
    fn commit(&mut self, ev_of: impl FnOnce(Revision) -> Event) -> Event {
        self.revision += 1;
        let ev = ev_of(self.revision);
        self.history.push_back(ev.clone());
        ev
    }

    fn events_from(&self, from: Revision) -> impl Iterator<Item = &Event> {
        let first = self
            .history
            .front()
            .map_or(self.revision + 1, Event::revision);
        let skip = usize::try_from(from.saturating_sub(first)).unwrap_or(0);
        self.history.iter().skip(skip)
    }
}

impl MemoryStore {
    fn publish(&self, ev: Event) {
        // No receivers is fine: nobody watches.
        let _ = self.shared.tx.send(Arc::new(vec![ev]));
    }
}

#[async_trait::async_trait]
impl HistorySource for Shared {
    async fn read_history(
        &self,
        prefix: &str,
        from: Revision,
        max: usize,
    ) -> Result<(Vec<Event>, Revision), StoreError> {
        let st = self.lock();
        if from < st.compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted: st.compacted,
            });
        }
        let mut out = Vec::new();
        for ev in st.events_from(from) {
            if ev.key().starts_with(prefix) {
                out.push(ev.clone());
                if out.len() >= max {
                    return Ok((out, ev.revision()));
                }
            }
        }
        Ok((out, st.revision))
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.shared.lock().kvs.get(key).cloned())
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        let st = self.shared.lock();
        let at = history::resolve_read_revision(req.revision, st.revision, st.compacted)?;
        let lower = match &req.start_after {
            Some(s) if s.as_str() >= req.prefix.as_str() => Bound::Excluded(s.clone()),
            _ => Bound::Included(req.prefix.clone()),
        };
        let current = st
            .kvs
            .range::<String, _>((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&req.prefix))
            .map(|(_, kv)| Ok(kv.clone()));
        let overrides = if at < st.revision {
            history::overrides_at(
                st.events_from(at + 1),
                &req.prefix,
                req.start_after.as_deref(),
            )
        } else {
            BTreeMap::new()
        };
        history::merge_range(current, overrides, &req, at)
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        let mut st = self.shared.lock();
        if st.kvs.contains_key(key) {
            return Err(StoreError::AlreadyExists {
                key: key.to_string(),
            });
        }
        let ev = st.commit(|rev| Event::Put {
            kv: KeyValue {
                key: key.to_string(),
                value,
                create_revision: rev,
                mod_revision: rev,
            },
            prev: None,
        });
        let Event::Put { kv, .. } = &ev else {
            return Err(StoreError::Backend("internal: create made no put".into()));
        };
        let kv = kv.clone();
        st.kvs.insert(key.to_string(), kv.clone());
        self.publish(ev);
        Ok(kv)
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_mod_revision: Revision,
    ) -> Result<KeyValue, StoreError> {
        let mut st = self.shared.lock();
        let Some(prev) = st.kvs.get(key).cloned() else {
            return Err(StoreError::NotFound {
                key: key.to_string(),
            });
        };
        if prev.mod_revision != expected_mod_revision {
            return Err(StoreError::Conflict {
                key: key.to_string(),
                current: Some(prev),
            });
        }
        let create_revision = prev.create_revision;
        let ev = st.commit(|rev| Event::Put {
            kv: KeyValue {
                key: key.to_string(),
                value,
                create_revision,
                mod_revision: rev,
            },
            prev: Some(prev),
        });
        let Event::Put { kv, .. } = &ev else {
            return Err(StoreError::Backend("internal: update made no put".into()));
        };
        let kv = kv.clone();
        st.kvs.insert(key.to_string(), kv.clone());
        self.publish(ev);
        Ok(kv)
    }

    async fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<Revision>,
    ) -> Result<(Revision, KeyValue), StoreError> {
        let mut st = self.shared.lock();
        let Some(prev) = st.kvs.get(key).cloned() else {
            return Err(StoreError::NotFound {
                key: key.to_string(),
            });
        };
        if expected_mod_revision.is_some_and(|e| e != prev.mod_revision) {
            return Err(StoreError::Conflict {
                key: key.to_string(),
                current: Some(prev),
            });
        }
        st.kvs.remove(key);
        let ev = st.commit(|rev| Event::Delete {
            key: key.to_string(),
            revision: rev,
            prev: prev.clone(),
        });
        let rev = ev.revision();
        self.publish(ev);
        Ok((rev, prev))
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.shared.lock().revision)
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        // Subscribe before looking at the state, so nothing committed afterwards is missed.
        let rx = self.shared.tx.subscribe();
        let (current, compacted) = {
            let st = self.shared.lock();
            (st.revision, st.compacted)
        };
        let src: Arc<dyn HistorySource> = self.shared.clone();
        if from_revision <= 0 {
            return Ok(history::local_watch(src, rx, prefix, current + 1, false));
        }
        if from_revision < compacted {
            return Err(StoreError::Compacted {
                requested: from_revision,
                compacted,
            });
        }
        Ok(history::local_watch(src, rx, prefix, from_revision, true))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut st = self.shared.lock();
        if revision > st.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: st.revision,
            });
        }
        if revision <= st.compacted {
            return Ok(());
        }
        while st.history.front().is_some_and(|e| e.revision() < revision) {
            st.history.pop_front();
        }
        st.compacted = revision;
        Ok(())
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.shared.lock().compacted)
    }
}
