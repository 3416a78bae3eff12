//! `skiff-bench store`: writes/s (1, 16, 64 writers, 1 KiB values, full durability), reads/s
//! (gets of random existing keys) and watch delivery latency (100 watchers on one prefix) for
//! redb and for a real etcd, side by side.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use rand::Rng;
use skiff_store::testing::EtcdServer;
use skiff_store::{EtcdOptions, RedbOptions, RedbStats, RedbStore, Store};

/// Flags of `skiff-bench store`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// The etcd binary to benchmark against.
    #[arg(long, default_value = skiff_store::testing::DEFAULT_ETCD_BIN)]
    etcd_bin: PathBuf,
    /// Directory for the redb file (default: the system temp dir, where etcd's data goes too).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of watchers for the latency measurement.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
}

const VALUE_SIZE: usize = 1024;
const WRITERS: [usize; 3] = [1, 16, 64];
const READERS: usize = 16;

#[derive(Debug, Default, Clone)]
struct Results {
    writes: Vec<(usize, f64)>,
    reads: f64,
    watch_p50: Duration,
    watch_p99: Duration,
    watch_events: usize,
    /// redb only: writes per commit at 16 writers.
    batch: Option<(f64, f64)>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: Args) -> anyhow::Result<()> {
    let d = Duration::from_secs(args.duration_secs.max(1));
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a temp dir in {}", base.display()))?;

    eprintln!("redb: {}", dir.path().display());
    let redb = RedbStore::open(
        &dir.path().join("bench.redb"),
        RedbOptions {
            compaction_window: None,
            ..Default::default()
        },
    )
    .await
    .context("cannot open the redb store")?;
    let redb_dyn: Arc<dyn Store> = redb.clone();
    let commits = {
        let redb = redb.clone();
        move || redb.stats()
    };
    let r = measure("redb", &redb_dyn, d, args.watchers, Some(&commits)).await?;
    drop(redb_dyn);
    drop(redb);

    let etcd = EtcdServer::start_with(&args.etcd_bin)
        .await
        .context("cannot start etcd")?;
    eprintln!(
        "etcd: {} (data {})",
        etcd.endpoint(),
        etcd.data_dir().display()
    );
    let etcd_store = skiff_store::connect_etcd(
        &etcd.endpoints(),
        EtcdOptions {
            compaction_window: None,
            ..Default::default()
        },
    )
    .await
    .context("cannot connect to the benchmark etcd")?;
    let e = measure("etcd", &etcd_store, d, args.watchers, None).await?;
    drop(etcd_store);
    drop(etcd);

    print_table(&r, &e, d, args.watchers);
    Ok(())
}

async fn measure(
    name: &str,
    store: &Arc<dyn Store>,
    d: Duration,
    watchers: usize,
    commits: Option<&dyn Fn() -> RedbStats>,
) -> anyhow::Result<Results> {
    let mut res = Results::default();
    let mut keys: Vec<String> = Vec::new();
    for &n in &WRITERS {
        let c0 = commits.map(|c| c());
        let (count, mut written) = write_load(store, n, d).await?;
        let rate = count as f64 / d.as_secs_f64();
        eprintln!("{name}: {n:>2} writers: {rate:>9.0} writes/s");
        if let (Some(s0), Some(c)) = (c0, commits) {
            let s1 = c();
            let syncs = s1.wal_syncs.saturating_sub(s0.wal_syncs);
            let ckpts = s1.checkpoints.saturating_sub(s0.checkpoints);
            let per_sync = count as f64 / (syncs + ckpts).max(1) as f64;
            let per = |t1: Duration, t0: Duration, n: u64| {
                (t1 - t0).as_secs_f64() * 1000.0 / n.max(1) as f64
            };
            let sync_ms = per(s1.wal_time, s0.wal_time, syncs);
            eprintln!(
                "{name}: {n:>2} writers: {per_sync:.1} writes per fdatasync; log append+sync {sync_ms:.2} ms; \
                 {ckpts} checkpoints of {:.2} ms",
                per(s1.checkpoint_time, s0.checkpoint_time, ckpts),
            );
            if n == 16 {
                res.batch = Some((per_sync, sync_ms));
            }
        }
        res.writes.push((n, rate));
        keys.append(&mut written);
    }
    res.reads = read_load(store, Arc::new(keys), d).await?;
    eprintln!("{name}: {READERS} readers: {:>9.0} reads/s", res.reads);
    let (p50, p99, n) = watch_latency(store, watchers, d).await?;
    eprintln!("{name}: watch latency p50 {p50:?} p99 {p99:?} over {n} deliveries");
    (res.watch_p50, res.watch_p99, res.watch_events) = (p50, p99, n);
    Ok(res)
}

/// `n` writers create fresh keys with 1 KiB values for `d`; returns the count and the keys.
async fn write_load(
    store: &Arc<dyn Store>,
    n: usize,
    d: Duration,
) -> anyhow::Result<(u64, Vec<String>)> {
    let value = Bytes::from(vec![b'v'; VALUE_SIZE]);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..n)
        .map(|w| {
            let (store, value, stop) = (store.clone(), value.clone(), stop.clone());
            tokio::spawn(async move {
                let mut keys = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("/bench/w{n}/{w}/{i:08}");
                    store.create(&key, value.clone()).await?;
                    keys.push(key);
                    i += 1;
                }
                Ok::<_, skiff_store::StoreError>(keys)
            })
        })
        .collect();
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("writer task")?.context("write")?);
    }
    Ok((all.len() as u64, all))
}

/// Gets of random existing keys from `READERS` concurrent readers; returns reads/s.
async fn read_load(
    store: &Arc<dyn Store>,
    keys: Arc<Vec<String>>,
    d: Duration,
) -> anyhow::Result<f64> {
    anyhow::ensure!(!keys.is_empty(), "no keys to read");
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..READERS)
        .map(|_| {
            let (store, keys, stop, count) =
                (store.clone(), keys.clone(), stop.clone(), count.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // an embedded get never waits: give the scheduler (and its timers) a turn
                    tokio::task::yield_now().await;
                    let i = rand::rng().random_range(0..keys.len());
                    let kv = store.get(&keys[i]).await?;
                    if kv.is_none() {
                        return Err(anyhow::anyhow!("key {} vanished", keys[i]));
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.context("reader task")??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / d.as_secs_f64())
}

/// `watchers` watches on one prefix; one writer writes events carrying their send time.
/// Latency = from the start of the write call to the event arriving at a watcher.
async fn watch_latency(
    store: &Arc<dyn Store>,
    watchers: usize,
    d: Duration,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let t0 = Instant::now();
    let prefix = "/bench/watch/";
    let sentinel = format!("{prefix}~end");
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut w = store.watch(prefix, 0).await?;
        let sentinel = sentinel.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let next = tokio::time::timeout(Duration::from_secs(30), w.next()).await;
                let Ok(Some(Ok(ev))) = next else {
                    return Err(anyhow::anyhow!("watch ended early: {next:?}"));
                };
                let now = t0.elapsed().as_nanos() as u64;
                if ev.key() == sentinel {
                    break;
                }
                if let skiff_store::Event::Put { kv, .. } = ev {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&kv.value[..8]);
                    lat.push(Duration::from_nanos(
                        now.saturating_sub(u64::from_le_bytes(b)),
                    ));
                }
            }
            Ok(lat)
        }));
    }
    // one writer, paced at ~1 write/ms so that latency, not queueing, is measured
    let end = Instant::now() + d;
    let mut n = 0u64;
    while Instant::now() < end {
        let mut v = vec![0u8; VALUE_SIZE];
        v[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
        store
            .create(&format!("{prefix}{n:08}"), Bytes::from(v))
            .await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    store.create(&sentinel, Bytes::from(vec![0u8; 8])).await?;
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("watcher task")??);
    }
    anyhow::ensure!(!all.is_empty(), "no watch events delivered");
    all.sort();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize];
    Ok((pct(0.50), pct(0.99), all.len()))
}

fn print_table(r: &Results, e: &Results, d: Duration, watchers: usize) {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "-".into()
        }
    };
    let ms = |x: Duration| format!("{:.2} ms", x.as_secs_f64() * 1000.0);
    println!("| measurement | redb (embedded) | etcd 3.4 (loopback) | redb/etcd |");
    println!("|---|---:|---:|---:|");
    for ((n, rw), (_, ew)) in r.writes.iter().zip(&e.writes) {
        println!(
            "| writes/s, {n} writer{} (1 KiB, durable) | {rw:.0} | {ew:.0} | {} |",
            if *n == 1 { "" } else { "s" },
            ratio(*rw, *ew)
        );
    }
    println!(
        "| reads/s, {READERS} readers (get of random existing key) | {:.0} | {:.0} | {} |",
        r.reads,
        e.reads,
        ratio(r.reads, e.reads)
    );
    for (label, a, b) in [
        ("p50", r.watch_p50, e.watch_p50),
        ("p99", r.watch_p99, e.watch_p99),
    ] {
        println!(
            "| watch delivery latency {label}, {watchers} watchers (lower is better) | {} | {} | {} |",
            ms(a),
            ms(b),
            ratio(a.as_secs_f64(), b.as_secs_f64())
        );
    }
    println!();
    if let Some((b, ms)) = r.batch {
        println!(
            "redb group commit at 16 writers: {b:.1} writes per fdatasync, {ms:.2} ms per write-ahead log append + fdatasync."
        );
    }
    println!(
        "Each measurement ran {} s; watch latency = start of the write call → event at the watcher \
         ({} / {} deliveries for redb / etcd); etcd with default fsync; redb acknowledges after its write-ahead log fdatasync \
         (checkpoints commit redb with Durability::Immediate).",
        d.as_secs(),
        r.watch_events,
        e.watch_events
    );
}
