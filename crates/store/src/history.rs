//! Logic shared by the local backends (memory, redb): reads at an older revision reconstructed
//! from the history log, and watch streams that catch up from history and then follow live
//! commits without gaps or duplicates (re-catching up from history when a watcher lags).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::broadcast;

use crate::{Event, KeyValue, RangeRequest, RangeResponse, Revision, StoreError, WatchStream};

/// What a commit publishes to live watchers: the events of one committed batch, in order.
pub(crate) type Batch = Arc<Vec<Event>>;

/// How many history events one catch-up read returns at most.
pub(crate) const CATCH_UP_CHUNK: usize = 1024;

/// The history log of a local backend, as a watch needs it.
#[async_trait::async_trait]
pub(crate) trait HistorySource: Send + Sync + 'static {
    /// Events with revision >= `from` for keys under `prefix`, at most `max`, in revision order,
    /// plus the revision up to which every matching event is included (the last returned event's
    /// revision when `max` were returned, else the revision the read was served at).
    /// `Compacted` when `from` is older than the history kept.
    async fn read_history(
        &self,
        prefix: &str,
        from: Revision,
        max: usize,
    ) -> Result<(Vec<Event>, Revision), StoreError>;
}

/// Checks a read revision against the store's window. Returns the revision to serve the read at
/// and whether that is the current state.
pub(crate) fn resolve_read_revision(
    requested: Option<Revision>,
    current: Revision,
    compacted: Revision,
) -> Result<Revision, StoreError> {
    match requested {
        None | Some(0) => Ok(current),
        Some(r) if r > current => Err(StoreError::FutureRevision {
            requested: r,
            current,
        }),
        Some(r) if r < compacted || r < 0 => Err(StoreError::Compacted {
            requested: r,
            compacted,
        }),
        Some(r) => Ok(r),
    }
}

/// True when `key` is inside the range a request asks for.
pub(crate) fn in_range(key: &str, prefix: &str, start_after: Option<&str>) -> bool {
    key.starts_with(prefix) && start_after.is_none_or(|s| key > s)
}

/// The values keys under the request's range had at `at`, for keys changed after `at`: built from
/// the history events with revision > `at`, in ascending revision order (the earliest change's
/// previous value is the value at `at`; `None` = the key did not exist then).
pub(crate) fn overrides_at<'a>(
    later_events: impl IntoIterator<Item = &'a Event>,
    prefix: &str,
    start_after: Option<&str>,
) -> BTreeMap<String, Option<KeyValue>> {
    let mut out = BTreeMap::new();
    for ev in later_events {
        if in_range(ev.key(), prefix, start_after) && !out.contains_key(ev.key()) {
            out.insert(ev.key().to_string(), ev.prev().cloned());
        }
    }
    out
}

/// Merges the current keys (ascending, already inside the request's range) with the overrides
/// from [`overrides_at`] into the state at the read revision, applying the limit.
pub(crate) fn merge_range<I>(
    current: I,
    mut overrides: BTreeMap<String, Option<KeyValue>>,
    req: &RangeRequest,
    revision: Revision,
) -> Result<RangeResponse, StoreError>
where
    I: Iterator<Item = Result<KeyValue, StoreError>>,
{
    let limit = req.limit.filter(|l| *l > 0);
    let mut kvs = Vec::new();
    let mut more = false;
    let mut push = |kv: KeyValue, kvs: &mut Vec<KeyValue>| -> bool {
        if limit.is_some_and(|l| kvs.len() >= l) {
            more = true;
            return false;
        }
        kvs.push(kv);
        true
    };
    let mut current = current.peekable();
    loop {
        // The next key in order comes either from the current table or from the overrides.
        let next_cur = match current.peek() {
            Some(Ok(kv)) => Some(kv.key.clone()),
            Some(Err(_)) => {
                if let Some(Err(e)) = current.next() {
                    return Err(e);
                }
                continue;
            }
            None => None,
        };
        let next_ovr = overrides.keys().next().cloned();
        let take_override = match (&next_cur, &next_ovr) {
            (None, None) => break,
            (None, Some(_)) => true,
            (Some(_), None) => false,
            (Some(c), Some(o)) => o <= c,
        };
        if take_override {
            let Some(key) = next_ovr else { break };
            if next_cur.as_deref() == Some(key.as_str()) {
                current.next(); // the current value is replaced by the value at the read revision
            }
            if let Some(Some(kv)) = overrides.remove(&key)
                && !push(kv, &mut kvs)
            {
                break;
            }
        } else if let Some(Ok(kv)) = current.next()
            && !push(kv, &mut kvs)
        {
            break;
        }
    }
    Ok(RangeResponse {
        kvs,
        more,
        revision,
    })
}

enum Mode {
    CatchUp,
    Live,
    Done,
}

struct WatchState {
    src: Arc<dyn HistorySource>,
    rx: broadcast::Receiver<Batch>,
    prefix: String,
    /// The next revision this watch has not yet delivered (or decided to skip).
    next: Revision,
    mode: Mode,
    pending: VecDeque<Event>,
}

/// A watch over a local backend. `rx` must have been subscribed BEFORE the caller read the
/// current revision / compaction point, so that nothing committed after that is missed.
/// With `catch_up`, history from `next` is replayed first; otherwise only live events with
/// revision >= `next` are delivered.
pub(crate) fn local_watch(
    src: Arc<dyn HistorySource>,
    rx: broadcast::Receiver<Batch>,
    prefix: &str,
    next: Revision,
    catch_up: bool,
) -> WatchStream {
    let state = WatchState {
        src,
        rx,
        prefix: prefix.to_string(),
        next,
        mode: if catch_up { Mode::CatchUp } else { Mode::Live },
        pending: VecDeque::new(),
    };
    futures::stream::unfold(state, step).boxed()
}

async fn step(mut st: WatchState) -> Option<(Result<Event, StoreError>, WatchState)> {
    loop {
        if let Some(ev) = st.pending.pop_front() {
            return Some((Ok(ev), st));
        }
        match st.mode {
            Mode::Done => return None,
            Mode::CatchUp => match st
                .src
                .read_history(&st.prefix, st.next, CATCH_UP_CHUNK)
                .await
            {
                Ok((events, covered)) => {
                    if events.len() < CATCH_UP_CHUNK {
                        st.mode = Mode::Live;
                    }
                    st.next = st.next.max(covered + 1);
                    st.pending.extend(events);
                }
                Err(e) => {
                    st.mode = Mode::Done;
                    return Some((Err(e), st));
                }
            },
            Mode::Live => match st.rx.recv().await {
                Ok(batch) => {
                    for ev in batch.iter() {
                        let rev = ev.revision();
                        if rev >= st.next {
                            if ev.key().starts_with(&st.prefix) {
                                st.pending.push_back(ev.clone());
                            }
                            st.next = rev + 1;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // The live buffer overflowed: never skip, re-read what was missed from history.
                    tracing::debug!(
                        missed,
                        next = st.next,
                        "watch lagged; catching up from history"
                    );
                    st.mode = Mode::CatchUp;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn kv(key: &str, v: &str, c: Revision, m: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Bytes::from(v.to_string()),
            create_revision: c,
            mod_revision: m,
        }
    }

    #[test]
    fn read_revision_bounds() {
        assert_eq!(resolve_read_revision(None, 10, 3).unwrap(), 10);
        assert_eq!(resolve_read_revision(Some(0), 10, 3).unwrap(), 10);
        assert_eq!(resolve_read_revision(Some(3), 10, 3).unwrap(), 3);
        assert!(matches!(
            resolve_read_revision(Some(2), 10, 3),
            Err(StoreError::Compacted {
                requested: 2,
                compacted: 3
            })
        ));
        assert!(matches!(
            resolve_read_revision(Some(11), 10, 3),
            Err(StoreError::FutureRevision {
                requested: 11,
                current: 10
            })
        ));
    }

    #[test]
    fn range_at_old_revision_undoes_later_changes() {
        // history: 1 put a, 2 put b, 3 update a, 4 delete b, 5 put c
        let a1 = kv("/a", "1", 1, 1);
        let b2 = kv("/b", "1", 2, 2);
        let a3 = kv("/a", "2", 1, 3);
        let c5 = kv("/c", "1", 5, 5);
        let later = [
            Event::Put {
                kv: a3.clone(),
                prev: Some(a1.clone()),
            },
            Event::Delete {
                key: "/b".into(),
                revision: 4,
                prev: b2.clone(),
            },
            Event::Put {
                kv: c5.clone(),
                prev: None,
            },
        ];
        let current = vec![a3.clone(), c5.clone()];
        let req = RangeRequest {
            prefix: "/".into(),
            ..Default::default()
        };
        let ov = overrides_at(later.iter(), "/", None);
        let r = merge_range(current.clone().into_iter().map(Ok), ov, &req, 2).unwrap();
        assert_eq!(r.kvs, vec![a1.clone(), b2.clone()]);
        assert!(!r.more);

        // with a limit and a continue key
        let req = RangeRequest {
            prefix: "/".into(),
            limit: Some(1),
            start_after: Some("/a".into()),
            revision: Some(2),
        };
        let ov = overrides_at(later.iter(), "/", Some("/a"));
        let cur = current
            .into_iter()
            .filter(|k| k.key.as_str() > "/a")
            .map(Ok);
        let r = merge_range(cur, ov, &req, 2).unwrap();
        assert_eq!(r.kvs, vec![b2]);
        assert!(!r.more, "c did not exist at revision 2");
    }

    #[test]
    fn limit_sets_more_only_when_keys_remain() {
        let cur: Vec<KeyValue> = (0..3).map(|i| kv(&format!("/k{i}"), "v", 1, 1)).collect();
        let mk = |limit| RangeRequest {
            prefix: "/".into(),
            limit: Some(limit),
            ..Default::default()
        };
        let r = merge_range(cur.clone().into_iter().map(Ok), BTreeMap::new(), &mk(3), 1).unwrap();
        assert_eq!((r.kvs.len(), r.more), (3, false));
        let r = merge_range(cur.clone().into_iter().map(Ok), BTreeMap::new(), &mk(2), 1).unwrap();
        assert_eq!((r.kvs.len(), r.more), (2, true));
        let r = merge_range(cur.into_iter().map(Ok), BTreeMap::new(), &mk(0), 1).unwrap();
        assert_eq!((r.kvs.len(), r.more), (3, false));
    }

    #[test]
    fn in_range_respects_continue_key() {
        assert!(in_range("/a/b", "/a/", None));
        assert!(!in_range("/b", "/a/", None));
        assert!(!in_range("/a/b", "/a/", Some("/a/b")));
        assert!(in_range("/a/c", "/a/", Some("/a/b")));
    }
}
