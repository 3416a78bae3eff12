//! skiff's revisioned key-value store: the `Store` trait every Kubernetes object lives behind, with
//! an in-memory backend (tests), a redb backend (embedded default) and an etcd backend (external).
//!
//! The store knows no object kinds. Every write gets the next value of one global revision; a
//! key's `mod_revision` is the object's `resourceVersion`. Writes are compare-and-swap on the
//! key's `mod_revision`; watches replay history from a revision and then follow live writes with
//! no gaps and no duplicates; history older than a window is compacted automatically.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

mod codec;
mod compactor;
pub mod etcd;
mod history;
pub mod memory;
pub mod redb_store;
pub mod testing;
mod wal;

pub use etcd::{EtcdOptions, EtcdStore, EtcdTls, connect_etcd};
pub use memory::{MemoryOptions, MemoryStore, memory_with};
pub use redb_store::{FORMAT_VERSION, RedbOptions, RedbStats, RedbStore, open_redb, wal_path};

/// One global, strictly increasing revision, incremented per write; 0 means "none".
pub type Revision = i64;

/// The default window of history kept for watches and reads at older revisions.
pub const DEFAULT_COMPACTION_WINDOW: Duration = Duration::from_secs(5 * 60);

/// One key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, e.g. `/registry/pods/default/web-0`.
    pub key: String,
    /// The stored bytes (opaque to the store).
    pub value: Bytes,
    /// The revision that created this key (this incarnation: a delete and re-create starts anew).
    pub create_revision: Revision,
    /// The revision of the last write to this key (an object's `resourceVersion`).
    pub mod_revision: Revision,
}

/// A change to one key, as delivered by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was created or updated; the event's revision is `kv.mod_revision`.
    Put {
        /// The new value.
        kv: KeyValue,
        /// The value before this write (`None` when the write created the key).
        prev: Option<KeyValue>,
    },
    /// The key was deleted at `revision`.
    Delete {
        /// The deleted key.
        key: String,
        /// The revision of the delete.
        revision: Revision,
        /// The value just deleted.
        prev: KeyValue,
    },
}

impl Event {
    /// The revision of this change.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put { kv, .. } => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    /// The key this change is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put { kv, .. } => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The value of the key just before this change (`None` if the key did not exist).
    pub fn prev(&self) -> Option<&KeyValue> {
        match self {
            Event::Put { prev, .. } => prev.as_ref(),
            Event::Delete { prev, .. } => Some(prev),
        }
    }
}

/// A read of all keys under a prefix, optionally paginated and at an older revision.
#[derive(Clone, Debug, Default)]
pub struct RangeRequest {
    /// All keys starting with this (e.g. `/registry/pods/default/`); empty means every key.
    pub prefix: String,
    /// Exclusive continue key (pagination): only keys strictly greater than this are returned.
    pub start_after: Option<String>,
    /// At most this many keys; `None` or `Some(0)` means unlimited.
    pub limit: Option<usize>,
    /// `None` (or `Some(0)`) reads the current state; `Some(r)` reads as of revision `r`.
    pub revision: Option<Revision>,
}

/// The answer to a [`RangeRequest`].
#[derive(Clone, Debug)]
pub struct RangeResponse {
    /// The keys, in ascending key order.
    pub kvs: Vec<KeyValue>,
    /// More keys remain after the last returned one.
    pub more: bool,
    /// The revision this read was served at (use it for the following pages).
    pub revision: Revision,
}

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `create` found the key already present.
    #[error("key {key} already exists")]
    AlreadyExists {
        /// The key.
        key: String,
    },
    /// The key does not exist.
    #[error("key {key} not found")]
    NotFound {
        /// The key.
        key: String,
    },
    /// A compare-and-swap failed: the key's mod revision was not the expected one.
    #[error("key {key} was modified concurrently (now at mod revision {}): re-read and retry",
        current.as_ref().map_or(0, |kv| kv.mod_revision))]
    Conflict {
        /// The key.
        key: String,
        /// The current value, if the key still exists.
        current: Option<KeyValue>,
    },
    /// The requested revision is older than the history kept.
    #[error(
        "revision {requested} has been compacted (oldest kept is {compacted}): start again from the current state"
    )]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still readable.
        compacted: Revision,
    },
    /// The requested revision is newer than the store's current revision.
    #[error("revision {requested} is in the future (current is {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's current revision.
        current: Revision,
    },
    /// The store file is not a skiff store, is damaged, or comes from a newer version.
    #[error("store file {} is unusable: {detail}; restore a snapshot or move the file away to start empty", path.display())]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The backend cannot be reached (etcd down, store closed).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// An I/O error.
    #[error("store i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Any other backend failure.
    #[error("store backend error: {0}")]
    Backend(String),
    /// The request is invalid (e.g. an empty key).
    #[error("invalid store request: {0}")]
    Invalid(String),
}

/// A stream of watch events (or one terminal error).
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event, StoreError>> + Send>>;

/// The revisioned key-value store.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current value of `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// All keys under a prefix (paginated, optionally at an older revision).
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError>;

    /// Creates `key`; fails with `AlreadyExists` if it exists. Returns the stored kv.
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue, StoreError>;

    /// Compare-and-swap on mod_revision; `NotFound` if absent, `Conflict` if the revision differs.
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_mod_revision: Revision,
    ) -> Result<KeyValue, StoreError>;

    /// Deletes `key` (if `expected_mod_revision` is `Some`, only when it matches, else
    /// `Conflict`). Returns the revision of the delete and the deleted kv; `NotFound` if absent.
    async fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<Revision>,
    ) -> Result<(Revision, KeyValue), StoreError>;

    /// The store's current revision (0 for an empty, never-written store).
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Events for keys under `prefix` with revision >= `from_revision` (inclusive, like etcd's
    /// start_revision), in revision order, with no gaps and no duplicates, then live events.
    /// `from_revision = 0` means "from now". `Compacted` (immediately or as the first stream
    /// item) when `from_revision` is older than the history kept.
    async fn watch(&self, prefix: &str, from_revision: Revision)
    -> Result<WatchStream, StoreError>;

    /// Drops history before `revision`; reads and watches at older revisions then get
    /// `Compacted`. Compacting to a revision at or below the current compaction point is a no-op.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// The oldest revision still readable and watchable (0 when nothing was compacted yet).
    async fn compacted_revision(&self) -> Result<Revision, StoreError>;
}

/// A fresh in-memory store with default options (history window [`DEFAULT_COMPACTION_WINDOW`];
/// automatic compaction runs only when called inside a tokio runtime).
pub fn memory() -> Arc<dyn Store> {
    memory_with(MemoryOptions::default())
}

/// The end of the key range of all keys starting with `prefix` (exclusive), or `None` when the
/// prefix has no upper bound (empty, or all bytes 0xff).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Invalid("the key is empty".to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn corrupt_error_names_path_and_remedy() {
        let e = StoreError::Corrupt {
            path: PathBuf::from("/var/lib/skiff/db/state.redb"),
            detail: "bad magic".into(),
        };
        let s = e.to_string();
        assert!(s.contains("/var/lib/skiff/db/state.redb"), "{s}");
        assert!(
            s.contains("restore a snapshot or move the file away"),
            "{s}"
        );
    }
}
