//! Root tests for the nftables primitives, each inside a fresh network namespace with a unique
//! table name: atomic, idempotent apply; other tables untouched; DNAT to real listeners through a
//! VIP; fast REJECT without endpoints; the 1,000 services x 10 endpoints timing.

use crate::common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{in_netns, netns_node, run_in};
use skiff_net::nft::{
    BaseChain, Chain, ChainKind, Family, Hook, Map, Match, Nft, Policy, Proto, RejectKind, Rule,
    ServiceKey, Stmt, Table, Verdict, pod_masquerade_chain,
};
use skiff_net::{Ipv4Cidr, Network, NetworkConfig};

fn table_name() -> String {
    skiff_lab::unique_name("skiff_test").replace('-', "_")
}

fn base(name: &str, kind: ChainKind, hook: Hook, priority: i32, rules: Vec<Rule>) -> Chain {
    Chain {
        name: name.into(),
        base: Some(BaseChain {
            kind,
            hook,
            priority,
            policy: Policy::Accept,
        }),
        rules,
    }
}

fn rule(matches: Vec<Match>, stmts: Vec<Stmt>) -> Rule {
    Rule {
        matches,
        stmts,
        comment: None,
    }
}

/// What the service proxy will build: `services` (VIP -> endpoints) and `rejects` (no endpoints).
fn model(name: &str, services: &[(ServiceKey, Vec<(Ipv4Addr, u16)>)]) -> Table {
    let mut t = Table::new(Family::Inet, name);
    let dispatch = || vec![rule(vec![], vec![Stmt::DispatchMap("service-ips".into())])];
    t.chains.push(base(
        "nat-prerouting",
        ChainKind::Nat,
        Hook::Prerouting,
        -100,
        dispatch(),
    ));
    t.chains.push(base(
        "nat-output",
        ChainKind::Nat,
        Hook::Output,
        -100,
        dispatch(),
    ));
    let reject = || {
        vec![rule(
            vec![Match::CtNew],
            vec![Stmt::DispatchMap("no-endpoints".into())],
        )]
    };
    for (n, hook) in [
        ("filter-input", Hook::Input),
        ("filter-forward", Hook::Forward),
        ("filter-output", Hook::Output),
    ] {
        t.chains
            .push(base(n, ChainKind::Filter, hook, -10, reject()));
    }
    t.chains.push(pod_masquerade_chain(
        "nat-postrouting",
        "10.42.0.0/24".parse().expect("cidr"),
        "10.42.0.0/16".parse().expect("cidr"),
        Some(0x4000),
    ));
    t.chains.push(Chain {
        name: "reject-chain".into(),
        base: None,
        rules: vec![
            rule(
                vec![Match::Proto(Proto::Tcp)],
                vec![Stmt::Reject(RejectKind::TcpReset)],
            ),
            rule(vec![], vec![Stmt::Reject(RejectKind::PortUnreachable)]),
        ],
    });
    let mut ips = Map {
        name: "service-ips".into(),
        elements: vec![],
    };
    let mut none = Map {
        name: "no-endpoints".into(),
        elements: vec![],
    };
    for (i, (key, eps)) in services.iter().enumerate() {
        if eps.is_empty() {
            none.elements
                .push((*key, Verdict::Goto("reject-chain".into())));
            continue;
        }
        let svc = format!("svc-{i}");
        let mut targets = Vec::new();
        for (j, (addr, port)) in eps.iter().enumerate() {
            let ep = format!("svc-{i}-ep-{j}");
            t.chains.push(Chain {
                name: ep.clone(),
                base: None,
                rules: vec![
                    rule(
                        vec![Match::SrcIn(Ipv4Cidr::new(*addr, 32).expect("host cidr"))],
                        vec![Stmt::OrMark(0x4000)],
                    ),
                    rule(
                        vec![Match::Proto(key.proto)],
                        vec![Stmt::Dnat {
                            addr: *addr,
                            port: Some(*port),
                        }],
                    ),
                ],
            });
            targets.push(ep);
        }
        t.chains.push(Chain {
            name: svc.clone(),
            base: None,
            rules: vec![rule(vec![], vec![Stmt::Spread(targets)])],
        });
        ips.elements.push((*key, Verdict::Goto(svc)));
    }
    t.maps.push(ips);
    t.maps.push(none);
    t
}

/// The listing without kernel handles (a replaced table gets a new table handle).
fn without_handles(mut v: serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

fn key(addr: [u8; 4], port: u16) -> ServiceKey {
    ServiceKey {
        addr: Ipv4Addr::from(addr),
        proto: Proto::Tcp,
        port,
    }
}

#[test]
fn apply_replaces_atomically_is_idempotent_and_spares_other_tables() {
    let ns = netns_node("nft");
    let nft = Nft::in_netns(&ns.netns_path()).unwrap();
    let name = table_name();
    // Someone else's table in the same namespace must survive everything we do.
    let mut other = std::process::Command::new("nft");
    other.args(["-f", "-"]);
    let script = "add table ip other\nadd chain ip other c\nadd rule ip other c counter accept\n";
    let mut child = ns
        .exec_in(other)
        .unwrap()
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let other_before = run_in(&ns, "nft", &["list", "table", "ip", "other"]);

    let svcs = vec![
        (
            key([10, 43, 0, 10], 80),
            vec![
                (Ipv4Addr::new(10, 42, 0, 5), 8080),
                (Ipv4Addr::new(10, 42, 0, 6), 8080),
            ],
        ),
        (key([10, 43, 0, 11], 80), vec![]),
    ];
    let t = model(&name, &svcs);
    assert!(nft.list_json(Family::Inet, &name).unwrap().is_none());
    nft.apply(&t).unwrap();
    let first = nft.list_json(Family::Inet, &name).unwrap().unwrap();
    let text = nft.list_text(Family::Inet, &name).unwrap().unwrap();
    assert!(
        text.contains("numgen random mod 2 vmap { 0 : goto svc-0-ep-0, 1 : goto svc-0-ep-1 }"),
        "{text}"
    );
    assert!(
        text.contains("10.43.0.11 . tcp . 80 : goto reject-chain"),
        "{text}"
    );
    assert!(
        text.contains("ip saddr 10.42.0.0/24 ip daddr != 10.42.0.0/16 masquerade"),
        "{text}"
    );
    nft.apply(&t).unwrap();
    nft.apply(&t).unwrap();
    let again = nft.list_json(Family::Inet, &name).unwrap().unwrap();
    assert_eq!(
        without_handles(first),
        without_handles(again.clone()),
        "re-applying the same model changed the ruleset"
    );
    let rules = again["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("rule").is_some())
        .count();
    let expected: usize = t.chains.iter().map(|c| c.rules.len()).sum();
    assert_eq!(rules, expected, "no duplicated rules");

    // A smaller model replaces the content wholesale: stale chains disappear.
    let smaller = model(&name, &svcs[1..]);
    nft.apply(&smaller).unwrap();
    let text = nft.list_text(Family::Inet, &name).unwrap().unwrap();
    assert!(!text.contains("svc-0-ep-1"), "{text}");

    // A broken model fails as a whole and leaves the previous content in place.
    let mut broken = smaller.clone();
    broken.chains[0]
        .rules
        .push(rule(vec![Match::DstPort(80)], vec![Stmt::Masquerade]));
    assert!(nft.apply(&broken).is_err());
    assert_eq!(nft.list_text(Family::Inet, &name).unwrap().unwrap(), text);

    assert_eq!(
        run_in(&ns, "nft", &["list", "table", "ip", "other"]),
        other_before
    );
    nft.delete_table(Family::Inet, &name).unwrap();
    nft.delete_table(Family::Inet, &name).unwrap();
    assert!(!nft.table_exists(Family::Inet, &name).unwrap());
    assert_eq!(
        run_in(&ns, "nft", &["list", "table", "ip", "other"]),
        other_before
    );
}

#[test]
fn vip_dnat_reaches_backends_and_reject_is_fast() {
    let host = netns_node("host");
    let pod = netns_node("backend");
    let state = tempfile::tempdir().unwrap();
    let mut cfg = NetworkConfig::new("10.42.0.0/24".parse().expect("cidr"), state.path());
    cfg.bridge_name = skiff_lab::unique_name("skbr");
    cfg.host_netns = Some(host.netns_path());
    let net = Network::new(cfg).unwrap();
    let p = net.attach("backend", &pod.netns_path(), "eth0").unwrap();
    let service_cidr: Ipv4Cidr = "10.43.0.0/16".parse().unwrap();
    net.ensure_service_route(service_cidr).unwrap();
    net.ensure_service_route(service_cidr).unwrap();
    let route = run_in(&host, "ip", &["route", "get", "10.43.0.10"]);
    assert!(
        route.contains(&format!("dev {}", net.bridge_name())),
        "{route}"
    );

    // Two backends (two listeners in the pod) answer with their names.
    let listeners: Vec<TcpListener> = in_netns(&pod, || {
        (0..2)
            .map(|_| TcpListener::bind((p.ip, 0)).unwrap())
            .collect()
    });
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    for (i, l) in listeners.into_iter().enumerate() {
        std::thread::spawn(move || {
            for s in l.incoming() {
                let _ =
                    std::io::Write::write_all(&mut s.unwrap(), format!("backend-{i}").as_bytes());
            }
        });
    }
    let name = table_name();
    let nft = Nft::in_netns(&host.netns_path()).unwrap();
    let t = model(
        &name,
        &[
            (
                key([10, 43, 0, 10], 80),
                vec![(p.ip, ports[0]), (p.ip, ports[1])],
            ),
            (key([10, 43, 0, 11], 80), vec![]),
        ],
    );
    nft.apply(&t).unwrap();

    let (seen, refused_in) = in_netns(&host, || {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from(([10, 43, 0, 10], 80)),
                Duration::from_secs(5),
            )
            .unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).unwrap();
            seen.insert(buf);
        }
        let t = Instant::now();
        let err = TcpStream::connect_timeout(
            &SocketAddr::from(([10, 43, 0, 11], 80)),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        (seen, t.elapsed())
    });
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["backend-0", "backend-1"]
    );
    assert!(
        refused_in < Duration::from_millis(500),
        "refusal took {refused_in:?}"
    );

    // Hairpin: the backend reaches itself through its service (masqueraded via the mark).
    net.enable_ip_forwarding().unwrap();
    let hairpin = in_netns(&pod, || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([10, 43, 0, 10], 80)),
            Duration::from_secs(5),
        )
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    });
    assert!(hairpin.starts_with("backend-"), "{hairpin}");
    // Another pod on the same bridge reaches the service (replies cross the bridge directly,
    // so they must pass netfilter to be un-DNATed).
    net.enable_bridge_netfilter().unwrap();
    let brnf = in_netns(&host, || {
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").unwrap()
    });
    assert_eq!(brnf.trim(), "1");
    let client = netns_node("client");
    net.attach("client", &client.netns_path(), "eth0").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    in_netns(&client, || {
        for _ in 0..20 {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from(([10, 43, 0, 10], 80)),
                Duration::from_secs(5),
            )
            .unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).unwrap();
            seen.insert(buf);
        }
    });
    assert_eq!(seen.len(), 2, "{seen:?}");
    net.detach("client", &client.netns_path()).unwrap();

    nft.delete_table(Family::Inet, &name).unwrap();
    net.delete_service_route(service_cidr).unwrap();
    net.delete_service_route(service_cidr).unwrap();
    net.detach("backend", &pod.netns_path()).unwrap();
    net.delete_bridge().unwrap();
}

#[test]
fn thousand_services_with_ten_endpoints_apply_and_reapply_identically() {
    let ns = netns_node("nft-big");
    let nft = Nft::in_netns(&ns.netns_path()).unwrap();
    let name = table_name();
    let svcs: Vec<_> = (0..1000u32)
        .map(|i| {
            let eps = (0..10u32)
                .map(|j| (Ipv4Addr::from(0x0a2a_0000 + i * 10 + j + 2), 8080))
                .collect();
            (key([10, 43, (i / 250) as u8, (i % 250) as u8 + 1], 80), eps)
        })
        .collect();
    let t = model(&name, &svcs);
    let started = Instant::now();
    nft.apply(&t).unwrap();
    let first = started.elapsed();
    let started = Instant::now();
    nft.apply(&t).unwrap();
    let second = started.elapsed();
    eprintln!(
        "nft apply, 1,000 services x 10 endpoints ({} chains): first {first:?}, re-apply {second:?}",
        t.chains.len()
    );
    let listing = nft.list_json(Family::Inet, &name).unwrap().unwrap();
    let chains = listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("chain").is_some())
        .count();
    assert_eq!(chains, t.chains.len());
    nft.delete_table(Family::Inet, &name).unwrap();
    assert!(!nft.table_exists(Family::Inet, &name).unwrap());
}
