//! The conformance cases: each takes a fresh store and checks one behaviour of the contract.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use skiff_store::{Event, KeyValue, RangeRequest, Revision, Store, StoreError, WatchStream};

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

async fn next_event(w: &mut WatchStream) -> Event {
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        other => panic!("expected a watch event, got {other:?}"),
    }
}

async fn assert_quiet(w: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("expected no more watch events, got {item:?}");
    }
}

fn range(prefix: &str) -> RangeRequest {
    RangeRequest {
        prefix: prefix.into(),
        ..Default::default()
    }
}

pub async fn create_get(s: Arc<dyn Store>) {
    let r0 = s.current_revision().await.unwrap();
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    let kv = s.create("/t/a", b("one")).await.unwrap();
    assert_eq!(kv.key, "/t/a");
    assert_eq!(kv.value, b("one"));
    assert_eq!(kv.create_revision, r0 + 1);
    assert_eq!(kv.mod_revision, r0 + 1);
    assert_eq!(s.current_revision().await.unwrap(), r0 + 1);
    assert_eq!(s.get("/t/a").await.unwrap(), Some(kv.clone()));
    match s.create("/t/a", b("two")).await {
        Err(StoreError::AlreadyExists { key }) => assert_eq!(key, "/t/a"),
        other => panic!("second create: {other:?}"),
    }
    assert_eq!(
        s.current_revision().await.unwrap(),
        r0 + 1,
        "a failed write must not use a revision"
    );
    assert_eq!(s.get("/t/a").await.unwrap(), Some(kv));
}

pub async fn update_cas(s: Arc<dyn Store>) {
    let kv = s.create("/t/a", b("1")).await.unwrap();
    let kv2 = s.update("/t/a", b("2"), kv.mod_revision).await.unwrap();
    assert_eq!(kv2.mod_revision, kv.mod_revision + 1);
    assert_eq!(kv2.create_revision, kv.create_revision);
    assert_eq!(kv2.value, b("2"));
    match s.update("/t/a", b("3"), kv.mod_revision).await {
        Err(StoreError::Conflict { key, current }) => {
            assert_eq!(key, "/t/a");
            assert_eq!(current, Some(kv2.clone()));
        }
        other => panic!("stale update: {other:?}"),
    }
    match s.update("/t/missing", b("3"), 1).await {
        Err(StoreError::NotFound { key }) => assert_eq!(key, "/t/missing"),
        other => panic!("update of a missing key: {other:?}"),
    }
    assert_eq!(s.current_revision().await.unwrap(), kv2.mod_revision);
    assert_eq!(s.get("/t/a").await.unwrap(), Some(kv2));
}

pub async fn delete_conditional(s: Arc<dyn Store>) {
    let kv = s.create("/t/a", b("1")).await.unwrap();
    match s.delete("/t/a", Some(kv.mod_revision + 100)).await {
        Err(StoreError::Conflict { current, .. }) => assert_eq!(current, Some(kv.clone())),
        other => panic!("conditional delete with a wrong revision: {other:?}"),
    }
    let (rev, prev) = s.delete("/t/a", Some(kv.mod_revision)).await.unwrap();
    assert_eq!(rev, kv.mod_revision + 1);
    assert_eq!(prev, kv);
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    match s.delete("/t/a", None).await {
        Err(StoreError::NotFound { key }) => assert_eq!(key, "/t/a"),
        other => panic!("delete of a missing key: {other:?}"),
    }
    // unconditional delete, and a re-create starts a new incarnation
    let kv = s.create("/t/b", b("1")).await.unwrap();
    let (rev, _) = s.delete("/t/b", None).await.unwrap();
    let again = s.create("/t/b", b("2")).await.unwrap();
    assert_eq!(again.create_revision, rev + 1);
    assert!(again.create_revision > kv.create_revision);
}

pub async fn range_prefix_limit_continue(s: Arc<dyn Store>) {
    for i in 0..10 {
        s.create(&format!("/r/ns1/k{i:02}"), b(&format!("v{i}")))
            .await
            .unwrap();
    }
    s.create("/r/ns10/x", b("other ns")).await.unwrap();
    s.create("/r/ns0", b("shorter")).await.unwrap();
    s.create("/q/zzz", b("other prefix")).await.unwrap();

    let all = s.range(range("/r/ns1/")).await.unwrap();
    assert_eq!(all.kvs.len(), 10);
    assert!(!all.more);
    assert_eq!(all.revision, s.current_revision().await.unwrap());
    let keys: Vec<_> = all.kvs.iter().map(|k| k.key.clone()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "range returns keys in order");

    // paginate 3 at a time with continue keys, all pages at the first page's revision
    let mut got = Vec::new();
    let mut start_after = None;
    let mut rev = None;
    loop {
        let page = s
            .range(RangeRequest {
                prefix: "/r/ns1/".into(),
                start_after: start_after.clone(),
                limit: Some(3),
                revision: rev,
            })
            .await
            .unwrap();
        assert!(page.kvs.len() <= 3);
        rev = Some(page.revision);
        got.extend(page.kvs.iter().map(|k| k.key.clone()));
        start_after = page.kvs.last().map(|k| k.key.clone());
        if !page.more {
            break;
        }
        // writes between pages must not change what later pages see
        s.create(&format!("/r/ns1/k{:02}x", got.len()), b("late"))
            .await
            .unwrap();
    }
    assert_eq!(
        got, keys,
        "pagination at a fixed revision yields the same keys"
    );

    // exact limit: more is false
    let p = s
        .range(RangeRequest {
            prefix: "/r/ns1/".into(),
            limit: Some(10),
            revision: rev,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((p.kvs.len(), p.more), (10, false));

    // the empty prefix reads everything
    let every = s.range(range("")).await.unwrap();
    assert!(every.kvs.len() >= 13);
    assert!(every.kvs.iter().any(|k| k.key == "/q/zzz"));
}

pub async fn range_at_revision(s: Arc<dyn Store>) {
    let a = s.create("/h/a", b("a1")).await.unwrap();
    let bb = s.create("/h/b", b("b1")).await.unwrap();
    let at = bb.mod_revision;
    s.update("/h/a", b("a2"), a.mod_revision).await.unwrap();
    s.delete("/h/b", None).await.unwrap();
    s.create("/h/c", b("c1")).await.unwrap();

    let old = s
        .range(RangeRequest {
            prefix: "/h/".into(),
            revision: Some(at),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(old.revision, at);
    assert_eq!(old.kvs, vec![a.clone(), bb.clone()]);

    let older = s
        .range(RangeRequest {
            prefix: "/h/".into(),
            revision: Some(a.mod_revision),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(older.kvs, vec![a]);

    let now = s.range(range("/h/")).await.unwrap();
    let vals: Vec<_> = now.kvs.iter().map(|k| k.value.clone()).collect();
    assert_eq!(vals, vec![b("a2"), b("c1")]);

    let cur = s.current_revision().await.unwrap();
    match s
        .range(RangeRequest {
            prefix: "/h/".into(),
            revision: Some(cur + 5),
            ..Default::default()
        })
        .await
    {
        Err(StoreError::FutureRevision { requested, .. }) => assert_eq!(requested, cur + 5),
        other => panic!("read at a future revision: {other:?}"),
    }
}

pub async fn watch_from_revision_then_live(s: Arc<dyn Store>) {
    let a = s.create("/w/a", b("1")).await.unwrap();
    s.create("/other/x", b("not watched")).await.unwrap();
    let a2 = s.update("/w/a", b("2"), a.mod_revision).await.unwrap();

    let mut w = s.watch("/w/", a.mod_revision).await.unwrap();
    assert_eq!(
        next_event(&mut w).await,
        Event::Put {
            kv: a.clone(),
            prev: None
        }
    );
    assert_eq!(
        next_event(&mut w).await,
        Event::Put {
            kv: a2.clone(),
            prev: Some(a.clone())
        }
    );
    // live
    let (drev, _) = s.delete("/w/a", Some(a2.mod_revision)).await.unwrap();
    assert_eq!(
        next_event(&mut w).await,
        Event::Delete {
            key: "/w/a".into(),
            revision: drev,
            prev: a2.clone()
        }
    );
    let c = s.create("/w/c", b("c")).await.unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!(ev.revision(), c.mod_revision);
    assert_eq!(ev.key(), "/w/c");
    assert_quiet(&mut w).await;
}

pub async fn watch_from_now(s: Arc<dyn Store>) {
    s.create("/n/old", b("x")).await.unwrap();
    let mut w = s.watch("/n/", 0).await.unwrap();
    assert_quiet(&mut w).await;
    let kv = s.create("/n/new", b("y")).await.unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!(ev, Event::Put { kv, prev: None });
}

/// Writers run while a watch starts from an older revision: the watch must see every revision
/// under the prefix exactly once, in order (catch-up hands over to live with no gap or dup).
pub async fn watch_no_gaps_under_concurrent_writes(s: Arc<dyn Store>) {
    let first = s.create("/g/seed", b("0")).await.unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..50 {
                    let kv = s.create(&format!("/g/w{w}/{i}"), b("v")).await.unwrap();
                    revs.push(kv.mod_revision);
                }
                revs
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut w = s.watch("/g/", first.mod_revision).await.unwrap();
    let mut expected = vec![first.mod_revision];
    for h in writers {
        expected.extend(h.await.unwrap());
    }
    expected.sort();
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        seen.push(next_event(&mut w).await.revision());
    }
    assert_eq!(seen, expected);
    assert_quiet(&mut w).await;
}

pub async fn compaction(s: Arc<dyn Store>) {
    let a = s.create("/c/a", b("1")).await.unwrap();
    let a2 = s.update("/c/a", b("2"), a.mod_revision).await.unwrap();
    let a3 = s.update("/c/a", b("3"), a2.mod_revision).await.unwrap();
    s.compact(a2.mod_revision).await.unwrap();
    assert_eq!(s.compacted_revision().await.unwrap(), a2.mod_revision);
    // compacting to an older point is a no-op
    s.compact(a.mod_revision).await.unwrap();
    assert_eq!(s.compacted_revision().await.unwrap(), a2.mod_revision);

    // reads at the compaction point still work; older ones say Compacted
    let r = s
        .range(RangeRequest {
            prefix: "/c/".into(),
            revision: Some(a2.mod_revision),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.kvs, vec![a2.clone()]);
    match s
        .range(RangeRequest {
            prefix: "/c/".into(),
            revision: Some(a.mod_revision),
            ..Default::default()
        })
        .await
    {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            assert_eq!(requested, a.mod_revision);
            assert_eq!(compacted, a2.mod_revision);
        }
        other => panic!("read before the compaction point: {other:?}"),
    }

    // watch from the compaction point replays; from before it fails with Compacted
    let mut w = s.watch("/c/", a2.mod_revision).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision(), a2.mod_revision);
    assert_eq!(next_event(&mut w).await.revision(), a3.mod_revision);
    match s.watch("/c/", a.mod_revision).await {
        Err(StoreError::Compacted { requested, .. }) => assert_eq!(requested, a.mod_revision),
        Ok(mut w) => match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Err(StoreError::Compacted { requested, .. }))) => {
                assert_eq!(requested, a.mod_revision)
            }
            other => panic!("watch before the compaction point: {other:?}"),
        },
        Err(e) => panic!("watch before the compaction point: {e}"),
    }

    let cur = s.current_revision().await.unwrap();
    match s.compact(cur + 10).await {
        Err(StoreError::FutureRevision { .. }) => {}
        other => panic!("compaction to a future revision: {other:?}"),
    }
}

/// A store built with a short compaction window compacts by itself.
pub async fn auto_compaction(s: Arc<dyn Store>, window: Duration) {
    let kv = s.create("/auto/a", b("1")).await.unwrap();
    let mut last = kv.clone();
    let deadline = tokio::time::Instant::now() + window * 10 + Duration::from_secs(5);
    loop {
        last = s
            .update("/auto/a", b("x"), last.mod_revision)
            .await
            .unwrap();
        if s.compacted_revision().await.unwrap() > kv.mod_revision {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history was not compacted automatically within {window:?} * 10"
        );
        tokio::time::sleep(window / 4).await;
    }
    assert!(matches!(
        s.range(RangeRequest {
            prefix: "/auto/".into(),
            revision: Some(kv.mod_revision),
            ..Default::default()
        })
        .await,
        Err(StoreError::Compacted { .. })
    ));
}

/// A watcher that does not read while many writes happen must still get every event.
pub async fn slow_watcher_loses_nothing(s: Arc<dyn Store>) {
    let mut w = s.watch("/slow/", 0).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..300 {
        let kv = s
            .create(&format!("/slow/{i:04}"), Bytes::from(vec![7u8; 512]))
            .await
            .unwrap();
        expected.push(kv.mod_revision);
    }
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(ev))) => seen.push(ev.revision()),
            // an explicit error is allowed (the watcher must restart); silent loss is not
            Ok(Some(Err(e))) => {
                eprintln!("slow watcher ended with an error (allowed): {e}");
                return;
            }
            other => panic!("slow watcher: {other:?}"),
        }
    }
    assert_eq!(seen, expected);
}

/// Concurrent CAS increments on one key: every success is a distinct revision, no lost update.
pub async fn concurrent_cas(s: Arc<dyn Store>) {
    s.create("/cas/n", b("0")).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut ok = 0;
                while ok < 10 {
                    let cur = s.get("/cas/n").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                    match s
                        .update("/cas/n", b(&(n + 1).to_string()), cur.mod_revision)
                        .await
                    {
                        Ok(_) => ok += 1,
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => panic!("update: {e}"),
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = s.get("/cas/n").await.unwrap().unwrap();
    assert_eq!(v.value, b("80"));
}

/// Replaying the whole history reproduces the current state.
pub async fn history_replays_to_current_state(s: Arc<dyn Store>) {
    let start = s.current_revision().await.unwrap() + 1;
    let mut last: BTreeMap<String, KeyValue> = BTreeMap::new();
    for i in 0..20 {
        let k = format!("/rep/{}", i % 7);
        match last.get(&k) {
            None => {
                let kv = s.create(&k, b(&i.to_string())).await.unwrap();
                last.insert(k, kv);
            }
            Some(prev) if i % 3 == 0 => {
                s.delete(&k, Some(prev.mod_revision)).await.unwrap();
                last.remove(&k);
            }
            Some(prev) => {
                let kv = s
                    .update(&k, b(&i.to_string()), prev.mod_revision)
                    .await
                    .unwrap();
                last.insert(k, kv);
            }
        }
    }
    let end: Revision = s.current_revision().await.unwrap();
    let mut w = s.watch("/rep/", start).await.unwrap();
    let mut state: BTreeMap<String, KeyValue> = BTreeMap::new();
    for _ in start..=end {
        match next_event(&mut w).await {
            Event::Put { kv, prev } => {
                assert_eq!(prev, state.get(&kv.key).cloned());
                state.insert(kv.key.clone(), kv);
            }
            Event::Delete { key, prev, .. } => {
                assert_eq!(Some(prev), state.remove(&key));
            }
        }
    }
    assert_eq!(state, last);
    let now = s.range(range("/rep/")).await.unwrap();
    assert_eq!(now.kvs, last.into_values().collect::<Vec<_>>());
}
