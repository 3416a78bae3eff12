//! Crash-test helper: opens a redb store and writes as fast as it can from several concurrent
//! writers, printing every ACKNOWLEDGED write as `ACK <key> <mod_revision> <value>` on stdout.
//! The crash test kills it with SIGKILL mid-load and checks the store afterwards.
//!
//! Usage: `skiff-store-crash-writer <store-file> <run-id> <writers>`

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use skiff_store::{RedbOptions, open_redb};

/// Keys per writer: writers cycle over them, so most writes are CAS updates.
const KEYS_PER_WRITER: u64 = 16;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(run), Some(writers)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: skiff-store-crash-writer <store-file> <run-id> <writers>");
        return ExitCode::from(2);
    };
    let Ok(writers) = writers.parse::<u64>() else {
        eprintln!("writers must be a number, got {writers}");
        return ExitCode::from(2);
    };
    let opts = RedbOptions {
        compaction_window: None,
        ..Default::default()
    };
    let store = match open_redb(&PathBuf::from(path), opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open: {e}");
            return ExitCode::from(1);
        }
    };
    println!("READY");
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let run = run.clone();
            tokio::spawn(async move {
                let mut last: HashMap<String, i64> = HashMap::new();
                for seq in 0u64.. {
                    let key = format!("/crash/{run}/{w}/{}", seq % KEYS_PER_WRITER);
                    // a value that names the write, padded so pages fill up
                    let value = format!("{run}.{w}.{seq}.{}", "x".repeat((seq % 7 * 100) as usize));
                    let res = match last.get(&key) {
                        None => store.create(&key, Bytes::from(value.clone())).await,
                        Some(rev) => store.update(&key, Bytes::from(value.clone()), *rev).await,
                    };
                    match res {
                        Ok(kv) => {
                            last.insert(key.clone(), kv.mod_revision);
                            let mut out = std::io::stdout().lock();
                            // one write(2) per line: a line is either complete or missing
                            let line = format!("ACK {key} {} {value}\n", kv.mod_revision);
                            if out
                                .write_all(line.as_bytes())
                                .and_then(|()| out.flush())
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            eprintln!("write {key}: {e}");
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    ExitCode::from(1)
}
