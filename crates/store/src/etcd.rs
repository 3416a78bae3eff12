//! The etcd backend (`--datastore-endpoint`): revisions are etcd's own; compare-and-swap is an
//! etcd txn on mod_revision; watches are etcd watches with prev_kv from a start revision.
//! Works with etcd 3.4 and later (no RangeStream).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;

use crate::{
    DEFAULT_COMPACTION_WINDOW, Event, KeyValue, RangeRequest, RangeResponse, Revision, Store,
    StoreError, WatchStream, check_key, compactor, prefix_end,
};

/// TLS material for talking to etcd (PEM files).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificate.
    pub ca_file: PathBuf,
    /// Client certificate (for etcd's `--client-cert-auth`), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client private key, with `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// Options of the etcd store.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// TLS (needs `https://` endpoints); `None` for plain `http://`.
    pub tls: Option<EtcdTls>,
    /// How long to wait for etcd to answer at connect time.
    pub connect_timeout: Duration,
    /// History older than this is compacted automatically (etcd compact); `None` leaves it to
    /// someone else (another server, etcd's own `--auto-compaction-*`).
    pub compaction_window: Option<Duration>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            tls: None,
            connect_timeout: Duration::from_secs(10),
            compaction_window: Some(DEFAULT_COMPACTION_WINDOW),
        }
    }
}

/// The etcd store. Connect with [`connect_etcd`].
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    /// The highest compaction point seen (a lower bound for the next search).
    compacted_hint: AtomicI64,
}

const COMPACTED_MSG: &str = "required revision has been compacted";
const FUTURE_MSG: &str = "required revision is a future revision";

fn is_status(e: &etcd_client::Error, needle: &str) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains(needle))
}

fn map_err(endpoints: &[String], e: etcd_client::Error) -> StoreError {
    match &e {
        etcd_client::Error::GRpcStatus(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) =>
        {
            StoreError::Unavailable(format!("etcd at {endpoints:?}: {}", s.message()))
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            StoreError::Unavailable(format!("etcd at {endpoints:?}: {e}"))
        }
        _ => StoreError::Backend(format!("etcd at {endpoints:?}: {e}")),
    }
}

fn to_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv
        .key_str()
        .map_err(|e| StoreError::Backend(format!("etcd returned a key that is not UTF-8: {e}")))?;
    Ok(KeyValue {
        key: key.to_string(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

/// Connects to etcd and checks that it answers.
pub async fn connect_etcd(
    endpoints: &[String],
    opts: EtcdOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(EtcdStore::connect(endpoints, opts).await?)
}

impl EtcdStore {
    /// Like [`connect_etcd`], returning the concrete type.
    pub async fn connect(
        endpoints: &[String],
        opts: EtcdOptions,
    ) -> Result<Arc<EtcdStore>, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid(
                "no etcd endpoints given: pass at least one http(s)://host:port".into(),
            ));
        }
        let mut copts = ConnectOptions::new().with_connect_timeout(opts.connect_timeout);
        if let Some(tls) = &opts.tls {
            copts = copts.with_tls(tls_options(tls)?);
        }
        let unreachable = |e: String| {
            StoreError::Unavailable(format!(
                "etcd at {endpoints:?} is not reachable: {e}; check the datastore endpoint and that etcd runs"
            ))
        };
        let client = tokio::time::timeout(
            opts.connect_timeout,
            Client::connect(endpoints, Some(copts)),
        )
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        let store = Arc::new(EtcdStore {
            client,
            endpoints: endpoints.to_vec(),
            compacted_hint: AtomicI64::new(0),
        });
        tokio::time::timeout(opts.connect_timeout, store.current_revision())
            .await
            .map_err(|_| unreachable("no answer".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        if let Some(window) = opts.compaction_window {
            let as_dyn: Arc<dyn Store> = store.clone();
            compactor::spawn(&as_dyn, window);
        }
        Ok(store)
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        map_err(&self.endpoints, e)
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))
    }

    /// Maps an error of a read at revision `r` to Compacted / FutureRevision where it is one.
    async fn revision_err(&self, r: Revision, e: etcd_client::Error) -> StoreError {
        if is_status(&e, COMPACTED_MSG) {
            let compacted = self.compacted_revision().await.unwrap_or(r + 1);
            return StoreError::Compacted {
                requested: r,
                compacted,
            };
        }
        if is_status(&e, FUTURE_MSG) {
            let current = self.current_revision().await.unwrap_or(0);
            return StoreError::FutureRevision {
                requested: r,
                current,
            };
        }
        self.err(e)
    }

    /// Whether a read at revision `r` is still possible (not compacted).
    async fn readable_at(&self, r: Revision) -> Result<bool, StoreError> {
        let res = self
            .client
            .kv_client()
            .get(
                "\0",
                Some(GetOptions::new().with_revision(r).with_count_only()),
            )
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, COMPACTED_MSG) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    fn conflict_from(
        &self,
        key: &str,
        resp: &etcd_client::TxnResponse,
    ) -> Result<StoreError, StoreError> {
        let current = match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(to_kv).transpose()?,
            _ => None,
        };
        Ok(match current {
            None => StoreError::NotFound {
                key: key.to_string(),
            },
            Some(kv) => StoreError::Conflict {
                key: key.to_string(),
                current: Some(kv),
            },
        })
    }
}

pub(crate) fn tls_options(tls: &EtcdTls) -> Result<etcd_client::TlsOptions, StoreError> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| {
            StoreError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot read etcd {what} {}: {e}", p.display()),
            ))
        })
    };
    let mut t = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(
        read(&tls.ca_file, "CA")?,
    ));
    match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => {
            t = t.identity(etcd_client::Identity::from_pem(
                read(c, "client certificate")?,
                read(k, "client key")?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Invalid(
                "etcd client TLS needs both a certificate and a key file".into(),
            ));
        }
    }
    Ok(t)
}

/// The etcd key range for a request: (start key, range end).
fn key_range(prefix: &str, start_after: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let mut start = match start_after {
        Some(s) if s >= prefix => {
            let mut k = s.as_bytes().to_vec();
            k.push(0);
            k
        }
        _ => prefix.as_bytes().to_vec(),
    };
    if start.is_empty() {
        start = vec![0];
    }
    // "\0" as range end means "every key from start on".
    let end = prefix_end(prefix.as_bytes()).unwrap_or_else(|| vec![0]);
    (start, end)
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs().first().map(to_kv).transpose()
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        let (start, end) = key_range(&req.prefix, req.start_after.as_deref());
        let mut opts = GetOptions::new().with_range(end);
        if let Some(limit) = req.limit.filter(|l| *l > 0) {
            opts = opts.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let at = req.revision.filter(|r| *r > 0);
        if let Some(r) = at {
            opts = opts.with_revision(r);
        }
        let resp = match self.client.kv_client().get(start, Some(opts)).await {
            Ok(r) => r,
            Err(e) => {
                return Err(match at {
                    Some(r) => self.revision_err(r, e).await,
                    None => self.err(e),
                });
            }
        };
        let revision = at.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision()));
        let kvs = resp
            .kvs()
            .iter()
            .map(to_kv)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RangeResponse {
            kvs,
            more: resp.more(),
            revision,
        })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.to_vec(), None)]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists {
                key: key.to_string(),
            });
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision: rev,
            mod_revision: rev,
        })
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_mod_revision: Revision,
    ) -> Result<KeyValue, StoreError> {
        let txn = Txn::new()
            .when([
                Compare::create_revision(key, CompareOp::Greater, 0),
                Compare::mod_revision(key, CompareOp::Equal, expected_mod_revision),
            ])
            .and_then([TxnOp::put(
                key,
                value.to_vec(),
                Some(PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(self.conflict_from(key, &resp)?);
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        let create_revision = match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Put(p)) => p.prev_key().map(|kv| kv.create_revision()),
            _ => None,
        }
        .ok_or_else(|| StoreError::Backend("etcd did not return the previous value".into()))?;
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision: rev,
        })
    }

    async fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<Revision>,
    ) -> Result<(Revision, KeyValue), StoreError> {
        let del = TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()));
        let txn = match expected_mod_revision {
            Some(rev) => Txn::new()
                .when([
                    Compare::create_revision(key, CompareOp::Greater, 0),
                    Compare::mod_revision(key, CompareOp::Equal, rev),
                ])
                .and_then([del])
                .or_else([TxnOp::get(key, None)]),
            None => Txn::new().and_then([del]),
        };
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(self.conflict_from(key, &resp)?);
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        let prev = match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Delete(d)) => d.prev_kvs().first().map(to_kv).transpose()?,
            _ => None,
        };
        match prev {
            Some(prev) => Ok((rev, prev)),
            None => Err(StoreError::NotFound {
                key: key.to_string(),
            }),
        }
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        let (key, end) = key_range(prefix, None);
        let mut opts = WatchOptions::new().with_range(end).with_prev_key();
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let stream = self
            .client
            .watch_client()
            .watch(key, Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        let state = EtcdWatch {
            stream,
            pending: std::collections::VecDeque::new(),
            done: false,
            from: from_revision,
            endpoints: self.endpoints.clone(),
        };
        Ok(futures::stream::unfold(state, etcd_watch_step).boxed())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        match self.client.kv_client().compact(revision, None).await {
            Ok(_) => {
                self.compacted_hint.fetch_max(revision, Ordering::Relaxed);
                Ok(())
            }
            // compacting to an already compacted point is a no-op, as in the other backends
            Err(e) if is_status(&e, COMPACTED_MSG) => Ok(()),
            Err(e) if is_status(&e, FUTURE_MSG) => Err(StoreError::FutureRevision {
                requested: revision,
                current: self.current_revision().await?,
            }),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        // etcd 3.4 does not report its compaction point directly: find the oldest readable
        // revision by binary search (reads at it succeed, reads below fail with "compacted").
        let current = self.current_revision().await?;
        let mut lo = self.compacted_hint.load(Ordering::Relaxed).max(1);
        let mut hi = current.max(lo);
        if self.readable_at(lo).await? {
            return Ok(if lo <= 1 { 0 } else { lo });
        }
        // invariant: lo not readable, hi readable
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.readable_at(mid).await? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        self.compacted_hint.fetch_max(hi, Ordering::Relaxed);
        Ok(hi)
    }
}

struct EtcdWatch {
    stream: etcd_client::WatchStream,
    pending: std::collections::VecDeque<Result<Event, StoreError>>,
    done: bool,
    from: Revision,
    endpoints: Vec<String>,
}

fn convert_event(ev: &etcd_client::Event) -> Result<Event, StoreError> {
    let kv = ev
        .kv()
        .ok_or_else(|| StoreError::Backend("etcd watch event without a key".into()))?;
    let prev = ev.prev_kv().map(to_kv).transpose()?;
    match ev.event_type() {
        EventType::Put => Ok(Event::Put {
            kv: to_kv(kv)?,
            prev,
        }),
        EventType::Delete => {
            let key = to_kv(kv)?.key;
            let prev = prev.ok_or_else(|| {
                StoreError::Backend(format!(
                    "etcd delete event for {key} without the previous value (compacted?)"
                ))
            })?;
            Ok(Event::Delete {
                key,
                revision: kv.mod_revision(),
                prev,
            })
        }
    }
}

async fn etcd_watch_step(mut st: EtcdWatch) -> Option<(Result<Event, StoreError>, EtcdWatch)> {
    loop {
        if let Some(item) = st.pending.pop_front() {
            if item.is_err() {
                st.done = true;
                st.pending.clear();
            }
            return Some((item, st));
        }
        if st.done {
            return None;
        }
        match st.stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    st.done = true;
                    let err = if resp.compact_revision() > 0 {
                        StoreError::Compacted {
                            requested: st.from,
                            compacted: resp.compact_revision(),
                        }
                    } else {
                        StoreError::Unavailable(format!(
                            "etcd at {:?} cancelled the watch: {}",
                            st.endpoints,
                            resp.cancel_reason()
                        ))
                    };
                    return Some((Err(err), st));
                }
                for ev in resp.events() {
                    st.pending.push_back(convert_event(ev));
                }
            }
            Ok(None) => return None,
            Err(e) => {
                st.done = true;
                return Some((Err(map_err(&st.endpoints, e)), st));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ranges() {
        assert_eq!(key_range("/a/", None), (b"/a/".to_vec(), b"/a0".to_vec()));
        assert_eq!(
            key_range("/a/", Some("/a/x")),
            (b"/a/x\0".to_vec(), b"/a0".to_vec())
        );
        // a continue key before the prefix does not widen the range
        assert_eq!(
            key_range("/a/", Some("/0")),
            (b"/a/".to_vec(), b"/a0".to_vec())
        );
        assert_eq!(key_range("", None), (vec![0], vec![0]));
    }
}
