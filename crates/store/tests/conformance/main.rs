//! One conformance suite run against every store backend: the same case functions
//! (`cases.rs`) are instantiated per backend by the `conformance!` macro.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod backends;
mod cases;

use std::time::Duration;

const AUTO_WINDOW: Duration = Duration::from_millis(300);

macro_rules! conformance {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _guard) = crate::backends::$backend(None).await;
                    crate::cases::$case(store).await;
                }
            )*

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn auto_compaction() {
                let (store, _guard) = crate::backends::$backend(Some(crate::AUTO_WINDOW)).await;
                crate::cases::auto_compaction(store, crate::AUTO_WINDOW).await;
            }
        }
    };
}

macro_rules! all_cases {
    ($backend:ident) => {
        conformance!($backend:
            create_get,
            update_cas,
            delete_conditional,
            range_prefix_limit_continue,
            range_at_revision,
            watch_from_revision_then_live,
            watch_from_now,
            watch_no_gaps_under_concurrent_writes,
            compaction,
            slow_watcher_loses_nothing,
            concurrent_cas,
            history_replays_to_current_state,
        );
    };
}

all_cases!(memory);
all_cases!(redb);
all_cases!(etcd);
