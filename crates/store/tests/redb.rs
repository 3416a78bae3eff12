//! redb backend specifics: durability across reopen, and refusing files that are not (or no
//! longer) a usable skiff store with a `Corrupt` error that names the path — never a panic.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

use bytes::Bytes;
use futures::StreamExt;
use skiff_store::{RedbOptions, StoreError, open_redb};

async fn expect_corrupt(path: &Path, what: &str) -> String {
    match open_redb(path, RedbOptions::default()).await {
        Err(e @ StoreError::Corrupt { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
            assert!(
                msg.contains("restore a snapshot or move the file away"),
                "{what}: {msg}"
            );
            msg
        }
        Err(e) => panic!("{what}: expected Corrupt, got {e:?}"),
        Ok(_) => panic!("{what}: a bad file opened as a store"),
    }
}

async fn write_some(path: &Path, n: usize) {
    let s = open_redb(path, RedbOptions::default()).await.unwrap();
    for i in 0..n {
        s.create(&format!("/k/{i:04}"), Bytes::from(vec![b'x'; 700]))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn data_and_revision_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/state.redb");
    {
        let s = open_redb(&path, RedbOptions::default()).await.unwrap();
        let a = s.create("/a", Bytes::from_static(b"1")).await.unwrap();
        s.update("/a", Bytes::from_static(b"2"), a.mod_revision)
            .await
            .unwrap();
        s.create("/b", Bytes::from_static(b"3")).await.unwrap();
        s.delete("/b", None).await.unwrap();
        s.compact(2).await.unwrap();
    }
    let s = open_redb(&path, RedbOptions::default()).await.unwrap();
    assert_eq!(s.current_revision().await.unwrap(), 4);
    assert_eq!(s.compacted_revision().await.unwrap(), 2);
    let a = s.get("/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_ref(), a.create_revision, a.mod_revision),
        (&b"2"[..], 1, 2)
    );
    assert_eq!(s.get("/b").await.unwrap(), None);
    // history kept across the reopen
    let mut w = s.watch("/", 2).await.unwrap();
    let revs: Vec<_> = [
        w.next().await.unwrap().unwrap(),
        w.next().await.unwrap().unwrap(),
        w.next().await.unwrap().unwrap(),
    ]
    .iter()
    .map(|e| e.revision())
    .collect();
    assert_eq!(revs, vec![2, 3, 4]);
    // and the next write continues the revision
    assert_eq!(s.create("/c", Bytes::new()).await.unwrap().mod_revision, 5);
}

#[tokio::test]
async fn random_bytes_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let junk: Vec<u8> = (0..64 * 1024).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&path, junk).unwrap();
    expect_corrupt(&path, "random bytes").await;
}

#[tokio::test]
async fn text_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    std::fs::write(&path, "apiVersion: v1\nkind: Pod\n").unwrap();
    expect_corrupt(&path, "a text file").await;
}

#[tokio::test]
async fn truncated_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    write_some(&path, 200).await;
    let len = std::fs::metadata(&path).unwrap().len();
    for keep in [len / 2, 4096, 100] {
        let copy = dir.path().join(format!("trunc-{keep}.redb"));
        std::fs::copy(&path, &copy).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        f.set_len(keep).unwrap();
        drop(f);
        let msg = expect_corrupt(&copy, &format!("truncated to {keep} of {len} bytes")).await;
        eprintln!("{msg}");
    }
}

#[tokio::test]
async fn foreign_redb_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("users");
            let mut t = txn.open_table(def).unwrap();
            t.insert("alice", 1).unwrap();
        }
        txn.commit().unwrap();
    }
    let msg = expect_corrupt(&path, "a foreign redb file").await;
    assert!(msg.contains("not a skiff store"), "{msg}");
}

#[tokio::test]
async fn newer_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    write_some(&path, 3).await;
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<'_, &str, i64> =
                redb::TableDefinition::new("skiff_meta");
            let mut t = txn.open_table(def).unwrap();
            t.insert("format_version", skiff_store::FORMAT_VERSION + 1)
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let msg = expect_corrupt(&path, "a newer format").await;
    assert!(msg.contains("newer skiff"), "{msg}");
}

#[tokio::test]
async fn second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let _first = open_redb(&path, RedbOptions::default()).await.unwrap();
    match open_redb(&path, RedbOptions::default()).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("already open"), "{msg}"),
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("the same file opened twice"),
    }
}
