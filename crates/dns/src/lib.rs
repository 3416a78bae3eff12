//! Cluster DNS (hickory-server): authoritative for the cluster domain from its own watch of
//! Services, EndpointSlices and Pods (see [`zone`]); every other name is forwarded to upstream
//! resolvers (from a resolv.conf, or given) with a small cache. Entry point: [`run`].

mod udp;
pub mod zone;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_server::proto::rr::{RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};

use zone::{Answer, Zone};

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A socket could not be bound.
    #[error("cluster dns: bind {addr}: {source} (is another DNS server listening there?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The upstream resolver file could not be read.
    #[error("cluster dns: read upstream resolvers from {path}: {source}")]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// How the DNS server runs.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP listen address (the node's bridge gateway `:53` in production).
    pub listen: SocketAddr,
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// TTL of cluster records, seconds (5, as CoreDNS's kubernetes plugin).
    pub ttl: u32,
    /// Upstream resolvers; when empty they are read from `resolv_conf`.
    pub upstreams: Vec<SocketAddr>,
    /// resolv.conf to read `nameserver` lines from (`/etc/resolv.conf`, or `--resolv-conf`);
    /// None and no `upstreams`: names outside the cluster get SERVFAIL.
    pub resolv_conf: Option<PathBuf>,
    /// Timeout of one upstream query.
    pub upstream_timeout: Duration,
    /// Most forwarded answers kept in the cache.
    pub cache_entries: usize,
    /// Wait this long after a change before rebuilding the zone.
    pub debounce: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 53)),
            domain: "cluster.local".into(),
            ttl: 5,
            upstreams: Vec::new(),
            resolv_conf: Some(PathBuf::from("/etc/resolv.conf")),
            upstream_timeout: Duration::from_secs(2),
            cache_entries: 10_000,
            debounce: Duration::from_millis(50),
        }
    }
}

/// `nameserver` addresses (port 53) of a resolv.conf file.
pub fn read_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, DnsError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_resolv_conf(&text))
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("nameserver"))
                .then(|| it.next())
                .flatten()
                .and_then(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

type CacheKey = (String, RecordType);

struct Cached {
    expires: Instant,
    code: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
}

struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    max: usize,
    next_id: AtomicU16,
}

impl Forwarder {
    async fn resolve(&self, query: &Query) -> Option<(ResponseCode, Vec<Record>, Vec<Record>)> {
        let key = (
            query.name().to_ascii().to_ascii_lowercase(),
            query.query_type(),
        );
        if let Ok(cache) = self.cache.lock()
            && let Some(c) = cache.get(&key)
            && c.expires > Instant::now()
        {
            return Some((c.code, c.answers.clone(), c.authorities.clone()));
        }
        let mut msg = Message::new(
            self.next_id.fetch_add(1, Ordering::Relaxed),
            MessageType::Query,
            OpCode::Query,
        );
        msg.metadata.recursion_desired = true;
        msg.add_query(query.clone());
        let bytes = msg.to_vec().ok()?;
        for up in &self.upstreams {
            let bind: SocketAddr = if up.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
                continue;
            };
            // Connected: the kernel drops datagrams from other sources, and an ICMP port
            // unreachable (nothing listening upstream) fails the receive at once instead of
            // after the timeout.
            if sock.connect(up).await.is_err() || sock.send(&bytes).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 4096];
            let reply = tokio::time::timeout(self.timeout, async {
                loop {
                    let n = match sock.recv(&mut buf).await {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::debug!(upstream = %up, error = %e, "upstream unreachable");
                            return None;
                        }
                    };
                    if let Ok(m) = Message::from_vec(&buf[..n])
                        && m.metadata.id == msg.metadata.id
                    {
                        return Some(m);
                    }
                }
            })
            .await;
            let Ok(Some(m)) = reply else {
                tracing::debug!(upstream = %up, name = %query.name(), "upstream did not answer");
                continue;
            };
            let code = m.metadata.response_code;
            let ttl = m
                .answers
                .iter()
                .chain(m.authorities.iter())
                .map(|r| r.ttl)
                .min()
                .unwrap_or(5)
                .min(300);
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() >= self.max {
                    let now = Instant::now();
                    cache.retain(|_, c| c.expires > now);
                    if cache.len() >= self.max {
                        cache.clear();
                    }
                }
                cache.insert(
                    key,
                    Cached {
                        expires: Instant::now() + Duration::from_secs(u64::from(ttl)),
                        code,
                        answers: m.answers.clone(),
                        authorities: m.authorities.clone(),
                    },
                );
            }
            return Some((code, m.answers, m.authorities));
        }
        None
    }
}

/// The request handler: cluster zone first, then the forwarder.
pub struct Handler {
    zone: Arc<RwLock<Arc<Zone>>>,
    fwd: Forwarder,
}

/// The answer to one question.
pub(crate) struct Resolved {
    pub(crate) authoritative: bool,
    pub(crate) code: ResponseCode,
    pub(crate) answers: Vec<Record>,
    pub(crate) authorities: Vec<Record>,
    /// Whether it comes from the cluster zone alone (nothing forwarded), so that the same
    /// question gets the same bytes back for as long as the zone is unchanged.
    pub(crate) from_zone: bool,
}

impl Handler {
    fn zone(&self) -> Arc<Zone> {
        match self.zone.read() {
            Ok(z) => z.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Answers `q`: from the cluster zone, else from upstream resolvers.
    pub(crate) async fn resolve(&self, q: &Query) -> Resolved {
        let name = q.name().to_string().to_ascii_lowercase();
        let name = if name.ends_with('.') {
            name
        } else {
            format!("{name}.")
        };
        let zone = self.zone();
        let soa = || zone.soa().cloned().into_iter().collect::<Vec<_>>();
        let ours = |code, answers, authorities| Resolved {
            authoritative: true,
            code,
            answers,
            authorities,
            from_zone: true,
        };
        match zone.lookup(&name, q.query_type()) {
            Answer::Records(r) => ours(ResponseCode::NoError, r, Vec::new()),
            Answer::Alias(c) => {
                let target = match &c.data {
                    RData::CNAME(c) => Some(c.0.clone()),
                    _ => None,
                };
                let mut r = ours(ResponseCode::NoError, vec![*c], Vec::new());
                // Chase an outside target so stub resolvers get addresses in one answer.
                if let Some(t) = target
                    && !zone.is_ours(&t.to_ascii().to_ascii_lowercase())
                    && q.query_type() != RecordType::CNAME
                {
                    r.from_zone = false;
                    if let Some((_, a, _)) =
                        self.fwd.resolve(&Query::query(t, q.query_type())).await
                    {
                        r.answers.extend(a);
                    }
                }
                r
            }
            Answer::NoData => ours(ResponseCode::NoError, Vec::new(), soa()),
            Answer::NxDomain => ours(ResponseCode::NXDomain, Vec::new(), soa()),
            Answer::NotOurs => {
                let (code, answers, authorities) = self.fwd.resolve(q).await.unwrap_or((
                    ResponseCode::ServFail,
                    Vec::new(),
                    Vec::new(),
                ));
                Resolved {
                    authoritative: false,
                    code,
                    answers,
                    authorities,
                    from_zone: false,
                }
            }
        }
    }
}

/// The handler as hickory-server's TCP serving holds it (shared with the UDP loops).
pub struct SharedHandler(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for SharedHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut md = Metadata::response_from_request(&request.metadata);
        md.recursion_available = true;
        let fail = |md: Metadata| {
            ResponseInfo::from(Header {
                metadata: md,
                counts: Default::default(),
            })
        };
        let Some(q) = request.queries.queries().first() else {
            md.response_code = ResponseCode::FormErr;
            let resp = MessageResponseBuilder::from_message_request(request).build_no_records(md);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or_else(|_| fail(md));
        };
        if request.metadata.op_code != OpCode::Query {
            md.response_code = ResponseCode::NotImp;
            let resp = MessageResponseBuilder::from_message_request(request).build_no_records(md);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or_else(|_| fail(md));
        }
        let r = self.0.resolve(q.original()).await;
        md.authoritative = r.authoritative;
        md.response_code = r.code;
        let (answers, authorities) = (r.answers, r.authorities);
        let resp = MessageResponseBuilder::from_message_request(request).build(
            md,
            answers.iter(),
            authorities.iter(),
            std::iter::empty(),
            std::iter::empty(),
        );
        match response_handle.send_response(resp).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns response not sent");
                fail(md)
            }
        }
    }
}

/// What [`serve`] started: hickory-server on TCP, skiff's own loops on UDP.
struct Serving {
    tcp: hickory_server::Server<SharedHandler>,
    udp: tokio::task::JoinHandle<()>,
}

impl Serving {
    async fn shutdown(mut self) {
        self.udp.abort();
        let _ = self.tcp.shutdown_gracefully().await;
    }
}

/// Binds UDP and TCP on `cfg.listen` and serves `zone` (kept current by the caller).
async fn serve(cfg: &DnsConfig, zone: Arc<RwLock<Arc<Zone>>>) -> Result<Serving, DnsError> {
    let upstreams = if !cfg.upstreams.is_empty() {
        cfg.upstreams.clone()
    } else if let Some(p) = &cfg.resolv_conf {
        read_resolv_conf(p)?
    } else {
        Vec::new()
    };
    tracing::info!(listen = %cfg.listen, upstreams = ?upstreams, "cluster dns starting");
    let handler = Arc::new(Handler {
        zone: zone.clone(),
        fwd: Forwarder {
            upstreams,
            timeout: cfg.upstream_timeout,
            cache: Mutex::new(HashMap::new()),
            max: cfg.cache_entries.max(1),
            next_id: AtomicU16::new(rand_id()),
        },
    });
    let mut server = hickory_server::Server::new(SharedHandler(handler.clone()));
    let udp = tokio::net::UdpSocket::bind(cfg.listen)
        .await
        .map_err(|source| DnsError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let tcp = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DnsError::Bind {
            addr: cfg.listen,
            source,
        })?;
    server.register_listener(tcp, Duration::from_secs(10), 65535);
    // One receive loop per core (at most 4) on the one socket.
    let loops = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let udp = tokio::spawn(udp::serve(
        Arc::new(udp::UdpServer::new(handler, zone)),
        Arc::new(udp),
        loops,
    ));
    Ok(Serving { tcp: server, udp })
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ std::process::id()) as u16
}

/// Serves a fixed `zone` until `shutdown` completes (benchmarks and tools; [`run`] keeps the
/// zone current from the API instead).
pub async fn serve_zone(
    cfg: DnsConfig,
    zone: Zone,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    let server = serve(&cfg, Arc::new(RwLock::new(Arc::new(zone)))).await?;
    shutdown.await;
    server.shutdown().await;
    Ok(())
}

/// Runs the DNS server until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    cfg: DnsConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    let zone = Arc::new(RwLock::new(Arc::new(Zone::empty(&cfg.domain, cfg.ttl))));
    let server = serve(&cfg, zone.clone()).await?;
    let changed = Arc::new(tokio::sync::Notify::new());
    let (svc_r, svc_w) = reflector::store::<Service>();
    let (eps_r, eps_w) = reflector::store::<EndpointSlice>();
    let (pod_r, pod_w) = reflector::store::<Pod>();
    let mut tasks = tokio::task::JoinSet::new();
    macro_rules! watch {
        ($ty:ty, $w:expr, $what:literal) => {{
            let changed = changed.clone();
            let stream = watcher(Api::<$ty>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .reflect($w);
            tasks.spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    if let Err(e) = ev {
                        tracing::warn!(error = %e, concat!($what, " watch error; retrying"));
                    }
                    changed.notify_one();
                }
            });
        }};
    }
    watch!(Service, svc_w, "service");
    watch!(EndpointSlice, eps_w, "endpointslice");
    watch!(Pod, pod_w, "pod");
    let rebuild = async {
        let _ = svc_r.wait_until_ready().await;
        let _ = eps_r.wait_until_ready().await;
        let _ = pod_r.wait_until_ready().await;
        loop {
            let svcs: Vec<Service> = svc_r.state().iter().map(|s| (**s).clone()).collect();
            let eps: Vec<EndpointSlice> = eps_r.state().iter().map(|s| (**s).clone()).collect();
            let pods: Vec<Pod> = pod_r.state().iter().map(|s| (**s).clone()).collect();
            let z = Arc::new(Zone::build(&cfg.domain, cfg.ttl, &svcs, &eps, &pods));
            match zone.write() {
                Ok(mut w) => *w = z,
                Err(p) => *p.into_inner() = z,
            }
            tracing::debug!(services = svcs.len(), "cluster dns zone rebuilt");
            changed.notified().await;
            tokio::time::sleep(cfg.debounce).await;
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = rebuild => {}
    }
    tasks.abort_all();
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let got = parse_resolv_conf(
            "# c\nsearch x\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\noptions ndots:5\n",
        );
        assert_eq!(
            got,
            vec![
                "192.0.2.1:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
