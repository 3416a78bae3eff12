//! Watches: a watch cache (one store watch per resource type, fanned out to every client watch
//! through a broadcast channel with a replay buffer) and the client watch stream, framed like
//! kube-apiserver (one `{"type":..,"object":..}` JSON document per line).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use skiff_api::resources::ResourceInfo;
use skiff_api::{ApiError, meta, table};
use skiff_store::{Event, KeyValue, Store, StoreError};
use tokio::sync::{broadcast, mpsc};

use crate::ApiState;
use crate::handlers::{ListOpts, Q, Target, decode, list_items, list_opts, list_prefix};
use crate::http_util::Output;

/// Events kept per resource type for watchers that start slightly in the past.
const REPLAY: usize = 1024;
/// Broadcast capacity; a watcher further behind than this is closed (it re-lists).
const CHANNEL: usize = 4096;

/// One change, decoded once and shared by every watcher.
#[derive(Debug)]
pub(crate) struct HubEvent {
    rev: i64,
    key: String,
    deleted: bool,
    /// The new object (or, for a delete, the last state with resourceVersion = delete revision).
    obj: Value,
    /// The previous state as stored, if any; decoded only when a watcher's selector needs it.
    prev_kv: Option<KeyValue>,
    /// The previous state, decoded once on first use.
    prev: std::sync::OnceLock<Option<Value>>,
    /// `obj` serialized once, on first use, for every plain-JSON watcher of this change.
    json: std::sync::OnceLock<Bytes>,
}

impl HubEvent {
    fn json(&self) -> &Bytes {
        self.json
            .get_or_init(|| Bytes::from(serde_json::to_vec(&self.obj).unwrap_or_default()))
    }

    /// The previous state (decoded on first use: watchers without selectors never need it).
    fn prev(&self) -> Option<&Value> {
        self.prev
            .get_or_init(|| self.prev_kv.as_ref().and_then(|p| decode(p).ok()))
            .as_ref()
    }
}

fn to_hub_event(e: &Event) -> Option<HubEvent> {
    match e {
        Event::Put { kv, prev } => Some(HubEvent {
            rev: kv.mod_revision,
            key: kv.key.clone(),
            deleted: false,
            obj: decode(kv).ok()?,
            prev_kv: prev.clone(),
            prev: std::sync::OnceLock::new(),
            json: std::sync::OnceLock::new(),
        }),
        Event::Delete {
            key,
            revision,
            prev,
        } => {
            let mut obj = decode(prev).ok()?;
            if let Some(m) = meta::metadata_mut(&mut obj) {
                m.insert("resourceVersion".into(), json!(revision.to_string()));
            }
            Some(HubEvent {
                rev: *revision,
                key: key.clone(),
                deleted: true,
                prev_kv: None,
                prev: std::sync::OnceLock::from(Some(obj.clone())),
                obj,
                json: std::sync::OnceLock::new(),
            })
        }
    }
}

struct FeedInner {
    buf: VecDeque<Arc<HubEvent>>,
    /// Every event with a revision above this is in `buf` or was broadcast after it.
    covered_from: i64,
    tx: Option<broadcast::Sender<Arc<HubEvent>>>,
}

struct Feed {
    inner: Mutex<FeedInner>,
}

/// The watch cache: one store watch per resource key prefix.
pub(crate) struct Hub {
    store: Arc<dyn Store>,
    feeds: Mutex<HashMap<String, Arc<Feed>>>,
}

type Subscription = (Vec<Arc<HubEvent>>, broadcast::Receiver<Arc<HubEvent>>);

impl Hub {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Hub {
            store,
            feeds: Mutex::new(HashMap::new()),
        }
    }

    async fn feed(&self, prefix: &str) -> Result<Arc<Feed>, StoreError> {
        if let Some(f) = self.feeds.lock().ok().and_then(|m| m.get(prefix).cloned()) {
            return Ok(f);
        }
        let r0 = self.store.current_revision().await?;
        let mut stream = self.store.watch(prefix, r0 + 1).await?;
        let (tx, _) = broadcast::channel(CHANNEL);
        let feed = Arc::new(Feed {
            inner: Mutex::new(FeedInner {
                buf: VecDeque::new(),
                covered_from: r0,
                tx: Some(tx),
            }),
        });
        {
            let Ok(mut feeds) = self.feeds.lock() else {
                return Err(StoreError::Backend("watch cache lock poisoned".into()));
            };
            if let Some(existing) = feeds.get(prefix) {
                return Ok(existing.clone());
            }
            feeds.insert(prefix.to_string(), feed.clone());
        }
        let f2 = feed.clone();
        let prefix_owned = prefix.to_string();
        let hub_feeds: Arc<Feed> = feed.clone();
        let _ = hub_feeds;
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) => {
                        let Some(he) = to_hub_event(&ev) else {
                            continue;
                        };
                        let he = Arc::new(he);
                        let Ok(mut inner) = f2.inner.lock() else {
                            break;
                        };
                        inner.buf.push_back(he.clone());
                        while inner.buf.len() > REPLAY {
                            if let Some(old) = inner.buf.pop_front() {
                                inner.covered_from = old.rev;
                            }
                        }
                        if let Some(tx) = &inner.tx {
                            let _ = tx.send(he);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(prefix = %prefix_owned, error = %e, "watch cache: store watch failed");
                        break;
                    }
                }
            }
            if let Ok(mut inner) = f2.inner.lock() {
                inner.tx = None;
                inner.covered_from = i64::MAX;
            }
        });
        Ok(feed)
    }

    /// Events after `from` (exclusive) and a receiver for the live ones, or None when the cache
    /// cannot serve `from` (the caller then watches the store directly).
    async fn subscribe(&self, prefix: &str, from: i64) -> Option<Subscription> {
        let feed = self.feed(prefix).await.ok()?;
        let inner = feed.inner.lock().ok()?;
        let Some(tx) = &inner.tx else {
            drop(inner);
            if let Ok(mut feeds) = self.feeds.lock()
                && feeds.get(prefix).is_some_and(|f| Arc::ptr_eq(f, &feed))
            {
                feeds.remove(prefix);
            }
            return None;
        };
        if from < inner.covered_from {
            return None;
        }
        let replay = inner.buf.iter().filter(|e| e.rev > from).cloned().collect();
        Some((replay, tx.subscribe()))
    }
}

fn line(typ: &str, obj: &Value) -> Bytes {
    line_raw(typ, &serde_json::to_vec(obj).unwrap_or_default())
}

/// One watch event line around an already serialized object (no copy of the object tree:
/// `json!` around a borrowed `Value` would clone it first).
fn line_raw(typ: &str, obj: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(obj.len() + typ.len() + 24);
    v.extend_from_slice(b"{\"type\":\"");
    v.extend_from_slice(typ.as_bytes());
    v.extend_from_slice(b"\",\"object\":");
    v.extend_from_slice(obj);
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

struct Shaper {
    r: &'static ResourceInfo,
    out: Output,
    include: String,
    first: bool,
}

impl Shaper {
    fn shape(&mut self, obj: &Value) -> Value {
        match self.out {
            Output::Json => obj.clone(),
            Output::Metadata => crate::handlers::partial(obj),
            Output::Table => {
                let now = time::OffsetDateTime::now_utc();
                let cols = if self.first {
                    table::column_definitions(self.r.group, self.r.kind)
                } else {
                    json!([])
                };
                self.first = false;
                json!({
                    "kind": "Table",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": {"resourceVersion": meta::resource_version(obj).unwrap_or("")},
                    "columnDefinitions": cols,
                    "rows": [table::row(self.r.group, self.r.kind, obj, &self.include, now)],
                })
            }
        }
    }
}

/// The type a client sees for a change, given its selectors (None = not visible).
fn classify(e: &HubEvent, opts: &ListOpts) -> Option<&'static str> {
    if opts.is_empty() {
        // Everything is visible: no need to look at the previous state.
        return Some(match e.deleted {
            true => "DELETED",
            false if e.prev_kv.is_some() => "MODIFIED",
            false => "ADDED",
        });
    }
    let now = !e.deleted && opts.matches(&e.obj);
    let before = e.prev().is_some_and(|p| opts.matches(p));
    match (e.deleted, before, now) {
        (true, true, _) => Some("DELETED"),
        (true, false, _) => None,
        (false, false, true) => Some("ADDED"),
        (false, true, true) => Some("MODIFIED"),
        (false, true, false) => Some("DELETED"),
        (false, false, false) => None,
    }
}

pub(crate) async fn serve_watch(
    st: Arc<ApiState>,
    t: &Target,
    q: &Q,
    out: Output,
) -> Result<Response, ApiError> {
    let opts = list_opts(t.r, q)?;
    let rv = q.get("resourceVersion").cloned().unwrap_or_default();
    let send_initial = q
        .get("sendInitialEvents")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let bookmarks = q
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(1800);
    let from: Option<i64> = if rv.is_empty() || rv == "0" || send_initial {
        None
    } else {
        Some(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        )
    };
    // Initial state, read before the response starts so errors are still plain Status replies.
    let mut initial = Vec::new();
    let start = match from {
        Some(n) => n,
        None => {
            let mut q2 = q.clone();
            for k in [
                "limit",
                "continue",
                "resourceVersion",
                "resourceVersionMatch",
            ] {
                q2.remove(k);
            }
            let t2 = Target {
                r: t.r,
                ns: t.ns.clone(),
                name: None,
                sub: None,
            };
            let (items, rev, _) = list_items(&st, &t2, &q2).await?;
            initial = items;
            rev
        }
    };
    let key_prefix = list_prefix(t);
    let resource_prefix = t.r.key_prefix();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut shaper = Shaper {
        r: t.r,
        out,
        include: q
            .get("includeObject")
            .cloned()
            .unwrap_or_else(|| "Metadata".into()),
        first: true,
    };
    let r = t.r;
    tokio::spawn(async move {
        for obj in &initial {
            if tx.send(line("ADDED", &shaper.shape(obj))).await.is_err() {
                return;
            }
        }
        if send_initial {
            let bm = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": start.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
            if tx.send(line("BOOKMARK", &bm)).await.is_err() {
                return;
            }
        }
        drop(initial);
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let every = if st.config.bookmark_interval.is_zero() {
            Duration::from_secs(10)
        } else {
            st.config.bookmark_interval
        };
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        let mut last_rev = start;
        // Source of events: the watch cache, or the store directly when the cache cannot serve.
        enum Source {
            Hub(
                std::vec::IntoIter<Arc<HubEvent>>,
                broadcast::Receiver<Arc<HubEvent>>,
            ),
            Direct(skiff_store::WatchStream),
        }
        let mut source = match st.hub.subscribe(&resource_prefix, start).await {
            Some((replay, rx)) => Source::Hub(replay.into_iter(), rx),
            None => match st.store.watch(&key_prefix, start + 1).await {
                Ok(s) => Source::Direct(s),
                Err(e) => {
                    let err = match e {
                        StoreError::Compacted {
                            requested,
                            compacted,
                        } => ApiError::expired(requested - 1, compacted),
                        e => crate::handlers::store_err(e),
                    };
                    let _ = tx.send(line("ERROR", &err.to_status())).await;
                    return;
                }
            },
        };
        loop {
            let next: Option<Arc<HubEvent>> = match &mut source {
                Source::Hub(replay, rx) => {
                    if let Some(e) = replay.next() {
                        Some(e)
                    } else {
                        tokio::select! {
                            _ = &mut deadline => return,
                            _ = ticker.tick() => {
                                if bookmarks {
                                    let bm = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": last_rev.to_string()}});
                                    if tx.send(line("BOOKMARK", &bm)).await.is_err() { return; }
                                }
                                continue;
                            }
                            _ = tx.closed() => return,
                            got = rx.recv() => match got {
                                Ok(e) => Some(e),
                                Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                            },
                        }
                    }
                }
                Source::Direct(stream) => {
                    tokio::select! {
                        _ = &mut deadline => return,
                        _ = ticker.tick() => {
                            if bookmarks {
                                let bm = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": last_rev.to_string()}});
                                if tx.send(line("BOOKMARK", &bm)).await.is_err() { return; }
                            }
                            continue;
                        }
                        _ = tx.closed() => return,
                        got = stream.next() => match got {
                            Some(Ok(ev)) => to_hub_event(&ev).map(Arc::new),
                            Some(Err(StoreError::Compacted { requested, compacted })) => {
                                let _ = tx.send(line("ERROR", &ApiError::expired(requested - 1, compacted).to_status())).await;
                                return;
                            }
                            Some(Err(_)) | None => return,
                        },
                    }
                }
            };
            let Some(e) = next else { continue };
            if e.rev <= start || !e.key.starts_with(&key_prefix) {
                continue;
            }
            last_rev = e.rev;
            if let Some(typ) = classify(&e, &opts) {
                let l = if matches!(shaper.out, Output::Json) {
                    line_raw(typ, e.json())
                } else {
                    line(typ, &shaper.shape(&e.obj))
                };
                if tx.send(l).await.is_err() {
                    return;
                }
            }
        }
    });
    let body =
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache, private"),
    );
    Ok(resp)
}

#[cfg(test)]
mod line_tests {
    use super::*;

    #[test]
    fn watch_lines_are_one_json_event_per_line() {
        let obj = json!({"kind": "Pod", "metadata": {"name": "a\"b", "resourceVersion": "7"}});
        let l = line("MODIFIED", &obj);
        assert_eq!(l.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&l[..l.len() - 1]).unwrap_or_default();
        assert_eq!(v, json!({"type": "MODIFIED", "object": obj}));
        let e = HubEvent {
            rev: 7,
            key: "k".into(),
            deleted: false,
            obj: obj.clone(),
            prev_kv: None,
            prev: std::sync::OnceLock::new(),
            json: std::sync::OnceLock::new(),
        };
        assert_eq!(line_raw("MODIFIED", e.json()), l);
    }
}
