//! The proxy against the in-process apiserver, applying its table inside a throwaway "node"
//! network namespace with two veth'd "pods" on a bridge and an outside client: real TCP through
//! a ClusterIP and a NodePort, even spread, fast refusal without endpoints, hairpin, the DNS
//! VIP, identical rules after a restart and other tables left alone.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use skiff_apiserver::{ApiState, Config, Identity, router};
use skiff_lab::Node;
use skiff_net::nft::{Family, Nft};
use skiff_proxy::ProxyConfig;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);

fn require_root() {
    if let Err(e) = skiff_lab::require_root() {
        panic!("this test needs root (network namespaces, veths, nftables): {e}");
    }
}

fn spawn_ns(name: &str) -> Node {
    let mut sleep = Command::new("sleep");
    sleep.arg("infinity");
    Node::builder(skiff_lab::unique_name(name))
        .spawn(sleep)
        .expect("spawn a throwaway namespace")
}

/// Runs a shell script in `node`'s network namespace (host PID namespace, so `netns PID` works).
fn sh(node: &Node, script: &str) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", node.pid()))
        .args(["sh", "-ec", script])
        .output()
        .expect("run nsenter");
    assert!(
        out.status.success(),
        "script failed in {}: {script}\n{}",
        node.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn netns_file(node: &Node) -> File {
    File::open(format!("/proc/{}/ns/net", node.pid())).unwrap()
}

/// A TCP listener on :8080 inside `node` answering `reply` to every connection, and a UDP one
/// on :53 answering `reply` (stands in for the node-local DNS server).
fn serve(node: &Node, reply: &'static str, tcp_port: u16) {
    let ns = netns_file(node);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = TcpListener::bind(("0.0.0.0", tcp_port)).unwrap();
        let u = UdpSocket::bind("0.0.0.0:53").unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(reply.as_bytes(), from);
            }
        });
        tx.send(()).unwrap();
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(reply.as_bytes());
        }
    });
    rx.recv().unwrap();
}

/// Connects from inside `node` to `addr` and reads the reply.
fn fetch(node: &Node, addr: SocketAddr) -> std::io::Result<String> {
    let ns = netns_file(node);
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    })
    .join()
    .unwrap()
}

fn udp_ask(node: &Node, addr: SocketAddr) -> std::io::Result<String> {
    let ns = netns_file(node);
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let u = UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(Duration::from_secs(2)))?;
        u.send_to(b"q", addr)?;
        let mut buf = [0u8; 64];
        let n = u.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .join()
    .unwrap()
}

/// node (bridge 10.42.0.1/24, 192.168.77.1 towards client) + pods p1 10.42.0.2, p2 10.42.0.3 +
/// client 192.168.77.2. Dropping it kills every namespace (links go with them).
struct Lab {
    node: Node,
    p1: Node,
    p2: Node,
    client: Node,
}

fn lab() -> Lab {
    require_root();
    let lab = Lab {
        node: spawn_ns("pxn"),
        p1: spawn_ns("pxp1"),
        p2: spawn_ns("pxp2"),
        client: spawn_ns("pxc"),
    };
    sh(
        &lab.node,
        &format!(
            "ip link set lo up
             ip link add br0 type bridge
             ip addr add 10.42.0.1/24 dev br0
             ip link set br0 up
             ip link add h1 type veth peer name eth0 netns {p1}
             ip link add h2 type veth peer name eth0 netns {p2}
             ip link add c0 type veth peer name eth0 netns {c}
             for h in h1 h2; do ip link set $h master br0; ip link set $h up; ip link set $h type bridge_slave hairpin on; done
             ip addr add {NODE_IP}/24 dev c0
             ip link set c0 up
             ip route add 10.43.0.0/16 dev br0
             echo 1 > /proc/sys/net/ipv4/ip_forward",
            p1 = lab.p1.pid(),
            p2 = lab.p2.pid(),
            c = lab.client.pid()
        ),
    );
    for (n, ip, gw) in [
        (&lab.p1, "10.42.0.2/24", "10.42.0.1"),
        (&lab.p2, "10.42.0.3/24", "10.42.0.1"),
        (&lab.client, "192.168.77.2/24", "192.168.77.1"),
    ] {
        sh(
            n,
            &format!(
                "ip link set lo up; ip addr add {ip} dev eth0; ip link set eth0 up; ip route add default via {gw}"
            ),
        );
    }
    serve(&lab.p1, "p1", 8080);
    serve(&lab.p2, "p2", 8080);
    serve(&lab.node, "dns", 9999);
    lab
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
                user: "system:kube-proxy".into(),
                groups: vec!["system:masters".into()],
                uid: String::new(),
            });
            req
        })
        .service(router(state));
    kube::Client::new(svc, "default")
}

struct Proxy {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    fn start(client: &kube::Client, lab: &Lab) -> Proxy {
        let cfg = ProxyConfig {
            node_name: "n1".into(),
            node_ips: vec![NODE_IP],
            dns_target: Some(Ipv4Addr::new(10, 42, 0, 1)),
            netns: Some(lab.node.netns_path()),
            debounce: Duration::from_millis(20),
            localhost_node_ports: true,
            ..ProxyConfig::default()
        };
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let client = client.clone();
        let task = tokio::spawn(async move {
            skiff_proxy::run(client, cfg, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Proxy {
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn create_service(client: &kube::Client, name: &str, spec: serde_json::Value) {
    let api: Api<Service> = Api::default_namespaced(client.clone());
    let svc: Service =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
    api.create(&PostParams::default(), &svc).await.unwrap();
}

async fn set_endpoints(client: &kube::Client, svc: &str, ips: &[&str]) {
    let api: Api<EndpointSlice> = Api::default_namespaced(client.clone());
    let endpoints: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "n1"}))
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-x"), "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    });
    api.patch(
        &format!("{svc}-x"),
        &PatchParams::apply("test").force(),
        &Patch::Apply(&slice),
    )
    .await
    .unwrap();
}

/// Polls `f` until it returns true (10 s).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 43, 0, 20), port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_node_port_spread_refusal_hairpin_and_dns_vip() {
    let lab = lab();
    let client = client().await;
    let proxy = Proxy::start(&client, &lab);
    let http = json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]);
    create_service(
        &client,
        "web",
        json!({"type": "NodePort", "clusterIP": "10.43.0.20", "ports": http}),
    )
    .await;
    set_endpoints(&client, "web", &["10.42.0.2", "10.42.0.3"]).await;

    // ClusterIP from the node itself, spread over both pods.
    eventually("ClusterIP answers", || fetch(&lab.node, vip(80)).is_ok()).await;
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..200 {
        *seen.entry(fetch(&lab.node, vip(80)).unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both backends must answer: {seen:?}");
    assert!(
        seen.values().all(|n| *n >= 60),
        "spread is not even over 200 connections: {seen:?}"
    );
    // From a pod (forwarded path) and from outside through the NodePort.
    let from_pod = fetch(&lab.p2, vip(80)).unwrap();
    assert!(from_pod == "p1" || from_pod == "p2", "{from_pod}");
    let np = fetch(&lab.client, SocketAddr::from((NODE_IP, 30080))).unwrap();
    assert!(np == "p1" || np == "p2", "nodeport answered {np:?}");
    // The node itself reaches the NodePort on 127.0.0.1 (route_localnet + masquerade).
    let lo = fetch(&lab.node, SocketAddr::from((Ipv4Addr::LOCALHOST, 30080)))
        .unwrap_or_else(|e| panic!("NodePort on 127.0.0.1 from the node: {e}"));
    assert!(
        lo == "p1" || lo == "p2",
        "localhost nodeport answered {lo:?}"
    );

    // The cluster DNS VIP reaches the node-local server (here: a UDP echo on the bridge address).
    assert_eq!(
        udp_ask(&lab.p1, "10.43.0.10:53".parse().unwrap()).unwrap(),
        "dns"
    );
    // And the kube-dns Service was created at that address.
    let dns: Api<Service> = Api::namespaced(client.clone(), "kube-system");
    let mut kube_dns = None;
    for _ in 0..100 {
        if let Ok(s) = dns.get("kube-dns").await {
            kube_dns = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kube_dns = kube_dns.expect("kube-dns service created");
    assert_eq!(
        kube_dns.spec.unwrap().cluster_ip.as_deref(),
        Some("10.43.0.10")
    );

    // Hairpin: p1 reaches itself through a service whose only endpoint it is.
    create_service(
        &client,
        "self",
        json!({"clusterIP": "10.43.0.21", "ports": [{"name": "http", "port": 81, "targetPort": 8080}]}),
    )
    .await;
    set_endpoints(&client, "self", &["10.42.0.2"]).await;
    let self_vip = SocketAddr::from((Ipv4Addr::new(10, 43, 0, 21), 81));
    eventually("hairpin through the service", || {
        fetch(&lab.p1, self_vip).ok().as_deref() == Some("p1")
    })
    .await;

    // Scale to zero: connections are refused at once, from the node and from a pod.
    set_endpoints(&client, "web", &[]).await;
    eventually("refusal without endpoints", || {
        matches!(fetch(&lab.node, vip(80)), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
    for n in [&lab.node, &lab.p1] {
        let t = Instant::now();
        let err = fetch(n, vip(80)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "refusal took {:?}",
            t.elapsed()
        );
    }
    let t = Instant::now();
    let err = fetch(&lab.client, SocketAddr::from((NODE_IP, 30080))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(t.elapsed() < Duration::from_millis(500));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_gives_identical_rules_and_leaves_other_tables() {
    let lab = lab();
    sh(
        &lab.node,
        "nft add table inet other; nft add chain inet other c; nft add rule inet other c counter",
    );
    let nft = Nft::in_netns(&lab.node.netns_path()).unwrap();
    let other_before = nft.list_text(Family::Inet, "other").unwrap().unwrap();
    let client = client().await;
    create_service(
        &client,
        "web",
        json!({"type": "LoadBalancer", "clusterIP": "10.43.0.20", "sessionAffinity": "ClientIP",
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    )
    .await;
    set_endpoints(&client, "web", &["10.42.0.2", "10.42.0.3"]).await;
    let proxy = Proxy::start(&client, &lab);
    eventually("ClusterIP answers", || fetch(&lab.node, vip(80)).is_ok()).await;
    // LoadBalancer: the node address is in the status and the service port answers on it.
    let api: Api<Service> = Api::default_namespaced(client.clone());
    let mut ingress = vec![];
    for _ in 0..100 {
        let s = api.get("web").await.unwrap();
        ingress = s
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress)
            .unwrap_or_default();
        if !ingress.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ingress.len(), 1);
    assert_eq!(ingress[0].ip.as_deref(), Some("192.168.77.1"));
    let lb = fetch(&lab.client, SocketAddr::from((NODE_IP, 80))).unwrap();
    // Session affinity: the same client keeps its backend.
    for _ in 0..20 {
        assert_eq!(
            fetch(&lab.client, SocketAddr::from((NODE_IP, 80))).unwrap(),
            lb
        );
    }
    let first = nft.list_text(Family::Inet, "skiff").unwrap().unwrap();
    proxy.stop().await;
    let proxy = Proxy::start(&client, &lab);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = nft.list_text(Family::Inet, "skiff").unwrap().unwrap();
    // Dynamic affinity sets hold live elements; compare the rules without them.
    let strip = |s: &str| -> String {
        s.lines()
            .filter(|l| !l.trim_start().starts_with("elements = {") || l.contains(" . "))
            .filter(|l| !l.contains("expires"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&first), strip(&second), "restart changed the rules");
    assert_eq!(
        second.matches("dnat ip to").count(),
        first.matches("dnat ip to").count()
    );
    assert_eq!(
        nft.list_text(Family::Inet, "other").unwrap().unwrap(),
        other_before,
        "another table was touched"
    );
    proxy.stop().await;
}

/// Rule sync for 1,000 Services x 10 endpoints: build + render, and one atomic `nft -f` apply
/// into a throwaway namespace (the figure that matters: nft's own work dominates).
#[test]
fn rule_sync_1000_services_x_10_endpoints() {
    require_root();
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for i in 0..1000usize {
        let name = format!("svc{i}");
        svcs.push(
            serde_json::from_value::<Service>(json!({
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {"type": "NodePort", "clusterIP": format!("10.43.{}.{}", i / 250, i % 250 + 1),
                         "ports": [{"name": "http", "port": 80, "nodePort": 30000 + i, "protocol": "TCP"}]}
            }))
            .unwrap(),
        );
        let eps: Vec<_> = (0..10)
            .map(|e| {
                let n = i * 10 + e;
                json!({"addresses": [format!("10.42.{}.{}", n / 250, n % 250 + 2)],
                       "conditions": {"ready": true}, "nodeName": "n1"})
            })
            .collect();
        slices.push(
            serde_json::from_value::<EndpointSlice>(json!({
                "metadata": {"name": format!("{name}-x"), "namespace": "bench",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps
            }))
            .unwrap(),
        );
    }
    let cfg = ProxyConfig {
        node_name: "n1".into(),
        node_ips: vec![NODE_IP],
        dns_target: Some(Ipv4Addr::new(10, 42, 0, 1)),
        ..ProxyConfig::default()
    };
    let t = Instant::now();
    let table = skiff_proxy::build_table(&cfg, &svcs, &slices);
    let text = table.render().unwrap();
    let build = t.elapsed();
    let node = spawn_ns("pxsync");
    let nft = Nft::in_netns(&node.netns_path()).unwrap();
    let mut applies = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        nft.apply(&table).unwrap();
        applies.push(t.elapsed());
    }
    let listed = nft.list_text(Family::Inet, "skiff").unwrap().unwrap();
    assert!(
        listed.contains("10.43.3.250 . tcp . 80"),
        "last service missing"
    );
    println!(
        "rule sync 1000 services x 10 endpoints: build+render {build:?} ({} bytes, {} chains), nft apply {applies:?}",
        text.len(),
        table.chains.len()
    );
    assert!(
        applies.iter().all(|d| *d < Duration::from_secs(5)),
        "applying 1,000 services took {applies:?}"
    );
}
