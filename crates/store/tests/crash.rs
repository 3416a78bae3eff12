//! Crash test: a child process writes to a redb store with several concurrent writers and is
//! killed with SIGKILL at a random moment, 20 times over the same file. After each kill the store
//! must open cleanly, hold every acknowledged write (or a later acknowledged one), and its
//! history must replay exactly to its current state.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use skiff_store::{Event, KeyValue, RangeRequest, RedbOptions, RedbStore, Store};

const RUNS: usize = 20;
const WRITERS: &str = "8";

#[derive(Clone, Debug)]
struct Ack {
    key: String,
    rev: i64,
    value: String,
}

/// Runs the writer once, kills it after a random delay, returns the acknowledged writes.
fn run_and_kill(path: &std::path::Path, run: usize) -> Vec<Ack> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skiff-store-crash-writer"))
        .arg(path)
        .arg(run.to_string())
        .arg(WRITERS)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut acks = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                break; // a line cut by the kill: never acknowledged as a whole
            }
            let s = String::from_utf8(line.clone()).unwrap();
            let mut parts = s.trim_end().splitn(4, ' ');
            match parts.next() {
                Some("READY") => {
                    let _ = tx.send(());
                }
                Some("ACK") => {
                    let key = parts.next().unwrap().to_string();
                    let rev = parts.next().unwrap().parse().unwrap();
                    let value = parts.next().unwrap().to_string();
                    if acks.is_empty() {
                        let _ = tx.send(());
                    }
                    acks.push(Ack { key, rev, value });
                }
                other => panic!("unexpected writer output {other:?}"),
            }
        }
        acks
    });
    // wait until the writer has opened the store and acknowledged a first write
    rx.recv_timeout(Duration::from_secs(60))
        .expect("writer did not open the store");
    rx.recv_timeout(Duration::from_secs(60))
        .expect("writer acknowledged no write");
    let delay = rand::rng().random_range(5..400);
    std::thread::sleep(Duration::from_millis(delay));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    // every acknowledged write over all runs, and the latest per key
    let mut all_acks: Vec<Ack> = Vec::new();
    let mut latest: BTreeMap<String, Ack> = BTreeMap::new();
    let mut replayed = 0;
    for run in 0..RUNS {
        let acks = tokio::task::spawn_blocking({
            let path = path.clone();
            move || run_and_kill(&path, run)
        })
        .await
        .unwrap();
        assert!(!acks.is_empty(), "run {run}: no acknowledged writes");
        for a in &acks {
            if latest.get(&a.key).is_none_or(|l| l.rev < a.rev) {
                latest.insert(a.key.clone(), a.clone());
            }
        }
        all_acks.extend(acks);

        let store = RedbStore::open(
            &path,
            RedbOptions {
                compaction_window: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("run {run}: store does not open after SIGKILL: {e}"));
        replayed += store.replayed_on_open();
        let current = store.current_revision().await.unwrap();
        let max_ack = all_acks.iter().map(|a| a.rev).max().unwrap();
        assert!(
            current >= max_ack,
            "run {run}: revision {current} < acknowledged {max_ack}"
        );

        // every acknowledged key holds its acknowledged value or a later write
        for (key, ack) in &latest {
            let kv = store
                .get(key)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("run {run}: acknowledged key {key} is missing"));
            assert!(
                kv.mod_revision >= ack.rev,
                "run {run}: {key} went back in time"
            );
            if kv.mod_revision == ack.rev {
                assert_eq!(
                    kv.value,
                    ack.value.as_bytes(),
                    "run {run}: {key} has another value"
                );
            }
            assert!(kv.create_revision <= kv.mod_revision && kv.mod_revision <= current);
        }

        // the history replays exactly to the current state, and holds every acknowledged write
        let now = store
            .range(RangeRequest {
                prefix: "/crash/".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(now.revision, current);
        let mut w = store.watch("/crash/", 1).await.unwrap();
        let mut state: BTreeMap<String, KeyValue> = BTreeMap::new();
        let mut at_rev: BTreeMap<i64, (String, bytes::Bytes)> = BTreeMap::new();
        let mut expect_rev = 1;
        while expect_rev <= current {
            let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(
                ev.revision(),
                expect_rev,
                "run {run}: history has a gap or dup"
            );
            expect_rev += 1;
            match ev {
                Event::Put { kv, prev } => {
                    assert_eq!(prev.as_ref(), state.get(&kv.key), "run {run}: wrong prev");
                    at_rev.insert(kv.mod_revision, (kv.key.clone(), kv.value.clone()));
                    state.insert(kv.key.clone(), kv);
                }
                Event::Delete { .. } => panic!("the writer never deletes"),
            }
        }
        assert_eq!(
            state.into_values().collect::<Vec<_>>(),
            now.kvs,
            "run {run}"
        );
        for a in &all_acks {
            let (k, v) = at_rev
                .get(&a.rev)
                .unwrap_or_else(|| panic!("run {run}: acknowledged revision {} missing", a.rev));
            assert_eq!(
                (k.as_str(), v.as_ref()),
                (a.key.as_str(), a.value.as_bytes())
            );
        }
        drop(w);
        drop(store);
    }
    eprintln!(
        "crash test: {RUNS} SIGKILLs, {} acknowledged writes checked, {replayed} recovered from the write-ahead log",
        all_acks.len()
    );
    assert!(
        replayed > 0,
        "no run needed the write-ahead log: the test did not exercise recovery"
    );
}
