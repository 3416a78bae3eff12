//! The DNS server against the in-process apiserver, queried over real UDP and TCP on loopback;
//! names outside the cluster go to a local dnsmasq upstream (never the machine's resolver).
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener as StdTcp, UdpSocket as StdUdp};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::json;
use skiff_apiserver::{ApiState, Config, Identity, router};
use skiff_dns::DnsConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    // a port free for both UDP and TCP
    loop {
        let u = StdUdp::bind("127.0.0.1:0").unwrap();
        let p = u.local_addr().unwrap().port();
        if StdTcp::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

struct Upstream(Child);
impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on loopback answering `outside.test` only.
fn upstream() -> (Upstream, SocketAddr) {
    let port = free_port();
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            &format!("--port={port}"),
            "--address=/outside.test/192.0.2.7",
            "--local-ttl=60",
            "--user=root",
            "--pid-file=",
        ])
        .spawn()
        .expect("dnsmasq is needed for this test (Debian package dnsmasq-base)");
    std::thread::sleep(Duration::from_millis(200));
    (Upstream(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

async fn client() -> kube::Client {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let state = ApiState::new(skiff_store::memory(), Config::default())
        .await
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .map_request(|mut req: http::Request<kube::client::Body>| {
            req.extensions_mut().insert(Identity {
                user: "system:skiff-dns".into(),
                groups: vec!["system:masters".into()],
                uid: String::new(),
            });
            req
        })
        .service(router(state));
    kube::Client::new(svc, "default")
}

fn query_msg(name: &str, t: RecordType) -> Message {
    let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m
}

async fn ask(server: SocketAddr, name: &str, t: RecordType) -> Message {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&query_msg(name, t).to_vec().unwrap(), server)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .expect("dns answer in time")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

async fn ask_tcp(server: SocketAddr, name: &str, t: RecordType) -> Message {
    let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
    let q = query_msg(name, t).to_vec().unwrap();
    s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(&q).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn data(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_names_forwarding_and_negative_answers() {
    let (_up, up_addr) = upstream();
    let client = client().await;
    let port = free_port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = DnsConfig {
        listen,
        upstreams: vec![up_addr],
        resolv_conf: None,
        ..DnsConfig::default()
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let c2 = client.clone();
    let task = tokio::spawn(async move {
        skiff_dns::run(c2, cfg, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let svcs: Api<Service> = Api::default_namespaced(client.clone());
    for spec in [
        json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "10.43.0.20",
               "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        json!({"metadata": {"name": "nginx"}, "spec": {"clusterIP": "None",
               "ports": [{"name": "http", "port": 80}]}}),
        json!({"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "outside.test"}}),
    ] {
        let s: Service = serde_json::from_value(spec).unwrap();
        svcs.create(&PostParams::default(), &s).await.unwrap();
    }
    let slices: Api<EndpointSlice> = Api::default_namespaced(client.clone());
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "nginx-1", "labels": {"kubernetes.io/service-name": "nginx"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.42.0.5"], "hostname": "web-0"},
                      {"addresses": ["10.42.0.6"]}]
    }))
    .unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = ask(listen, "nginx.default.svc.cluster.local.", RecordType::A).await;
        if data(&m).len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "zone never caught up: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = ask(listen, "web.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(data(&m), ["10.43.0.20"]);
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers[0].ttl, 5);
    let m = ask_tcp(listen, "web.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(data(&m), ["10.43.0.20"], "over TCP");
    let mut headless = data(&ask(listen, "nginx.default.svc.cluster.local.", RecordType::A).await);
    headless.sort();
    assert_eq!(headless, ["10.42.0.5", "10.42.0.6"]);
    assert_eq!(
        data(
            &ask(
                listen,
                "web-0.nginx.default.svc.cluster.local.",
                RecordType::A
            )
            .await
        ),
        ["10.42.0.5"]
    );
    assert_eq!(
        data(
            &ask(
                listen,
                "_http._tcp.web.default.svc.cluster.local.",
                RecordType::SRV
            )
            .await
        ),
        ["0 100 80 web.default.svc.cluster.local."]
    );
    assert_eq!(
        data(&ask(listen, "20.0.43.10.in-addr.arpa.", RecordType::PTR).await),
        ["web.default.svc.cluster.local."]
    );
    assert_eq!(
        data(
            &ask(
                listen,
                "10-42-0-9.default.pod.cluster.local.",
                RecordType::A
            )
            .await
        ),
        ["10.42.0.9"]
    );
    // ExternalName: CNAME, chased through the upstream.
    let m = ask(listen, "ext.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(data(&m), ["outside.test.", "192.0.2.7"]);
    // NODATA vs NXDOMAIN, both with the SOA.
    let m = ask(listen, "web.default.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);
    let m = ask(listen, "nope.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.len(), 1);
    // Forwarded (and then cached: the second answer comes after the upstream is gone).
    let m = ask(listen, "outside.test.", RecordType::A).await;
    assert_eq!(data(&m), ["192.0.2.7"]);
    drop(_up);
    let m = ask(listen, "outside.test.", RecordType::A).await;
    assert_eq!(data(&m), ["192.0.2.7"], "cached answer");
    // A service deleted is gone from DNS.
    svcs.delete("web", &Default::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = ask(listen, "web.default.svc.cluster.local.", RecordType::A).await;
        if m.metadata.response_code == ResponseCode::NXDomain {
            break;
        }
        assert!(Instant::now() < deadline, "deleted service still answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    task.await.unwrap();
}
