//! The redb backend, skiff's embedded default: durable (a write is acknowledged only after it is
//! on disk), group-committed (one writer thread drains all queued writes into one transaction,
//! so one fsync serves many writers), with history kept in a redb table.
//!
//! Durability works like etcd's WAL + backend: the writer thread commits each batch to redb
//! without an fsync and hands it to the logger thread, which appends everything waiting to a
//! write-ahead log (`<file>.wal`: one sequential write + one fdatasync for possibly several
//! batches) and only then publishes the batch and answers its writers; meanwhile the writer
//! already applies the next batch. Every 200 ms (or 1024 batches, or 6 MiB of log) a batch is
//! committed with `Durability::Immediate` instead — a checkpoint — after which the log starts
//! over. Opening the store replays the log records newer than redb's durable revision.
//! Reads are served at the last durable revision: a write committed to redb but not yet logged
//! is reconstructed away from history, so nobody sees a write that a crash could still lose.
//!
//! Tables: `skiff_meta` (format version, store id, current revision, compaction point),
//! `skiff_kv` (key → current value) and `skiff_history` (revision → event with the previous
//! value). The revision is written in the same transaction as the data it numbers.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition, TableHandle,
};
use tokio::sync::{broadcast, oneshot};

use crate::codec;
use crate::history::{self, Batch, HistorySource};
use crate::wal::Wal;
use crate::{
    DEFAULT_COMPACTION_WINDOW, Event, KeyValue, RangeRequest, RangeResponse, Revision, Store,
    StoreError, WatchStream, check_key, compactor,
};

/// The on-disk format version this build writes and the newest it can read.
pub const FORMAT_VERSION: i64 = 1;

const META: TableDefinition<'_, &str, i64> = TableDefinition::new("skiff_meta");
const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("skiff_kv");
const HISTORY: TableDefinition<'_, i64, &[u8]> = TableDefinition::new("skiff_history");

const META_FORMAT: &str = "format_version";
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";
const META_STORE_ID: &str = "store_id";

/// A checkpoint (durable redb commit, after which the log starts over) happens at least this often.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// ... or after this many logged batches ...
const CHECKPOINT_BATCHES: u32 = 1024;
/// ... or when the log holds this many bytes.
const CHECKPOINT_BYTES: u64 = 6 << 20;

/// Options of the redb store.
#[derive(Clone, Debug)]
pub struct RedbOptions {
    /// History older than this is compacted automatically; `None` keeps all history.
    pub compaction_window: Option<Duration>,
    /// How many committed batches a watcher may fall behind before it re-reads from history.
    pub watch_buffer: usize,
    /// The most writes one redb transaction takes (one log fdatasync may cover several).
    pub max_batch: usize,
    /// redb's page cache size in bytes.
    pub cache_size: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            compaction_window: Some(DEFAULT_COMPACTION_WINDOW),
            watch_buffer: 4096,
            max_batch: 1024,
            cache_size: 64 << 20,
        }
    }
}

/// What the readers share: the database, its path, and the last committed revision/compaction.
struct ReadSide {
    db: Arc<Database>,
    path: PathBuf,
    /// The last DURABLE revision (published to readers and watchers).
    revision: AtomicI64,
    /// The last revision committed to redb (may be ahead of `revision` while its log record
    /// is being synced; reads never show those writes).
    applied: AtomicI64,
    /// The log failed: the store accepts no more writes (reopen to recover).
    failed: std::sync::atomic::AtomicBool,
    /// The log has grown past CHECKPOINT_BYTES: the writer should checkpoint soon.
    checkpoint_wanted: std::sync::atomic::AtomicBool,
    compacted: AtomicI64,
    commits: AtomicU64,
    /// Total nanoseconds the writer spent applying + committing batches.
    commit_nanos: AtomicU64,
    /// Writes recovered from the write-ahead log when the store was opened.
    replayed: AtomicU64,
    /// Nanoseconds spent appending + syncing the log, and how many syncs.
    wal_nanos: AtomicU64,
    wal_syncs: AtomicU64,
    /// Checkpoints (durable redb commits) and the nanoseconds they took.
    checkpoints: AtomicU64,
    checkpoint_nanos: AtomicU64,
}

impl ReadSide {
    /// A read side at `revision` with counters at zero (`replayed`: writes recovered from the log).
    fn new(
        db: Database,
        path: &Path,
        revision: Revision,
        compacted: Revision,
        replayed: u64,
    ) -> Self {
        ReadSide {
            db: Arc::new(db),
            path: path.to_path_buf(),
            revision: AtomicI64::new(revision),
            applied: AtomicI64::new(revision),
            failed: std::sync::atomic::AtomicBool::new(false),
            checkpoint_wanted: std::sync::atomic::AtomicBool::new(false),
            compacted: AtomicI64::new(compacted),
            commits: AtomicU64::new(0),
            commit_nanos: AtomicU64::new(0),
            replayed: AtomicU64::new(replayed),
            wal_nanos: AtomicU64::new(0),
            wal_syncs: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoint_nanos: AtomicU64::new(0),
        }
    }
}

/// Counters of the redb writer since the store was opened (for benchmarks and metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct RedbStats {
    /// Batches committed (each answered many writes).
    pub commits: u64,
    /// Time spent applying and committing batches, including log and redb syncs.
    pub commit_time: Duration,
    /// Time spent appending to and syncing the write-ahead log.
    pub wal_time: Duration,
    /// Appends + fdatasyncs of the write-ahead log (each covers one or more batches).
    pub wal_syncs: u64,
    /// Checkpoints (durable redb commits).
    pub checkpoints: u64,
    /// Time the checkpoint batches took.
    pub checkpoint_time: Duration,
}

enum Op {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact(Revision),
}

#[derive(Debug)]
enum Done {
    Put(KeyValue),
    Deleted(Revision, KeyValue),
    Compacted,
}

type Reply = oneshot::Sender<Result<Done, StoreError>>;

struct Request {
    op: Op,
    reply: Reply,
}

/// The redb store. Open it with [`open_redb`].
pub struct RedbStore {
    read: Arc<ReadSide>,
    ops: Option<mpsc::Sender<Request>>,
    events: broadcast::Sender<Batch>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the queue stops the writer after its last batch; wait so that the file is
        // released (and can be reopened) once the store is gone.
        self.ops = None;
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!(path = %self.read.path.display(), "store writer thread panicked");
        }
    }
}

fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn backend(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

fn storage(path: &Path, what: &str, e: StorageError) -> StoreError {
    match e {
        StorageError::Corrupted(detail) => corrupt(path, detail),
        StorageError::Io(io) => StoreError::Io(std::io::Error::new(
            io.kind(),
            format!("{what} {}: {io}", path.display()),
        )),
        other => backend(path, what, other),
    }
}

fn decode_err(path: &Path, e: codec::DecodeError) -> StoreError {
    corrupt(path, format!("damaged record: {}", e.0))
}

/// Opens (or creates) the store file at `path`. A file that is not a skiff store, is damaged, or
/// was written by a newer skiff fails with [`StoreError::Corrupt`].
pub async fn open_redb(path: &Path, opts: RedbOptions) -> Result<Arc<dyn Store>, StoreError> {
    Ok(RedbStore::open(path, opts).await?)
}

impl RedbStore {
    /// Like [`open_redb`], returning the concrete type (for its statistics).
    pub async fn open(path: &Path, opts: RedbOptions) -> Result<Arc<RedbStore>, StoreError> {
        open_store(path, opts).await
    }

    /// How many transactions (fsyncs) the writer has committed since the store was opened.
    pub fn commit_count(&self) -> u64 {
        self.read.commits.load(Ordering::Relaxed)
    }

    /// The writer's counters.
    pub fn stats(&self) -> RedbStats {
        let r = &self.read;
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        RedbStats {
            commits: r.commits.load(Ordering::Relaxed),
            commit_time: d(&r.commit_nanos),
            wal_time: d(&r.wal_nanos),
            wal_syncs: r.wal_syncs.load(Ordering::Relaxed),
            checkpoints: r.checkpoints.load(Ordering::Relaxed),
            checkpoint_time: d(&r.checkpoint_nanos),
        }
    }

    /// How many writes were recovered from the write-ahead log when the store was opened.
    pub fn replayed_on_open(&self) -> u64 {
        self.read.replayed.load(Ordering::Relaxed)
    }

    /// Total time the writer spent applying and committing batches (including fsync).
    pub fn commit_time(&self) -> Duration {
        Duration::from_nanos(self.read.commit_nanos.load(Ordering::Relaxed))
    }
}

async fn open_store(path: &Path, opts: RedbOptions) -> Result<Arc<RedbStore>, StoreError> {
    let owned = path.to_path_buf();
    let cache = opts.cache_size;
    let opened = tokio::task::spawn_blocking(move || {
        let (db, durable, compacted, store_id) = open_blocking(&owned, cache)?;
        let (wal, revision) = recover(&db, &owned, store_id, durable)?;
        Ok::<_, StoreError>((
            db,
            revision,
            compacted,
            wal,
            u64::try_from(revision - durable).unwrap_or(0),
        ))
    })
    .await;
    let (db, revision, compacted, wal, replayed) = match opened {
        Ok(r) => r?,
        // redb's debug builds assert on some impossible-by-construction states; a damaged file
        // can reach them. Never let that take the process down.
        Err(e) => {
            return Err(corrupt(
                path,
                format!("the store engine failed on open: {e}"),
            ));
        }
    };
    let read = Arc::new(ReadSide::new(db, path, revision, compacted, replayed));
    let (events, _) = broadcast::channel(opts.watch_buffer.max(1));
    let (tx, rx) = mpsc::channel();
    let writer = {
        let read = read.clone();
        let events = events.clone();
        let max_batch = opts.max_batch.max(1);
        let mut writer = Writer::new(read.clone(), revision, compacted);
        let logger = Logger { read, wal, events };
        std::thread::Builder::new()
            .name("skiff-store-writer".into())
            .spawn(move || writer.run(&rx, logger, max_batch))?
    };
    tracing::info!(path = %path.display(), revision, compacted, "opened redb store");
    let store = Arc::new(RedbStore {
        read,
        ops: Some(tx),
        events,
        writer: Mutex::new(Some(writer)),
    });
    if let Some(window) = opts.compaction_window {
        let as_dyn: Arc<dyn Store> = store.clone();
        compactor::spawn(&as_dyn, window);
    }
    Ok(store)
}

/// What opening the file found: the database, its durable revision, compaction point, store id.
type Opened = (Database, Revision, Revision, u64);

fn open_blocking(path: &Path, cache: usize) -> Result<Opened, StoreError> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            StoreError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot create directory {}: {e}", parent.display()),
            ))
        })?;
    }
    let db = redb::Builder::new()
        .set_cache_size(cache)
        .create(path)
        .map_err(|e| match e {
            DatabaseError::Storage(StorageError::Io(io))
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
                ) =>
            {
                corrupt(path, format!("cannot read the file: {io}"))
            }
            DatabaseError::Storage(s) => storage(path, "cannot open store file", s),
            DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                "store file {} is already open by another process: stop it first",
                path.display()
            )),
            DatabaseError::UpgradeRequired(v) => {
                corrupt(path, format!("the file uses the old redb file format {v}"))
            }
            DatabaseError::RepairAborted => corrupt(path, "the file needed a repair that failed"),
            other => backend(path, "cannot open store file", other),
        })?;

    let rtxn = db
        .begin_read()
        .map_err(|e| backend(path, "cannot read store file", e))?;
    let names: Vec<String> = rtxn
        .list_tables()
        .map_err(|e| storage(path, "cannot list tables of", e))?
        .map(|t| t.name().to_string())
        .collect();
    drop(rtxn);
    if names.is_empty() {
        let id = new_store_id();
        init_tables(&db, path, id)?;
        return Ok((db, 0, 0, id));
    }
    if !names.iter().any(|n| n == META.name()) {
        return Err(corrupt(
            path,
            format!(
                "not a skiff store: a redb database without skiff's metadata table (it has tables {names:?})"
            ),
        ));
    }
    let bad_table = |e: redb::TableError| corrupt(path, format!("unexpected table layout: {e}"));
    let rtxn = db
        .begin_read()
        .map_err(|e| backend(path, "cannot read store file", e))?;
    let meta = rtxn.open_table(META).map_err(bad_table)?;
    let get = |k: &str| -> Result<Option<i64>, StoreError> {
        Ok(meta
            .get(k)
            .map_err(|e| storage(path, "cannot read metadata of", e))?
            .map(|g| g.value()))
    };
    let version = get(META_FORMAT)?
        .ok_or_else(|| corrupt(path, "the metadata table has no format version"))?;
    if version > FORMAT_VERSION {
        return Err(corrupt(
            path,
            format!(
                "written by a newer skiff (store format {version}; this build reads up to {FORMAT_VERSION})"
            ),
        ));
    }
    if version < 1 {
        return Err(corrupt(
            path,
            format!("invalid store format version {version}"),
        ));
    }
    let revision = get(META_REVISION)?.ok_or_else(|| corrupt(path, "no revision recorded"))?;
    let compacted = get(META_COMPACTED)?.ok_or_else(|| corrupt(path, "no compaction point"))?;
    let store_id = get(META_STORE_ID)?.ok_or_else(|| corrupt(path, "no store id recorded"))?;
    rtxn.open_table(KV).map_err(bad_table)?;
    let hist = rtxn.open_table(HISTORY).map_err(bad_table)?;
    if let Some((last, _)) = hist
        .last()
        .map_err(|e| storage(path, "cannot read history of", e))?
        && last.value() > revision
    {
        return Err(corrupt(
            path,
            format!(
                "history holds revision {} beyond the recorded revision {revision}",
                last.value()
            ),
        ));
    }
    if revision < 0 || compacted < 0 || compacted > revision + 1 {
        return Err(corrupt(
            path,
            format!("inconsistent revisions (current {revision}, compacted {compacted})"),
        ));
    }
    drop(hist);
    drop(meta);
    drop(rtxn);
    Ok((db, revision, compacted, store_id as u64))
}

/// A random id tying the write-ahead log to its store file.
fn new_store_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

/// The write-ahead log next to the store file: `<file>.wal`.
pub fn wal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".wal");
    PathBuf::from(p)
}

/// Replays the write-ahead log into redb (one durable transaction) and returns the log, ready for
/// appends, and the recovered revision.
fn recover(
    db: &Database,
    path: &Path,
    store_id: u64,
    durable: Revision,
) -> Result<(Wal, Revision), StoreError> {
    let mut wal = Wal::open(&wal_path(path), store_id)?;
    let events = wal.replay(durable)?;
    let mut revision = durable;
    if let Some(last) = events.last().map(Event::revision) {
        let n = events.len();
        let txn = db
            .begin_write()
            .map_err(|e| backend(path, "cannot start a write to", e))?;
        {
            let open = |e| backend(path, "cannot open a table of", e);
            let mut kv = txn.open_table(KV).map_err(open)?;
            let mut hist = txn.open_table(HISTORY).map_err(open)?;
            let mut meta = txn.open_table(META).map_err(open)?;
            let mut ap = Applied {
                results: Vec::new(),
                events: Vec::new(),
                revision: durable,
                compacted: 0,
                durable,
            };
            for ev in events {
                record(path, &mut kv, &mut hist, &mut ap, ev)?;
            }
            meta.insert(META_REVISION, last)
                .map_err(|e| storage(path, "cannot write metadata of", e))?;
        }
        txn.commit()
            .map_err(|e| backend(path, "cannot commit to", e))?;
        revision = last;
        tracing::info!(path = %path.display(), writes = n, revision, "replayed the write-ahead log");
    }
    wal.rewind();
    Ok((wal, revision))
}

fn init_tables(db: &Database, path: &Path, store_id: u64) -> Result<(), StoreError> {
    let txn = db
        .begin_write()
        .map_err(|e| backend(path, "cannot write store file", e))?;
    {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| backend(path, "cannot create tables in", e))?;
        for (k, v) in [
            (META_FORMAT, FORMAT_VERSION),
            (META_REVISION, 0),
            (META_COMPACTED, 0),
            (META_STORE_ID, store_id as i64),
        ] {
            meta.insert(k, v)
                .map_err(|e| storage(path, "cannot write metadata of", e))?;
        }
        txn.open_table(KV)
            .map_err(|e| backend(path, "cannot create tables in", e))?;
        txn.open_table(HISTORY)
            .map_err(|e| backend(path, "cannot create tables in", e))?;
    }
    txn.commit()
        .map_err(|e| backend(path, "cannot initialise store file", e))?;
    Ok(())
}

// ---------------------------------------------------------------- the writer (group commit)

/// A batch committed to redb, on its way through the log to its writers and watchers.
struct Staged {
    events: Vec<Event>,
    replies: Vec<(Reply, Result<Done, StoreError>)>,
    revision: Revision,
    compacted: Revision,
    /// Committed with `Durability::Immediate`: redb holds it (and all before it) durably, so it
    /// needs no log record and the log starts over after it.
    checkpoint: bool,
}

/// The writer thread: applies batches to redb (without fsync, or durably for a checkpoint) and
/// hands them to the logger thread, which makes them durable in the log, publishes and answers.
/// The two overlap: while one batch is being synced, the next is already applied.
struct Writer {
    read: Arc<ReadSide>,
    revision: Revision,
    compacted: Revision,
    since_checkpoint: u32,
    last_checkpoint: std::time::Instant,
}

impl Writer {
    fn new(read: Arc<ReadSide>, revision: Revision, compacted: Revision) -> Writer {
        Writer {
            read,
            revision,
            compacted,
            since_checkpoint: 0,
            last_checkpoint: std::time::Instant::now(),
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Request>, mut logger: Logger, max_batch: usize) {
        let (stx, srx) = mpsc::channel::<Staged>();
        let logger_thread = std::thread::Builder::new()
            .name("skiff-store-log".into())
            .spawn(move || logger.run(&srx));
        let logger_thread = match logger_thread {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the store log thread");
                return;
            }
        };
        let mut batch = Vec::with_capacity(max_batch);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if let Some(staged) = self.stage(&mut batch, false)
                && stx.send(staged).is_err()
            {
                break;
            }
        }
        // The store is closing: make everything durable in redb so the log is not needed.
        if let Some(staged) = self.stage(&mut Vec::new(), true) {
            let _ = stx.send(staged);
        }
        drop(stx);
        if logger_thread.join().is_err() {
            tracing::error!("store log thread panicked");
        }
    }

    /// Applies one batch in one redb transaction and commits it. Each write gets its own
    /// revision; a failed condition fails only that write and is evaluated against the state
    /// including earlier writes of the batch. Returns the batch for the logger, or `None` when
    /// it failed as a whole (its writers are answered here).
    fn stage(&mut self, batch: &mut Vec<Request>, force_checkpoint: bool) -> Option<Staged> {
        if self.read.failed.load(Ordering::Acquire) {
            for req in batch.drain(..) {
                let _ = req.reply.send(Err(StoreError::Unavailable(format!(
                    "store {} stopped after a write-ahead log failure: restart to recover",
                    self.read.path.display()
                ))));
            }
            return None;
        }
        let checkpoint = force_checkpoint
            || batch.iter().any(|r| matches!(r.op, Op::Compact(_)))
            || self.since_checkpoint >= CHECKPOINT_BATCHES
            || self.read.checkpoint_wanted.swap(false, Ordering::AcqRel)
            || self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL;
        let started = std::time::Instant::now();
        let outcome = self.apply_and_commit(batch, checkpoint);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let read = &self.read;
        read.commit_nanos.fetch_add(nanos, Ordering::Relaxed);
        if checkpoint {
            read.checkpoints.fetch_add(1, Ordering::Relaxed);
            read.checkpoint_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        match outcome {
            Ok(applied) => {
                self.revision = applied.revision;
                self.compacted = applied.compacted;
                read.applied.store(applied.revision, Ordering::Release);
                if checkpoint {
                    self.since_checkpoint = 0;
                    self.last_checkpoint = std::time::Instant::now();
                } else {
                    self.since_checkpoint += 1;
                }
                let replies = batch
                    .drain(..)
                    .map(|r| r.reply)
                    .zip(applied.results)
                    .collect();
                Some(Staged {
                    events: applied.events,
                    replies,
                    revision: applied.revision,
                    compacted: applied.compacted,
                    checkpoint,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, path = %read.path.display(), writes = batch.len(),
                    "store commit failed; failing every write of the batch");
                let msg = e.to_string();
                for req in batch.drain(..) {
                    let _ = req.reply.send(Err(StoreError::Backend(msg.clone())));
                }
                None
            }
        }
    }

    fn apply_and_commit(
        &mut self,
        batch: &[Request],
        checkpoint: bool,
    ) -> Result<Applied, StoreError> {
        let read = &self.read;
        let path = read.path.as_path();
        let mut txn = read
            .db
            .begin_write()
            .map_err(|e| backend(path, "cannot start a write to", e))?;
        let durability = if checkpoint {
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability)
            .map_err(|e| backend(path, "cannot set durability of", e))?;
        let mut ap = Applied {
            results: Vec::with_capacity(batch.len()),
            events: Vec::with_capacity(batch.len()),
            revision: self.revision,
            compacted: self.compacted,
            durable: read.revision.load(Ordering::Acquire),
        };
        {
            let open = |e| backend(path, "cannot open a table of", e);
            let mut kv = txn.open_table(KV).map_err(open)?;
            let mut hist = txn.open_table(HISTORY).map_err(open)?;
            let mut meta = txn.open_table(META).map_err(open)?;
            for req in batch {
                let res = apply_one(path, &mut kv, &mut hist, &mut ap, &req.op)?;
                ap.results.push(res);
            }
            meta.insert(META_REVISION, ap.revision)
                .map_err(|e| storage(path, "cannot write metadata of", e))?;
            meta.insert(META_COMPACTED, ap.compacted)
                .map_err(|e| storage(path, "cannot write metadata of", e))?;
        }
        txn.commit()
            .map_err(|e| backend(path, "cannot commit to", e))?;
        Ok(ap)
    }
}

/// The logger thread: appends staged batches to the write-ahead log (all that are waiting, in
/// one record and one fdatasync), then publishes them and answers their writers, in order.
struct Logger {
    read: Arc<ReadSide>,
    wal: Wal,
    events: broadcast::Sender<Batch>,
}

impl Logger {
    fn run(&mut self, rx: &mpsc::Receiver<Staged>) {
        let mut staged = Vec::new();
        while let Ok(first) = rx.recv() {
            staged.push(first);
            while let Ok(s) = rx.try_recv() {
                staged.push(s);
            }
            self.log(&mut staged);
        }
    }

    fn log(&mut self, staged: &mut Vec<Staged>) {
        // Batches up to the last checkpoint are durable in redb; only later ones need the log.
        let start = match staged.iter().rposition(|s| s.checkpoint) {
            Some(k) => {
                self.wal.rewind();
                k + 1
            }
            None => 0,
        };
        let mut events: Vec<Event> = Vec::new();
        for s in &staged[start..] {
            events.extend(s.events.iter().cloned());
        }
        let t = std::time::Instant::now();
        let res = self.wal.append(&events);
        if self.wal.len() >= CHECKPOINT_BYTES {
            self.read.checkpoint_wanted.store(true, Ordering::Release);
        }
        let nanos = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let read = &self.read;
        read.wal_nanos.fetch_add(nanos, Ordering::Relaxed);
        if !events.is_empty() {
            read.wal_syncs.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = res {
            // redb already holds these batches (not durably); nothing after them can be
            // trusted to be logged in order, so stop taking writes.
            read.failed.store(true, Ordering::Release);
            tracing::error!(error = %e, path = %read.path.display(),
                "write-ahead log failed; the store stops taking writes");
            let msg = e.to_string();
            for s in staged.drain(..) {
                for (reply, _) in s.replies {
                    let _ = reply.send(Err(StoreError::Backend(msg.clone())));
                }
            }
            return;
        }
        for s in staged.drain(..) {
            read.revision.store(s.revision, Ordering::Release);
            read.compacted.store(s.compacted, Ordering::Release);
            read.commits.fetch_add(1, Ordering::Relaxed);
            if !s.events.is_empty() {
                // No receivers is fine: nobody watches.
                let _ = self.events.send(Arc::new(s.events));
            }
            for (reply, res) in s.replies {
                let _ = reply.send(res);
            }
        }
    }
}

/// What applying one batch produced before it is committed.
struct Applied {
    results: Vec<Result<Done, StoreError>>,
    events: Vec<Event>,
    revision: Revision,
    compacted: Revision,
    /// The last durable revision when the batch started (compaction may not pass it: reads at
    /// the durable revision need the history after it).
    durable: Revision,
}

type KvTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type HistTable<'t> = redb::Table<'t, i64, &'static [u8]>;

/// Applies one write inside the batch's transaction. The outer `Result` is a storage failure
/// (aborts the batch); the inner one is this write's own answer.
fn apply_one(
    path: &Path,
    kv: &mut KvTable<'_>,
    hist: &mut HistTable<'_>,
    ap: &mut Applied,
    op: &Op,
) -> Result<Result<Done, StoreError>, StoreError> {
    let st = |e| storage(path, "cannot write to", e);
    let current = |kv: &KvTable<'_>, key: &str| -> Result<Option<KeyValue>, StoreError> {
        match kv.get(key).map_err(st)? {
            Some(g) => Ok(Some(
                codec::decode_value(key, g.value()).map_err(|e| decode_err(path, e))?,
            )),
            None => Ok(None),
        }
    };
    Ok(match op {
        Op::Create { key, value } => {
            if current(kv, key)?.is_some() {
                return Ok(Err(StoreError::AlreadyExists { key: key.clone() }));
            }
            let rev = ap.revision + 1;
            let new = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: rev,
                mod_revision: rev,
            };
            record(
                path,
                kv,
                hist,
                ap,
                Event::Put {
                    kv: new.clone(),
                    prev: None,
                },
            )?;
            ap.revision = rev;
            Ok(Done::Put(new))
        }
        Op::Update {
            key,
            value,
            expected,
        } => {
            let Some(prev) = current(kv, key)? else {
                return Ok(Err(StoreError::NotFound { key: key.clone() }));
            };
            if prev.mod_revision != *expected {
                return Ok(Err(StoreError::Conflict {
                    key: key.clone(),
                    current: Some(prev),
                }));
            }
            let rev = ap.revision + 1;
            let new = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: prev.create_revision,
                mod_revision: rev,
            };
            record(
                path,
                kv,
                hist,
                ap,
                Event::Put {
                    kv: new.clone(),
                    prev: Some(prev),
                },
            )?;
            ap.revision = rev;
            Ok(Done::Put(new))
        }
        Op::Delete { key, expected } => {
            let Some(prev) = current(kv, key)? else {
                return Ok(Err(StoreError::NotFound { key: key.clone() }));
            };
            if expected.is_some_and(|e| e != prev.mod_revision) {
                return Ok(Err(StoreError::Conflict {
                    key: key.clone(),
                    current: Some(prev),
                }));
            }
            let rev = ap.revision + 1;
            record(
                path,
                kv,
                hist,
                ap,
                Event::Delete {
                    key: key.clone(),
                    revision: rev,
                    prev: prev.clone(),
                },
            )?;
            ap.revision = rev;
            Ok(Done::Deleted(rev, prev))
        }
        Op::Compact(to) => {
            if *to > ap.durable {
                return Ok(Err(StoreError::FutureRevision {
                    requested: *to,
                    current: ap.durable,
                }));
            }
            if *to > ap.compacted {
                hist.retain_in(..*to, |_, _| false).map_err(st)?;
                ap.compacted = *to;
            }
            Ok(Done::Compacted)
        }
    })
}

/// Writes one event: the new current value (or its removal) and the history record.
fn record(
    path: &Path,
    kv: &mut KvTable<'_>,
    hist: &mut HistTable<'_>,
    ap: &mut Applied,
    ev: Event,
) -> Result<(), StoreError> {
    let st = |e| storage(path, "cannot write to", e);
    match &ev {
        Event::Put { kv: new, .. } => {
            kv.insert(new.key.as_str(), codec::encode_value(new).as_slice())
                .map_err(st)?;
        }
        Event::Delete { key, .. } => {
            kv.remove(key.as_str()).map_err(st)?;
        }
    }
    hist.insert(ev.revision(), codec::encode_event(&ev).as_slice())
        .map_err(st)?;
    ap.events.push(ev);
    Ok(())
}

// ---------------------------------------------------------------- reads

impl ReadSide {
    fn begin(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.db
            .begin_read()
            .map_err(|e| backend(&self.path, "cannot read", e))
    }

    fn st(&self) -> impl Fn(StorageError) -> StoreError + '_ {
        |e| storage(&self.path, "cannot read", e)
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        // The durable revision first, then the snapshot: the snapshot is at or after it.
        let durable = self.revision.load(Ordering::Acquire);
        let rtxn = self.begin()?;
        let t = rtxn
            .open_table(KV)
            .map_err(|e| backend(&self.path, "cannot open a table of", e))?;
        let current = match t.get(key).map_err(self.st())? {
            Some(g) => {
                Some(codec::decode_value(key, g.value()).map_err(|e| decode_err(&self.path, e))?)
            }
            None => None,
        };
        if self.applied.load(Ordering::Acquire) == durable {
            return Ok(current); // nothing committed beyond the durable revision
        }
        // Writes after `durable` may be in the snapshot while their log record is synced:
        // answer with the value as of `durable`.
        let hist = rtxn
            .open_table(HISTORY)
            .map_err(|e| backend(&self.path, "cannot open a table of", e))?;
        for item in hist.range(durable + 1..).map_err(self.st())? {
            let (rev, raw) = item.map_err(self.st())?;
            let raw = raw.value();
            if codec::event_key(raw).map_err(|e| decode_err(&self.path, e))? == key {
                let ev =
                    codec::decode_event(rev.value(), raw).map_err(|e| decode_err(&self.path, e))?;
                return Ok(ev.prev().cloned());
            }
        }
        Ok(current)
    }

    /// (revision, compacted) as recorded in this read transaction's snapshot.
    fn snapshot_meta(
        &self,
        rtxn: &redb::ReadTransaction,
    ) -> Result<(Revision, Revision), StoreError> {
        let meta = rtxn
            .open_table(META)
            .map_err(|e| backend(&self.path, "cannot open a table of", e))?;
        let get = |k: &str| -> Result<i64, StoreError> {
            meta.get(k)
                .map_err(self.st())?
                .map(|g| g.value())
                .ok_or_else(|| corrupt(&self.path, format!("metadata {k} is missing")))
        };
        Ok((get(META_REVISION)?, get(META_COMPACTED)?))
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse, StoreError> {
        let durable = self.revision.load(Ordering::Acquire);
        let rtxn = self.begin()?;
        let (revision, compacted) = self.snapshot_meta(&rtxn)?;
        let at = history::resolve_read_revision(req.revision, durable, compacted)?;
        let kv = rtxn
            .open_table(KV)
            .map_err(|e| backend(&self.path, "cannot open a table of", e))?;
        let lower: Bound<&str> = match &req.start_after {
            Some(s) if s.as_str() >= req.prefix.as_str() => Bound::Excluded(s.as_str()),
            _ => Bound::Included(req.prefix.as_str()),
        };
        let overrides = if at < revision {
            let hist = rtxn
                .open_table(HISTORY)
                .map_err(|e| backend(&self.path, "cannot open a table of", e))?;
            let mut later = Vec::new();
            for item in hist.range(at + 1..).map_err(self.st())? {
                let (rev, raw) = item.map_err(self.st())?;
                let raw = raw.value();
                let key = codec::event_key(raw).map_err(|e| decode_err(&self.path, e))?;
                if history::in_range(key, &req.prefix, req.start_after.as_deref()) {
                    later.push(
                        codec::decode_event(rev.value(), raw)
                            .map_err(|e| decode_err(&self.path, e))?,
                    );
                }
            }
            history::overrides_at(later.iter(), &req.prefix, req.start_after.as_deref())
        } else {
            BTreeMap::new()
        };
        let iter = kv
            .range::<&str>((lower, Bound::Unbounded))
            .map_err(self.st())?;
        let prefix = req.prefix.as_str();
        let current = iter
            .map(|item| {
                let (k, v) = item.map_err(self.st())?;
                codec::decode_value(k.value(), v.value()).map_err(|e| decode_err(&self.path, e))
            })
            .take_while(|r| r.as_ref().map_or(true, |kv| kv.key.starts_with(prefix)));
        history::merge_range(current, overrides, req, at)
    }

    fn history_from(
        &self,
        prefix: &str,
        from: Revision,
        max: usize,
    ) -> Result<(Vec<Event>, Revision), StoreError> {
        let durable = self.revision.load(Ordering::Acquire);
        let rtxn = self.begin()?;
        let (_, compacted) = self.snapshot_meta(&rtxn)?;
        if from < compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted,
            });
        }
        let hist = rtxn
            .open_table(HISTORY)
            .map_err(|e| backend(&self.path, "cannot open a table of", e))?;
        let mut out = Vec::new();
        for item in hist.range(from..=durable).map_err(self.st())? {
            let (rev, raw) = item.map_err(self.st())?;
            let raw = raw.value();
            let key = codec::event_key(raw).map_err(|e| decode_err(&self.path, e))?;
            if key.starts_with(prefix) {
                let ev =
                    codec::decode_event(rev.value(), raw).map_err(|e| decode_err(&self.path, e))?;
                out.push(ev);
                if out.len() >= max {
                    return Ok((out, rev.value()));
                }
            }
        }
        Ok((out, durable))
    }
}

/// The history of a redb store as a watch reads it (off the async workers).
struct RedbHistory(Arc<ReadSide>);

#[async_trait::async_trait]
impl HistorySource for RedbHistory {
    async fn read_history(
        &self,
        prefix: &str,
        from: Revision,
        max: usize,
    ) -> Result<(Vec<Event>, Revision), StoreError> {
        let prefix = prefix.to_string();
        let read = self.0.clone();
        tokio::task::spawn_blocking(move || read.history_from(&prefix, from, max))
            .await
            .map_err(|e| StoreError::Backend(format!("history read failed: {e}")))?
    }
}

impl RedbStore {
    async fn submit(&self, op: Op) -> Result<Done, StoreError> {
        let (tx, rx) = oneshot::channel();
        let closed = || StoreError::Unavailable("the store is closed".to_string());
        self.ops
            .as_ref()
            .ok_or_else(closed)?
            .send(Request { op, reply: tx })
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".to_string()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".to_string()))?
    }
}

fn unexpected(d: Done) -> StoreError {
    StoreError::Backend(format!("internal: unexpected writer answer {d:?}"))
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.read.get(key)
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        let read = self.read.clone();
        tokio::task::spawn_blocking(move || read.range(&req))
            .await
            .map_err(|e| StoreError::Backend(format!("range read failed: {e}")))?
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        match self
            .submit(Op::Create {
                key: key.to_string(),
                value,
            })
            .await?
        {
            Done::Put(kv) => Ok(kv),
            d => Err(unexpected(d)),
        }
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_mod_revision: Revision,
    ) -> Result<KeyValue, StoreError> {
        match self
            .submit(Op::Update {
                key: key.to_string(),
                value,
                expected: expected_mod_revision,
            })
            .await?
        {
            Done::Put(kv) => Ok(kv),
            d => Err(unexpected(d)),
        }
    }

    async fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<Revision>,
    ) -> Result<(Revision, KeyValue), StoreError> {
        match self
            .submit(Op::Delete {
                key: key.to_string(),
                expected: expected_mod_revision,
            })
            .await?
        {
            Done::Deleted(rev, kv) => Ok((rev, kv)),
            d => Err(unexpected(d)),
        }
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.read.revision.load(Ordering::Acquire))
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        // Subscribe before reading the revision: nothing committed afterwards can be missed.
        let rx = self.events.subscribe();
        let current = self.read.revision.load(Ordering::Acquire);
        let compacted = self.read.compacted.load(Ordering::Acquire);
        let src: Arc<dyn HistorySource> = Arc::new(RedbHistory(self.read.clone()));
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
        match self.submit(Op::Compact(revision)).await? {
            Done::Compacted => Ok(()),
            d => Err(unexpected(d)),
        }
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.read.compacted.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: Op) -> (Request, oneshot::Receiver<Result<Done, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (Request { op, reply: tx }, rx)
    }

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    fn writer(path: &Path) -> (Writer, Logger, broadcast::Receiver<Batch>) {
        let (db, durable, compacted, id) = open_blocking(path, 1 << 20).unwrap();
        assert_eq!((durable, compacted), (0, 0));
        let (wal, revision) = recover(&db, path, id, durable).unwrap();
        let read = Arc::new(ReadSide::new(db, path, revision, compacted, 0));
        let (events, rx) = broadcast::channel(8);
        let logger = Logger {
            read: read.clone(),
            wal,
            events,
        };
        (Writer::new(read, revision, compacted), logger, rx)
    }

    /// Runs one batch through both stages synchronously.
    fn commit(w: &mut Writer, l: &mut Logger, batch: &mut Vec<Request>) {
        if let Some(staged) = w.stage(batch, false) {
            l.log(&mut vec![staged]);
        }
    }

    /// One batch: every write gets its own revision, conditions see earlier writes of the same
    /// batch, a failed condition fails only its own write, and watchers get one batch after
    /// the commit.
    #[tokio::test]
    async fn group_commit_batch_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let (mut w, mut l, mut rx) = writer(&path);
        let read = w.read.clone();
        let k = || "/k".to_string();
        let ops = vec![
            Op::Create {
                key: k(),
                value: b("1"),
            },
            Op::Update {
                key: k(),
                value: b("2"),
                expected: 1,
            }, // sees the create above
            Op::Update {
                key: k(),
                value: b("x"),
                expected: 1,
            }, // stale now → Conflict
            Op::Create {
                key: k(),
                value: b("y"),
            }, // exists → AlreadyExists
            Op::Delete {
                key: k(),
                expected: Some(2),
            },
            Op::Update {
                key: k(),
                value: b("z"),
                expected: 3,
            }, // deleted → NotFound
            Op::Create {
                key: k(),
                value: b("3"),
            },
        ];
        let (mut batch, mut replies): (Vec<_>, Vec<_>) = ops.into_iter().map(req).unzip();
        commit(&mut w, &mut l, &mut batch);
        assert!(batch.is_empty());
        let mut results = Vec::new();
        for r in replies.iter_mut() {
            results.push(r.try_recv().unwrap());
        }
        assert!(matches!(&results[0], Ok(Done::Put(kv)) if kv.mod_revision == 1));
        assert!(
            matches!(&results[1], Ok(Done::Put(kv)) if kv.mod_revision == 2 && kv.create_revision == 1)
        );
        assert!(
            matches!(&results[2], Err(StoreError::Conflict { current: Some(kv), .. }) if kv.mod_revision == 2)
        );
        assert!(matches!(&results[3], Err(StoreError::AlreadyExists { .. })));
        assert!(matches!(&results[4], Ok(Done::Deleted(3, kv)) if kv.value == b("2")));
        assert!(matches!(&results[5], Err(StoreError::NotFound { .. })));
        assert!(
            matches!(&results[6], Ok(Done::Put(kv)) if kv.mod_revision == 4 && kv.create_revision == 4)
        );
        assert_eq!(read.revision.load(Ordering::Acquire), 4);

        let published = rx.try_recv().unwrap();
        let revs: Vec<_> = published.iter().map(Event::revision).collect();
        assert_eq!(
            revs,
            vec![1, 2, 3, 4],
            "one published batch, contiguous revisions"
        );
        assert!(rx.try_recv().is_err());

        // the revision is durable in the same file
        let rtxn = read.db.begin_read().unwrap();
        assert_eq!(read.snapshot_meta(&rtxn).unwrap(), (4, 0));
        assert_eq!(read.history_from("", 1, 100).unwrap().0.len(), 4);
    }

    /// A batch where every write fails commits nothing visible and publishes nothing.
    #[tokio::test]
    async fn failed_writes_use_no_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let (mut w, mut l, mut rx) = writer(&path);
        let read = w.read.clone();
        let (r, mut reply) = req(Op::Update {
            key: "/nope".into(),
            value: b("1"),
            expected: 5,
        });
        let mut batch = vec![r];
        commit(&mut w, &mut l, &mut batch);
        assert!(matches!(
            reply.try_recv().unwrap(),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(read.revision.load(Ordering::Acquire), 0);
        assert!(rx.try_recv().is_err());
    }

    /// A batch committed to redb but not yet durable in the log is invisible to get, range and
    /// watch catch-up; once logged it is visible everywhere.
    #[tokio::test]
    async fn reads_never_show_writes_before_they_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut l, mut rx) = writer(&dir.path().join("s.redb"));
        let read = w.read.clone();
        let (r1, _) = req(Op::Create {
            key: "/a".into(),
            value: b("1"),
        });
        commit(&mut w, &mut l, &mut vec![r1]);
        rx.try_recv().unwrap();
        // stage (commit to redb) without logging
        let (r2, mut reply2) = req(Op::Update {
            key: "/a".into(),
            value: b("2"),
            expected: 1,
        });
        let (r3, _) = req(Op::Create {
            key: "/b".into(),
            value: b("new"),
        });
        let staged = w.stage(&mut vec![r2, r3], false).unwrap();
        assert_eq!(read.applied.load(Ordering::Acquire), 3);
        assert_eq!(read.revision.load(Ordering::Acquire), 1);
        assert_eq!(read.get("/a").unwrap().unwrap().value, b("1"));
        assert_eq!(read.get("/b").unwrap(), None);
        let all = read.range(&RangeRequest::default()).unwrap();
        assert_eq!(all.revision, 1);
        assert_eq!(all.kvs.len(), 1);
        assert_eq!(all.kvs[0].value, b("1"));
        let (evs, covered) = read.history_from("", 1, 100).unwrap();
        assert_eq!((evs.len(), covered), (1, 1));
        assert!(
            reply2.try_recv().is_err(),
            "not answered before it is durable"
        );
        assert!(rx.try_recv().is_err(), "not published before it is durable");

        l.log(&mut vec![staged]);
        assert!(matches!(reply2.try_recv().unwrap(), Ok(Done::Put(kv)) if kv.mod_revision == 2));
        assert_eq!(rx.try_recv().unwrap().len(), 2);
        assert_eq!(read.get("/a").unwrap().unwrap().value, b("2"));
        assert_eq!(read.get("/b").unwrap().unwrap().value, b("new"));
        assert_eq!(read.range(&RangeRequest::default()).unwrap().kvs.len(), 2);
        let (evs, covered) = read.history_from("", 1, 100).unwrap();
        assert_eq!((evs.len(), covered), (3, 3));
    }

    /// Many concurrent writers really share transactions (group commit).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_are_batched() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb"), RedbOptions::default())
            .await
            .unwrap();
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let s = store.clone();
                tokio::spawn(async move {
                    for j in 0..10 {
                        s.create(&format!("/b/{i}/{j}"), b("v")).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.current_revision().await.unwrap(), 320);
        let commits = store.commit_count();
        assert!(
            commits < 160,
            "320 writes from 32 writers took {commits} commits: no group commit"
        );
    }
}
