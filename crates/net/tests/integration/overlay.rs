//! Root tests for cross-node pod traffic: two skiff-lab nodes on a lab bridge (the underlay),
//! each with its own pod bridge (`cni0`, inside the node) and one pod; pod -> pod TCP across the
//! nodes over host-gw routes and over VXLAN.

use crate::common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{in_netns, netns_node, require_root, run_in};
use skiff_lab::{Bridge, Link, Node};
use skiff_net::{Ipv4Cidr, Network, NetworkConfig, PodInterface, VxlanConfig, VxlanPeer};

struct Side {
    node: Node,
    pod: Node,
    net: Network,
    iface: PodInterface,
    node_ip: Ipv4Addr,
    pod_cidr: Ipv4Cidr,
    _state: tempfile::TempDir,
}

fn underlay(third: u8) -> (Bridge, [u8; 3]) {
    require_root();
    let r = (std::process::id() % 200) as u8 + 20;
    let prefix = [10, third, r];
    let bridge = Bridge::create(
        &skiff_lab::unique_name("skul"),
        &format!("{}.{}.{}.1/24", prefix[0], prefix[1], prefix[2]),
    )
    .expect("create the lab underlay bridge");
    (bridge, prefix)
}

fn side(bridge: &Bridge, prefix: [u8; 3], n: u8, mtu: Option<u32>) -> Side {
    let node_ip = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 10 + n);
    let mut sleep = Command::new("sleep");
    sleep.arg("infinity");
    let node = Node::builder(format!("node{n}"))
        .link(Link::new(bridge.name(), format!("{node_ip}/24")))
        .spawn(sleep)
        .expect("spawn lab node");
    let pod = netns_node(&format!("pod{n}"));
    let state = tempfile::tempdir().expect("tempdir");
    let pod_cidr: Ipv4Cidr = format!("10.42.{n}.0/24").parse().expect("cidr");
    let mut cfg = NetworkConfig::new(pod_cidr, state.path());
    cfg.host_netns = Some(node.netns_path());
    cfg.mtu = mtu;
    let net = Network::new(cfg).expect("network");
    net.enable_ip_forwarding().expect("forwarding");
    let iface = net
        .attach("pod", &pod.netns_path(), "eth0")
        .expect("attach");
    Side {
        node,
        pod,
        net,
        iface,
        node_ip,
        pod_cidr,
        _state: state,
    }
}

/// TCP from a's pod to b's pod; b's pod must see a's pod address (no NAT between pods).
fn pod_to_pod(a: &Side, b: &Side) {
    let listener = in_netns(&b.pod, || {
        TcpListener::bind((b.iface.ip, 0)).expect("pod to pod")
    });
    let port = listener.local_addr().expect("pod to pod").port();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("pod to pod");
        s.write_all(b"across").expect("pod to pod");
        peer
    });
    let got = in_netns(&a.pod, || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((b.iface.ip, port)),
            Duration::from_secs(5),
        )
        .expect("pod to pod");
        let mut buf = String::new();
        s.read_to_string(&mut buf).expect("pod to pod");
        buf
    });
    assert_eq!(got, "across");
    // No NAT between pods: the server sees the client pod's own address.
    assert_eq!(
        server.join().expect("pod to pod").ip(),
        std::net::IpAddr::V4(a.iface.ip)
    );
}

#[test]
fn host_gw_routes_carry_pod_traffic_between_nodes() {
    let (bridge, prefix) = underlay(251);
    let a = side(&bridge, prefix, 1, None);
    let b = side(&bridge, prefix, 2, None);
    a.net.add_host_gw_route(b.pod_cidr, b.node_ip).unwrap();
    a.net.add_host_gw_route(b.pod_cidr, b.node_ip).unwrap();
    b.net.add_host_gw_route(a.pod_cidr, a.node_ip).unwrap();
    let route = run_in(&a.node, "ip", &["route", "show", "10.42.2.0/24"]);
    assert!(route.contains(&format!("via {}", b.node_ip)), "{route}");
    pod_to_pod(&a, &b);
    pod_to_pod(&b, &a);
    a.net.remove_host_gw_route(b.pod_cidr).unwrap();
    a.net.remove_host_gw_route(b.pod_cidr).unwrap();
    assert_eq!(
        run_in(&a.node, "ip", &["route", "show", "10.42.2.0/24"]),
        ""
    );
}

#[test]
fn vxlan_carries_pod_traffic_between_nodes() {
    let (bridge, prefix) = underlay(252);
    let mtu = Some(1500 - skiff_net::VXLAN_OVERHEAD);
    let a = side(&bridge, prefix, 1, mtu);
    let b = side(&bridge, prefix, 2, mtu);
    let (va, vb) = (VxlanConfig::new(a.node_ip), VxlanConfig::new(b.node_ip));
    let mac_a = a.net.ensure_vxlan(&va).unwrap();
    assert_eq!(a.net.ensure_vxlan(&va).unwrap(), mac_a, "idempotent");
    assert!(
        !a.net.vxlan_tx_checksum_offload(&va).unwrap(),
        "tx checksum offload must be off on the vxlan device (k3s#2013)"
    );
    let mac_b = b.net.ensure_vxlan(&vb).unwrap();
    let peer_b = VxlanPeer {
        pod_cidr: b.pod_cidr,
        node_ip: b.node_ip,
        vtep_mac: mac_b,
    };
    let peer_a = VxlanPeer {
        pod_cidr: a.pod_cidr,
        node_ip: a.node_ip,
        vtep_mac: mac_a,
    };
    a.net.set_vxlan_peer(&va, &peer_b).unwrap();
    a.net.set_vxlan_peer(&va, &peer_b).unwrap();
    b.net.set_vxlan_peer(&vb, &peer_a).unwrap();

    let dev = run_in(&a.node, "ip", &["-d", "-o", "link", "show", "skiff.1"]);
    assert!(dev.contains("vxlan id 1"), "{dev}");
    assert!(dev.contains("dstport 8472"), "{dev}");
    assert!(dev.contains("mtu 1450"), "{dev}");
    let fdb = run_in(&a.node, "bridge", &["fdb", "show", "dev", "skiff.1"]);
    assert!(fdb.contains(&format!("dst {}", b.node_ip)), "{fdb}");
    pod_to_pod(&a, &b);
    pod_to_pod(&b, &a);

    // The traffic really went through the tunnel: the route points at the vxlan device.
    let route = run_in(&a.node, "ip", &["route", "get", &b.iface.ip.to_string()]);
    assert!(route.contains("dev skiff.1"), "{route}");

    a.net.remove_vxlan_peer(&va, &peer_b).unwrap();
    a.net.remove_vxlan_peer(&va, &peer_b).unwrap();
    let fdb = run_in(&a.node, "bridge", &["fdb", "show", "dev", "skiff.1"]);
    assert!(!fdb.contains(&format!("dst {}", b.node_ip)), "{fdb}");
    a.net.delete_vxlan(&va).unwrap();
    a.net.delete_vxlan(&va).unwrap();
    b.net.delete_vxlan(&vb).unwrap();
}

#[test]
fn masquerade_hides_pod_addresses_leaving_the_cluster() {
    use skiff_net::nft::{Family, Nft, Table, pod_masquerade_chain};
    let (bridge, prefix) = underlay(253);
    let a = side(&bridge, prefix, 1, None);
    // An "outside" machine on the underlay: no route back to any pod CIDR.
    let outside_ip = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 30);
    let mut sleep = Command::new("sleep");
    sleep.arg("infinity");
    let outside = Node::builder("outside")
        .link(Link::new(bridge.name(), format!("{outside_ip}/24")))
        .spawn(sleep)
        .unwrap();
    let listener = in_netns(&outside, || TcpListener::bind((outside_ip, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (_, peer) = listener.accept().unwrap();
        peer
    });
    let connect = |timeout| {
        in_netns(&a.pod, || {
            TcpStream::connect_timeout(&SocketAddr::from((outside_ip, port)), timeout)
        })
    };
    // Without masquerade the answer cannot find its way back to the pod.
    assert!(connect(Duration::from_millis(500)).is_err());

    let name = skiff_lab::unique_name("skiff_test").replace('-', "_");
    let nft = Nft::in_netns(&a.node.netns_path()).unwrap();
    let mut table = Table::new(Family::Inet, &name);
    table.chains.push(pod_masquerade_chain(
        "nat-postrouting",
        a.pod_cidr,
        "10.42.0.0/16".parse().unwrap(),
        None,
    ));
    nft.apply(&table).unwrap();
    connect(Duration::from_secs(5)).unwrap();
    assert_eq!(
        server.join().unwrap().ip(),
        std::net::IpAddr::V4(a.node_ip),
        "the outside sees the node address, not the pod's"
    );
    nft.delete_table(Family::Inet, &name).unwrap();
}
