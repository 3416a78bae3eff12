//! Root tests for the pod network: bridge, veth pairs, addresses and IPAM, all inside
//! namespaces the tests create (a lab node plays the host; more lab nodes play pod sandboxes).

use crate::common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{in_netns, links, netns_node, run_in};
use skiff_net::{Ipv4Cidr, Network, NetworkConfig};

fn config(host: &skiff_lab::Node, state: &std::path::Path, cidr: &str) -> NetworkConfig {
    let mut cfg = NetworkConfig::new(cidr.parse::<Ipv4Cidr>().expect("test cidr"), state);
    cfg.bridge_name = skiff_lab::unique_name("skbr");
    cfg.host_netns = Some(host.netns_path());
    cfg
}

#[test]
fn two_pods_reach_each_other_through_the_bridge() {
    let host = netns_node("host");
    let (a, b) = (netns_node("pod-a"), netns_node("pod-b"));
    let state = tempfile::tempdir().unwrap();
    let net = Network::new(config(&host, state.path(), "10.42.0.0/24")).unwrap();
    assert_eq!(net.gateway(), Ipv4Addr::new(10, 42, 0, 1));
    // The test host netns has no default route: the MTU falls back to 1500.
    assert_eq!(net.mtu(), 1500);
    net.ensure_bridge().unwrap();
    net.ensure_bridge().unwrap(); // idempotent

    let pa = net.attach("sandbox-a", &a.netns_path(), "eth0").unwrap();
    let pb = net.attach("sandbox-b", &b.netns_path(), "eth0").unwrap();
    assert_ne!(pa.ip, pb.ip);
    assert!(net.ipam().cidr().contains(pa.ip));
    assert_eq!(pa.gateway, Ipv4Addr::new(10, 42, 0, 1));
    assert_eq!(pa.mac.len(), 17);

    // Inside the pod: eth0 with the address, lo up, default route via the gateway.
    let addr = run_in(&a, "ip", &["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("{}/24", pa.ip)), "{addr}");
    let route = run_in(&a, "ip", &["route", "show", "default"]);
    assert!(route.contains("via 10.42.0.1 dev eth0"), "{route}");
    let lo = run_in(&a, "ip", &["-o", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");
    let ha = run_in(&a, "ip", &["-o", "link", "show", "eth0"]);
    assert!(ha.contains(&pa.mac), "{ha}");
    // On the host: the veth is on the bridge with hairpin on.
    let port = run_in(&host, "ip", &["-d", "-o", "link", "show", &pa.host_veth]);
    assert!(
        port.contains(&format!("master {}", net.bridge_name())),
        "{port}"
    );
    assert!(port.contains("hairpin on"), "{port}");

    // TCP from pod b to pod a, and the gateway answers ping-free TCP too (pod -> host).
    let listener = in_netns(&a, || TcpListener::bind((pa.ip, 0)).unwrap());
    let port_a = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(b"hello from a").unwrap();
        peer
    });
    let got = in_netns(&b, || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((pa.ip, port_a)), Duration::from_secs(5))
                .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    });
    assert_eq!(got, "hello from a");
    assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(pb.ip));

    // Re-attaching keeps the address; detach twice is fine; the pool is full again.
    let again = net.attach("sandbox-a", &a.netns_path(), "eth0").unwrap();
    assert_eq!(again.ip, pa.ip);
    for (id, node) in [("sandbox-a", &a), ("sandbox-b", &b)] {
        net.detach(id, &node.netns_path()).unwrap();
        net.detach(id, &node.netns_path()).unwrap();
    }
    assert_eq!(net.ipam().free().unwrap(), net.ipam().capacity());
    assert!(!links(&a).iter().any(|l| l == "eth0"));
    net.delete_bridge().unwrap();
    net.delete_bridge().unwrap();
    let left = links(&host);
    assert_eq!(left, vec!["lo".to_string()], "links left on the host netns");
}

#[test]
fn allocations_survive_a_new_network_instance() {
    let host = netns_node("host");
    let pod = netns_node("pod");
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&host, state.path(), "10.42.3.0/24");
    let first = Network::new(cfg.clone()).unwrap();
    let p = first.attach("sandbox", &pod.netns_path(), "eth0").unwrap();
    drop(first);
    let second = Network::new(cfg).unwrap();
    assert_eq!(second.ipam().get("sandbox").unwrap(), Some(p.ip));
    let other = second.ipam().allocate("other").unwrap();
    assert_ne!(other, p.ip);
    second.ipam().release("other").unwrap();
    second.detach("sandbox", &pod.netns_path()).unwrap();
    assert_eq!(second.ipam().free().unwrap(), second.ipam().capacity());
    second.delete_bridge().unwrap();
}

#[test]
fn attach_detach_cycles_leave_the_pool_full_and_no_links() {
    let host = netns_node("host");
    let pod = netns_node("pod");
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&host, state.path(), "10.42.5.0/24");
    cfg.mtu = Some(1450);
    let net = Network::new(cfg).unwrap();
    assert_eq!(net.mtu(), 1450);
    net.ensure_bridge().unwrap();
    const CYCLES: u32 = 100;
    let mut attach_total = Duration::ZERO;
    for i in 0..CYCLES {
        let id = format!("cycle-{i}");
        let t = Instant::now();
        let p = net.attach(&id, &pod.netns_path(), "eth0").unwrap();
        attach_total += t.elapsed();
        assert_eq!(p.mtu, 1450);
        net.detach(&id, &pod.netns_path()).unwrap();
    }
    eprintln!(
        "attach (veth + ipam + addresses + route): {:?} per pod over {CYCLES} cycles",
        attach_total / CYCLES
    );
    assert_eq!(net.ipam().free().unwrap(), net.ipam().capacity());
    assert_eq!(links(&pod), vec!["lo".to_string()]);
    net.delete_bridge().unwrap();
    assert_eq!(links(&host), vec!["lo".to_string()]);
}

#[test]
fn a_missing_netns_fails_cleanly() {
    let host = netns_node("host");
    let state = tempfile::tempdir().unwrap();
    let net = Network::new(config(&host, state.path(), "10.42.6.0/24")).unwrap();
    let err = net
        .attach("ghost", std::path::Path::new("/nonexistent/netns"), "eth0")
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    assert_eq!(net.ipam().get("ghost").unwrap(), None);
}

#[test]
fn a_stale_interface_of_the_pod_name_is_replaced() {
    let host = netns_node("host");
    let pod = netns_node("pod");
    let state = tempfile::tempdir().unwrap();
    let net = Network::new(config(&host, state.path(), "10.42.7.0/24")).unwrap();
    net.ensure_bridge().unwrap();
    // Something else left an eth0 in the sandbox: the pod end is made under that name.
    // (A veth pair: this kernel has no dummy driver.)
    run_in(
        &pod,
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "stale1",
        ],
    );
    let p = net.attach("sandbox", &pod.netns_path(), "eth0").unwrap();
    let link = run_in(&pod, "ip", &["-d", "-o", "link", "show", "eth0"]);
    assert!(link.contains("veth"), "{link}");
    assert!(link.contains(&p.mac), "{link}");
    let addr = run_in(&pod, "ip", &["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("{}/24", p.ip)), "{addr}");
    net.detach("sandbox", &pod.netns_path()).unwrap();
    assert_eq!(links(&pod), vec!["lo".to_string()]);
    net.delete_bridge().unwrap();
    assert_eq!(links(&host), vec!["lo".to_string()]);
}

#[test]
fn an_attach_after_the_bridge_was_rebuilt_finds_the_new_bridge() {
    let host = netns_node("host");
    let pod = netns_node("pod");
    let state = tempfile::tempdir().unwrap();
    let net = Network::new(config(&host, state.path(), "10.42.8.0/24")).unwrap();
    let first = net.attach("one", &pod.netns_path(), "eth0").unwrap();
    net.detach("one", &pod.netns_path()).unwrap();
    // Someone deletes the bridge (and so its index) while the network is in use: the next
    // attach must not use the index it remembers.
    net.delete_bridge().unwrap();
    let p = net.attach("two", &pod.netns_path(), "eth0").unwrap();
    assert_ne!(first.mac, p.mac);
    let link = run_in(
        &host,
        "ip",
        &["-o", "link", "show", "master", net.bridge_name()],
    );
    assert!(link.contains(&p.host_veth), "{link}");
    let addr = run_in(&pod, "ip", &["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("{}/24", p.ip)), "{addr}");
    net.detach("two", &pod.netns_path()).unwrap();
    net.delete_bridge().unwrap();
    assert_eq!(links(&host), vec!["lo".to_string()]);
}
