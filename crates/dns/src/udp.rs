//! The UDP side of the cluster DNS server: receive loops on one socket, and a cache of whole
//! response datagrams for cluster-zone answers.
//!
//! Why not hickory-server's UDP serving: it spawns a task and builds a full `Message` per
//! query. A cluster DNS server answers the same few names (a pod's search-path expansions of its
//! Services) over and over, so the answer to a given query datagram is kept as bytes, keyed by the
//! datagram minus its 2-byte ID, and valid until the zone is rebuilt. A hit costs a hash lookup,
//! a copy and an ID patch. Misses, and everything forwarded upstream (whose TTLs run down), take
//! the full path through [`Handler::resolve`]. TCP stays with hickory-server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use hickory_server::proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use tokio::net::UdpSocket;

use crate::Handler;
use crate::zone::Zone;

/// Most cached responses; the cache is emptied when it is full.
const MAX_ENTRIES: usize = 16_384;
/// Largest datagram read; longer queries are not DNS queries we answer.
const MAX_QUERY: usize = 4096;
/// Largest UDP answer without EDNS (RFC 1035).
const CLASSIC_UDP: usize = 512;

/// Response datagrams (ID bytes zeroed) by query datagram minus its ID, valid for `zone`.
struct Cache {
    zone: Arc<Zone>,
    answers: HashMap<Box<[u8]>, Arc<[u8]>>,
}

/// What the receive loops share.
pub(crate) struct UdpServer {
    handler: Arc<Handler>,
    zone: Arc<RwLock<Arc<Zone>>>,
    cache: RwLock<Cache>,
}

impl UdpServer {
    pub(crate) fn new(handler: Arc<Handler>, zone: Arc<RwLock<Arc<Zone>>>) -> UdpServer {
        let current = read_zone(&zone);
        UdpServer {
            handler,
            zone,
            cache: RwLock::new(Cache {
                zone: current,
                answers: HashMap::new(),
            }),
        }
    }

    /// The cached answer to `query` (a whole datagram), with the query's ID in it.
    fn cached(&self, query: &[u8]) -> Option<Vec<u8>> {
        let key = query.get(2..)?;
        // Never hold both locks: the zone's writer must not wait behind a cache writer.
        let zone = read_zone(&self.zone);
        let cache = self.cache.read().ok()?;
        if !Arc::ptr_eq(&cache.zone, &zone) {
            return None;
        }
        let hit = cache.answers.get(key)?;
        let mut out = hit.to_vec();
        out[..2].copy_from_slice(&query[..2]);
        Some(out)
    }

    fn remember(&self, query: &[u8], zone: Arc<Zone>, response: &[u8]) {
        let (Some(key), true) = (query.get(2..), response.len() >= 12) else {
            return;
        };
        if !Arc::ptr_eq(&read_zone(&self.zone), &zone) {
            // Answered from a zone that has since been replaced.
            return;
        }
        let Ok(mut cache) = self.cache.write() else {
            return;
        };
        if !Arc::ptr_eq(&cache.zone, &zone) {
            // The zone changed: everything cached was answered from an older one.
            cache.zone = zone;
            cache.answers.clear();
        }
        if cache.answers.len() >= MAX_ENTRIES {
            cache.answers.clear();
        }
        let mut stored = response.to_vec();
        stored[..2].fill(0);
        cache.answers.insert(key.into(), stored.into());
    }

    /// Answers one datagram the slow way; caches what came from the zone alone.
    async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let req = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "malformed dns query");
                return form_error(query);
            }
        };
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut md = Metadata::response_from_request(&req.metadata);
        md.recursion_available = true;
        let mut resp = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
        resp.queries = req.queries.clone();
        resp.edns = req.edns.clone();
        let zone = read_zone(&self.zone);
        let mut from_zone = false;
        match (req.queries.first(), req.metadata.op_code) {
            (Some(q), OpCode::Query) if req.queries.len() == 1 => {
                let r = self.handler.resolve(q).await;
                md.authoritative = r.authoritative;
                md.response_code = r.code;
                resp.answers = r.answers;
                resp.authorities = r.authorities;
                from_zone = r.from_zone;
            }
            (_, OpCode::Query) => md.response_code = ResponseCode::FormErr,
            _ => md.response_code = ResponseCode::NotImp,
        }
        resp.metadata = md;
        let limit = req.edns.as_ref().map_or(CLASSIC_UDP, |e| {
            usize::from(e.max_payload()).max(CLASSIC_UDP)
        });
        let mut bytes = resp.to_vec().ok()?;
        if bytes.len() > limit {
            // Too long for this client's datagrams: the header says so and it retries on TCP.
            resp.metadata.truncation = true;
            resp.answers.clear();
            resp.authorities.clear();
            resp.additionals.clear();
            bytes = resp.to_vec().ok()?;
        }
        if from_zone {
            self.remember(query, zone, &bytes);
        }
        Some(bytes)
    }
}

fn read_zone(zone: &RwLock<Arc<Zone>>) -> Arc<Zone> {
    match zone.read() {
        Ok(z) => z.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// FORMERR for a datagram that has at least a DNS header; nothing otherwise.
fn form_error(query: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    if query.len() < 12 {
        return None;
    }
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// Serves `sock` with `loops` receive loops until the task is aborted.
pub(crate) async fn serve(server: Arc<UdpServer>, sock: Arc<UdpSocket>, loops: usize) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..loops.max(1) {
        set.spawn(receive_loop(server.clone(), sock.clone()));
    }
    while set.join_next().await.is_some() {}
}

async fn receive_loop(server: Arc<UdpServer>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors of earlier sends surface here on some kernels: keep serving.
                tracing::debug!(error = %e, "dns udp receive");
                continue;
            }
        };
        let query = &buf[..n];
        if n < 12 {
            continue;
        }
        if let Some(out) = server.cached(query) {
            send(&sock, &out, peer).await;
            continue;
        }
        // Misses may wait on an upstream resolver: off the receive loop.
        let (server, sock, query) = (server.clone(), sock.clone(), query.to_vec());
        tokio::spawn(async move {
            if let Some(out) = server.answer(&query).await {
                send(&sock, &out, peer).await;
            }
        });
    }
}

async fn send(sock: &UdpSocket, out: &[u8], peer: SocketAddr) {
    if let Err(e) = sock.send_to(out, peer).await {
        tracing::debug!(%peer, error = %e, "dns udp send");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;
    use std::str::FromStr;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU16;
    use std::time::Duration;

    use hickory_server::proto::op::{Edns, Query};
    use hickory_server::proto::rr::{Name, RData, RecordType};
    use k8s_openapi::api::core::v1::Service;

    use super::*;
    use crate::Forwarder;

    fn zone(ip: &str) -> Arc<Zone> {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .unwrap();
        Arc::new(Zone::build("cluster.local", 5, &[svc], &[], &[]))
    }

    fn server(z: Arc<RwLock<Arc<Zone>>>) -> UdpServer {
        let handler = Arc::new(Handler {
            zone: z.clone(),
            fwd: Forwarder {
                upstreams: Vec::new(),
                timeout: Duration::from_millis(100),
                cache: Mutex::new(HashMap::new()),
                max: 10,
                next_id: AtomicU16::new(1),
            },
        });
        UdpServer::new(handler, z)
    }

    fn query(id: u16, name: &str, edns: bool) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn a_records(bytes: &[u8]) -> (u16, Vec<String>) {
        let m = Message::from_vec(bytes).unwrap();
        let ips = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        (m.metadata.id, ips)
    }

    #[tokio::test]
    async fn cached_answers_carry_the_query_id_and_end_with_the_zone() {
        let z = Arc::new(RwLock::new(zone("10.43.0.5")));
        let s = server(z.clone());
        let name = "web.default.svc.cluster.local.";
        let q1 = query(7, name, true);
        assert!(
            s.cached(&q1).is_none(),
            "nothing cached before the first answer"
        );
        let first = s.answer(&q1).await.unwrap();
        assert_eq!(a_records(&first), (7, vec!["10.43.0.5".to_string()]));
        let m = Message::from_vec(&first).unwrap();
        assert!(m.metadata.authoritative);
        assert!(m.edns.is_some(), "an EDNS query gets an EDNS answer");

        // The same question with another ID: answered from the cache, with that ID.
        let q2 = query(4242, name, true);
        let hit = s.cached(&q2).expect("second query is a cache hit");
        assert_eq!(a_records(&hit), (4242, vec!["10.43.0.5".to_string()]));
        // Without EDNS it is another datagram: not the same cache entry.
        assert!(s.cached(&query(9, name, false)).is_none());

        // The Service's address changes: the cached answer must not be served again.
        *z.write().unwrap() = zone("10.43.0.9");
        assert!(s.cached(&q2).is_none(), "a new zone empties the cache");
        let fresh = s.answer(&q2).await.unwrap();
        assert_eq!(a_records(&fresh), (4242, vec!["10.43.0.9".to_string()]));
        let again = s.cached(&query(5, name, true)).unwrap();
        assert_eq!(a_records(&again), (5, vec!["10.43.0.9".to_string()]));
    }

    #[tokio::test]
    async fn names_outside_the_zone_are_not_cached() {
        let z = Arc::new(RwLock::new(zone("10.43.0.5")));
        let s = server(z);
        let q = query(1, "example.test.", false);
        let out = s.answer(&q).await.unwrap();
        let m = Message::from_vec(&out).unwrap();
        // No upstream configured: SERVFAIL, and nothing remembered.
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(s.cached(&q).is_none());
    }

    #[tokio::test]
    async fn garbage_gets_formerr_or_nothing() {
        let z = Arc::new(RwLock::new(zone("10.43.0.5")));
        let s = server(z);
        let mut junk = vec![0u8; 14];
        junk[0] = 0x12;
        junk[1] = 0x34;
        junk[5] = 9; // claims 9 questions that are not there
        let out = s.answer(&junk).await.unwrap();
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(form_error(&[1, 2, 3]).is_none());
    }
}
