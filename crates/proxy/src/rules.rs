//! Services + EndpointSlices → the `inet skiff` nftables model: one verdict map dispatches
//! `VIP . proto . port` to a per-service-port chain that DNATs with one `numgen` rule; services
//! without usable endpoints land in a second map read by filter chains that REJECT (or drop, for
//! traffic policies `Local` with no local endpoint). Pure: no I/O, deterministic output.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};
use skiff_net::Ipv4Cidr;
use skiff_net::nft::{
    BaseChain, Chain, ChainKind, Family, Hook, Map, Match, Policy, Proto, RejectKind, Rule,
    ServiceKey, Set, SetElement, SetKind, Stmt, Table, Verdict,
};

use crate::ProxyConfig;

/// The map `VIP . proto . port → goto chain` read by the nat chains.
pub const SERVICES_MAP: &str = "services";
/// The map `VIP . proto . port → reject/drop` read by the filter chains.
pub const NO_ENDPOINTS_MAP: &str = "no-endpoints";
/// The set of `endpoint . endpoint` pairs that are masqueraded (a pod reaching itself).
pub const HAIRPIN_SET: &str = "hairpin";
const REJECT_CHAIN: &str = "refuse";
const DNS_CHAIN: &str = "cluster-dns";
/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const DEFAULT_AFFINITY_SECS: i32 = 10800;

/// One ready endpoint for one service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Backend {
    addr: Ipv4Addr,
    port: u16,
    local: bool,
}

fn proto_of(p: Option<&str>) -> Option<Proto> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => Some(Proto::Sctp),
        _ => None,
    }
}

fn short_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..6])
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

/// Ready IPv4 endpoints of `svc`'s port `sp`, from the slices labelled with the service's name.
fn backends(
    cfg: &ProxyConfig,
    sp: &ServicePort,
    proto: Proto,
    slices: &[&EndpointSlice],
) -> Vec<Backend> {
    let want_name = sp.name.as_deref().unwrap_or("");
    let mut out = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == want_name
                && proto_of(p.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            let local = ep.node_name.as_deref() == Some(cfg.node_name.as_str());
            for a in &ep.addresses {
                if let Ok(addr) = a.parse::<Ipv4Addr>() {
                    out.insert(Backend { addr, port, local });
                }
            }
        }
    }
    out.into_iter().collect()
}

struct Builder<'a> {
    cfg: &'a ProxyConfig,
    table: Table,
    services: BTreeMap<ServiceKey, Verdict>,
    no_endpoints: BTreeMap<ServiceKey, Verdict>,
    hairpin: BTreeSet<SetElement>,
}

impl Builder<'_> {
    /// Rules that spread over `idx` of `all` (per-endpoint chains for session affinity).
    fn spread(
        &mut self,
        proto: Proto,
        all: &[Backend],
        idx: &[usize],
        affinity: Option<&[String]>,
        mark: bool,
    ) -> Vec<Rule> {
        let mark_stmt = || {
            if mark {
                vec![Stmt::OrMark(self.cfg.masquerade_mark)]
            } else {
                vec![]
            }
        };
        match affinity {
            None => {
                let mut stmts = mark_stmt();
                stmts.push(Stmt::DnatSpread(
                    idx.iter().map(|i| (all[*i].addr, all[*i].port)).collect(),
                ));
                vec![rule(vec![Match::Proto(proto)], stmts)]
            }
            Some(eps) => {
                let mut rules = Vec::with_capacity(idx.len() + 1);
                for i in idx {
                    let mut stmts = mark_stmt();
                    stmts.push(Stmt::Verdict(Verdict::Goto(eps[*i].clone())));
                    rules.push(rule(
                        vec![Match::SrcInSet(format!("af{}", &eps[*i][2..]))],
                        stmts,
                    ));
                }
                let mut stmts = mark_stmt();
                stmts.push(Stmt::Spread(idx.iter().map(|i| eps[*i].clone()).collect()));
                rules.push(rule(vec![], stmts));
                rules
            }
        }
    }

    fn add_service(&mut self, svc: &Service, slices: &[&EndpointSlice]) {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or("");
        let Some(spec) = &svc.spec else { return };
        if spec.type_.as_deref() == Some("ExternalName") {
            return;
        }
        let cluster_ip = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        let is_lb = spec.type_.as_deref() == Some("LoadBalancer");
        let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let affinity_secs = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_SECS)
                .clamp(1, 86400) as u32
        });
        let external_ips: Vec<Ipv4Addr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        for sp in spec.ports.iter().flatten() {
            let Some(proto) = proto_of(sp.protocol.as_deref()) else {
                continue;
            };
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let pname = sp.name.as_deref().unwrap_or("");
            let id = short_id(&[ns, name, pname, &proto.to_string()]);
            let comment = format!("{ns}/{name}:{pname}/{proto}");
            let all = backends(self.cfg, sp, proto, slices);
            let local: Vec<usize> = (0..all.len()).filter(|i| all[*i].local).collect();
            let every: Vec<usize> = (0..all.len()).collect();
            let internal_idx = if itp_local { &local } else { &every };
            let external_idx = if etp_local { &local } else { &every };

            let mut internal_keys = Vec::new();
            if let Some(ip) = cluster_ip {
                internal_keys.push(ServiceKey {
                    addr: ip,
                    proto,
                    port,
                });
            }
            let mut external_keys: Vec<ServiceKey> = external_ips
                .iter()
                .map(|ip| ServiceKey {
                    addr: *ip,
                    proto,
                    port,
                })
                .collect();
            for ip in &self.cfg.node_ips {
                if let Some(np) = sp.node_port.and_then(|p| u16::try_from(p).ok()) {
                    external_keys.push(ServiceKey {
                        addr: *ip,
                        proto,
                        port: np,
                    });
                }
                if is_lb {
                    external_keys.push(ServiceKey {
                        addr: *ip,
                        proto,
                        port,
                    });
                }
            }
            // NodePorts on 127.0.0.1: traffic from the node itself, always spread over every
            // endpoint and masqueraded (a reply to 127.0.0.1 could not leave the pod otherwise),
            // as kube-proxy treats node-local traffic under externalTrafficPolicy Local.
            let mut localhost_keys = Vec::new();
            if self.cfg.localhost_node_ports
                && let Some(np) = sp.node_port.and_then(|p| u16::try_from(p).ok())
            {
                let key = ServiceKey {
                    addr: Ipv4Addr::LOCALHOST,
                    proto,
                    port: np,
                };
                if etp_local {
                    localhost_keys.push(key);
                } else {
                    external_keys.push(key);
                }
            }
            if internal_keys.is_empty() && external_keys.is_empty() && localhost_keys.is_empty() {
                continue;
            }

            if all.is_empty() {
                for k in internal_keys
                    .into_iter()
                    .chain(external_keys)
                    .chain(localhost_keys)
                {
                    self.no_endpoints
                        .entry(k)
                        .or_insert_with(|| Verdict::Goto(REJECT_CHAIN.into()));
                }
                continue;
            }
            for b in &all {
                self.hairpin.insert(SetElement::AddrPair(b.addr, b.addr));
            }
            // Session affinity: one chain + one timed set per endpoint.
            let affinity_chains: Option<Vec<String>> = affinity_secs.map(|secs| {
                (0..all.len())
                    .map(|i| {
                        let chain = format!("ep-{id}-{i}");
                        let set = format!("af-{id}-{i}");
                        self.table.sets.push(Set {
                            name: set.clone(),
                            kind: SetKind::Addr,
                            timeout_secs: Some(secs),
                            elements: vec![],
                        });
                        self.table.chains.push(Chain {
                            name: chain.clone(),
                            base: None,
                            rules: vec![rule(
                                vec![Match::Proto(proto)],
                                vec![
                                    Stmt::UpdateSrcSet(set),
                                    Stmt::Dnat {
                                        addr: all[i].addr,
                                        port: Some(all[i].port),
                                    },
                                ],
                            )],
                        });
                        chain
                    })
                    .collect()
            });
            let aff = affinity_chains.as_deref();
            if !internal_keys.is_empty() {
                if internal_idx.is_empty() {
                    for k in internal_keys {
                        self.no_endpoints.entry(k).or_insert(Verdict::Drop);
                    }
                } else {
                    let chain = format!("svc-{id}");
                    let mut rules = self.spread(proto, &all, internal_idx, aff, false);
                    rules[0].comment = Some(comment.clone());
                    self.table.chains.push(Chain {
                        name: chain.clone(),
                        base: None,
                        rules,
                    });
                    for k in internal_keys {
                        self.services
                            .entry(k)
                            .or_insert_with(|| Verdict::Goto(chain.clone()));
                    }
                }
            }
            if !external_keys.is_empty() {
                if external_idx.is_empty() {
                    for k in external_keys {
                        self.no_endpoints.entry(k).or_insert(Verdict::Drop);
                    }
                } else {
                    let chain = format!("ext-{id}");
                    // Cluster policy: masquerade so replies come back through this node.
                    let mut rules = self.spread(proto, &all, external_idx, aff, !etp_local);
                    rules[0].comment = Some(comment.clone());
                    self.table.chains.push(Chain {
                        name: chain.clone(),
                        base: None,
                        rules,
                    });
                    for k in external_keys {
                        self.services
                            .entry(k)
                            .or_insert_with(|| Verdict::Goto(chain.clone()));
                    }
                }
            }
            if !localhost_keys.is_empty() {
                let chain = format!("loc-{id}");
                let mut rules = self.spread(proto, &all, &every, aff, true);
                rules[0].comment = Some(comment);
                self.table.chains.push(Chain {
                    name: chain.clone(),
                    base: None,
                    rules,
                });
                for k in localhost_keys {
                    self.services
                        .entry(k)
                        .or_insert_with(|| Verdict::Goto(chain.clone()));
                }
            }
        }
    }
}

/// Slices grouped by `namespace/service-name`.
fn slices_by_service(slices: &[EndpointSlice]) -> BTreeMap<(String, String), Vec<&EndpointSlice>> {
    let mut out: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        out.entry((ns, svc.clone())).or_default().push(s);
    }
    out
}

/// The whole table for these objects. Services are taken in `namespace/name` order, so the
/// first one claiming an address/port keeps it and the same objects always give the same table.
pub fn build_table(cfg: &ProxyConfig, services: &[Service], slices: &[EndpointSlice]) -> Table {
    let mut b = Builder {
        cfg,
        table: Table::new(Family::Inet, cfg.table.clone()),
        services: BTreeMap::new(),
        no_endpoints: BTreeMap::new(),
        hairpin: BTreeSet::new(),
    };
    let dispatch = |map: &str, new_only: bool| {
        vec![rule(
            if new_only { vec![Match::CtNew] } else { vec![] },
            vec![Stmt::DispatchMap(map.into())],
        )]
    };
    b.table.chains.push(base(
        "nat-prerouting",
        ChainKind::Nat,
        Hook::Prerouting,
        -100,
        dispatch(SERVICES_MAP, false),
    ));
    b.table.chains.push(base(
        "nat-output",
        ChainKind::Nat,
        Hook::Output,
        -100,
        dispatch(SERVICES_MAP, false),
    ));
    let mut post = vec![
        rule(
            vec![Match::MarkSet(cfg.masquerade_mark)],
            vec![Stmt::Masquerade],
        ),
        Rule {
            matches: vec![Match::CtDnat, Match::SrcDstInSet(HAIRPIN_SET.into())],
            stmts: vec![Stmt::Masquerade],
            comment: Some("hairpin: a pod reaching itself through a service".into()),
        },
    ];
    if let (Some(pod), Some(cluster)) = (cfg.pod_cidr, cfg.cluster_cidr) {
        post.push(Rule {
            matches: vec![Match::SrcIn(pod), Match::DstNotIn(cluster)],
            stmts: vec![Stmt::Masquerade],
            comment: Some("pod traffic leaving the cluster".into()),
        });
    }
    b.table.chains.push(base(
        "nat-postrouting",
        ChainKind::Nat,
        Hook::Postrouting,
        100,
        post,
    ));
    for (name, hook) in [
        ("filter-input", Hook::Input),
        ("filter-forward", Hook::Forward),
        ("filter-output", Hook::Output),
    ] {
        let mut rules = Vec::new();
        let loopback = Ipv4Cidr::new(Ipv4Addr::new(127, 0, 0, 0), 8).ok();
        if let (true, Hook::Input, Some(loopback)) = (cfg.localhost_node_ports, hook, loopback) {
            // With route_localnet on, a packet from another host addressed to 127.0.0.1 would
            // reach loopback-only listeners; kube-proxy drops those (CVE-2020-8558). Replies to
            // NATed connections are not `ct state new`, so localhost NodePorts keep working.
            rules.push(Rule {
                matches: vec![
                    Match::CtNew,
                    Match::SrcNotIn(loopback),
                    Match::DstIn(loopback),
                ],
                stmts: vec![Stmt::Verdict(Verdict::Drop)],
                comment: Some("block incoming localnet connections".into()),
            });
        }
        rules.extend(dispatch(NO_ENDPOINTS_MAP, true));
        b.table
            .chains
            .push(base(name, ChainKind::Filter, hook, -110, rules));
    }
    b.table.chains.push(Chain {
        name: REJECT_CHAIN.into(),
        base: None,
        rules: vec![
            rule(
                vec![Match::Proto(Proto::Tcp)],
                vec![Stmt::Reject(RejectKind::TcpReset)],
            ),
            rule(vec![], vec![Stmt::Reject(RejectKind::PortUnreachable)]),
        ],
    });
    if let (Some(vip), Some(target)) = (cfg.cluster_dns, cfg.dns_target) {
        let mut rules = Vec::new();
        for proto in [Proto::Udp, Proto::Tcp] {
            rules.push(Rule {
                matches: vec![Match::Proto(proto)],
                stmts: vec![Stmt::Dnat {
                    addr: target,
                    port: Some(cfg.dns_port),
                }],
                comment: Some("cluster DNS to the node-local server".into()),
            });
            b.services.insert(
                ServiceKey {
                    addr: vip,
                    proto,
                    port: 53,
                },
                Verdict::Goto(DNS_CHAIN.into()),
            );
        }
        b.table.chains.push(Chain {
            name: DNS_CHAIN.into(),
            base: None,
            rules,
        });
    }

    let grouped = slices_by_service(slices);
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let none = Vec::new();
    for svc in sorted {
        let key = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        let s = grouped.get(&key).unwrap_or(&none);
        b.add_service(svc, s);
    }
    b.table.maps.push(Map {
        name: SERVICES_MAP.into(),
        elements: std::mem::take(&mut b.services).into_iter().collect(),
    });
    b.table.maps.push(Map {
        name: NO_ENDPOINTS_MAP.into(),
        elements: std::mem::take(&mut b.no_endpoints).into_iter().collect(),
    });
    b.table.sets.push(Set {
        name: HAIRPIN_SET.into(),
        kind: SetKind::AddrPair,
        timeout_secs: None,
        elements: std::mem::take(&mut b.hairpin).into_iter().collect(),
    });
    b.table
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            node_name: "n1".into(),
            node_ips: vec![Ipv4Addr::new(192, 168, 1, 10)],
            dns_target: Some(Ipv4Addr::new(10, 42, 0, 1)),
            localhost_node_ports: true,
            ..ProxyConfig::default()
        }
    }

    fn svc(name: &str, spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec
        }))
        .unwrap()
    }

    fn slice(svc: &str, port: i32, eps: &[(&str, bool, &str)]) -> EndpointSlice {
        let endpoints: Vec<serde_json::Value> = eps
            .iter()
            .map(|(ip, ready, node)| {
                json!({"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": format!("{svc}-abc"), "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .unwrap()
    }

    fn web() -> Service {
        svc(
            "web",
            json!({"type": "NodePort", "clusterIP": "10.43.0.20",
                   "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}),
        )
    }

    #[test]
    fn cluster_ip_and_node_port_spread_over_ready_endpoints() {
        let s = slice(
            "web",
            8080,
            &[
                ("10.42.0.2", true, "n1"),
                ("10.42.0.3", true, "n2"),
                ("10.42.0.4", false, "n1"),
            ],
        );
        let text = build_table(&cfg(), &[web()], &[s]).render().unwrap();
        let id = short_id(&["default", "web", "http", "tcp"]);
        assert!(
            text.contains(&format!("10.43.0.20 . tcp . 80 : goto svc-{id}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("192.168.1.10 . tcp . 30080 : goto ext-{id}")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "add rule inet skiff svc-{id} meta l4proto tcp dnat ip to numgen random mod 2 map {{ 0 : 10.42.0.2 . 8080, 1 : 10.42.0.3 . 8080 }}"
        )), "{text}");
        // external traffic (policy Cluster) is marked for masquerade
        assert!(text.contains(&format!(
            "add rule inet skiff ext-{id} meta l4proto tcp meta mark set meta mark | 0x4000 dnat ip to numgen"
        )), "{text}");
        assert!(
            !text.contains("10.42.0.4"),
            "not-ready endpoint used: {text}"
        );
        assert!(
            text.contains("10.42.0.2 . 10.42.0.2"),
            "hairpin pair missing"
        );
        // the DNS VIP goes to the node-local server
        assert!(text.contains("10.43.0.10 . udp . 53 : goto cluster-dns"));
        assert!(text.contains("dnat ip to 10.42.0.1:53"));
    }

    #[test]
    fn no_ready_endpoints_rejects_and_external_name_has_no_rules() {
        let s = slice("web", 8080, &[("10.42.0.2", false, "n1")]);
        let ext = svc(
            "ext",
            json!({"type": "ExternalName", "externalName": "example.org"}),
        );
        let table = build_table(&cfg(), &[web(), ext], &[s]);
        let text = table.render().unwrap();
        assert!(
            text.contains("10.43.0.20 . tcp . 80 : goto refuse"),
            "{text}"
        );
        assert!(
            text.contains("192.168.1.10 . tcp . 30080 : goto refuse"),
            "{text}"
        );
        assert!(text.contains("add rule inet skiff refuse meta l4proto tcp reject with tcp reset"));
        assert!(!text.contains("example.org"));
        assert!(!text.contains("svc-"), "{text}");
    }

    #[test]
    fn traffic_policy_local_uses_local_endpoints_or_drops() {
        let mut s1 = web();
        let spec = s1.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.internal_traffic_policy = Some("Local".into());
        let eps = slice(
            "web",
            8080,
            &[("10.42.0.2", true, "n1"), ("10.42.0.3", true, "n2")],
        );
        let text = build_table(&cfg(), &[s1.clone()], &[eps]).render().unwrap();
        let id = short_id(&["default", "web", "http", "tcp"]);
        assert!(
            text.contains(&format!(
                "add rule inet skiff ext-{id} meta l4proto tcp dnat ip to 10.42.0.2:8080"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "add rule inet skiff svc-{id} meta l4proto tcp dnat ip to 10.42.0.2:8080"
            )),
            "{text}"
        );
        let remote_only = slice("web", 8080, &[("10.42.0.3", true, "n2")]);
        let text = build_table(&cfg(), &[s1], &[remote_only]).render().unwrap();
        assert!(text.contains("10.43.0.20 . tcp . 80 : drop"), "{text}");
        assert!(text.contains("192.168.1.10 . tcp . 30080 : drop"), "{text}");
    }

    #[test]
    fn session_affinity_and_load_balancer() {
        let lb = svc(
            "lb",
            json!({"type": "LoadBalancer", "clusterIP": "10.43.0.30", "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                   "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]}),
        );
        let eps = slice(
            "lb",
            8080,
            &[("10.42.0.2", true, "n1"), ("10.42.0.3", true, "n1")],
        );
        let text = build_table(&cfg(), &[lb], &[eps]).render().unwrap();
        let id = short_id(&["default", "lb", "http", "tcp"]);
        assert!(
            text.contains(&format!("192.168.1.10 . tcp . 8000 : goto ext-{id}")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "add set inet skiff af-{id}-0 {{ type ipv4_addr; flags dynamic,timeout; timeout 60s; }}"
        )), "{text}");
        assert!(
            text.contains(&format!(
                "add rule inet skiff svc-{id} ip saddr @af-{id}-1 goto ep-{id}-1"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "add rule inet skiff ep-{id}-0 meta l4proto tcp update @af-{id}-0 {{ ip saddr }} dnat ip to 10.42.0.2:8080"
        )), "{text}");
    }

    #[test]
    fn same_objects_give_the_same_table_in_any_order() {
        let a = slice(
            "web",
            8080,
            &[("10.42.0.3", true, "n1"), ("10.42.0.2", true, "n1")],
        );
        let other = svc(
            "aaa",
            json!({"clusterIP": "10.43.0.21", "ports": [{"name": "http", "port": 80}]}),
        );
        let t1 = build_table(&cfg(), &[web(), other.clone()], std::slice::from_ref(&a))
            .render()
            .unwrap();
        let t2 = build_table(&cfg(), &[other, web()], &[a]).render().unwrap();
        assert_eq!(t1, t2);
    }

    #[test]
    fn node_ports_answer_on_localhost_with_masquerade_and_a_martian_guard() {
        let s = slice("web", 8080, &[("10.42.0.2", true, "n2")]);
        let local = svc(
            "loc",
            json!({"type": "NodePort", "clusterIP": "10.43.0.21", "externalTrafficPolicy": "Local",
                   "ports": [{"name": "http", "port": 80, "nodePort": 30081, "protocol": "TCP"}]}),
        );
        let s2 = slice("loc", 8080, &[("10.42.0.2", true, "n2")]);
        let text = build_table(&cfg(), &[web(), local.clone()], &[s.clone(), s2.clone()])
            .render()
            .unwrap();
        let id = short_id(&["default", "web", "http", "tcp"]);
        assert!(
            text.contains(&format!("127.0.0.1 . tcp . 30080 : goto ext-{id}")),
            "{text}"
        );
        // Local policy with no endpoint on this node: the node address drops, but the node's
        // own traffic to 127.0.0.1 is spread over every endpoint and masqueraded.
        let lid = short_id(&["default", "loc", "http", "tcp"]);
        assert!(text.contains("192.168.1.10 . tcp . 30081 : drop"), "{text}");
        assert!(
            text.contains(&format!("127.0.0.1 . tcp . 30081 : goto loc-{lid}")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "add rule inet skiff loc-{lid} meta l4proto tcp meta mark set meta mark | 0x4000 dnat ip to 10.42.0.2:8080"
        )), "{text}");
        assert!(
            text.contains("add rule inet skiff filter-input ct state new ip saddr != 127.0.0.0/8 ip daddr 127.0.0.0/8 drop"),
            "{text}"
        );

        let off = ProxyConfig {
            localhost_node_ports: false,
            ..cfg()
        };
        let text = build_table(&off, &[web(), local], &[s, s2])
            .render()
            .unwrap();
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert!(!text.contains("127.0.0.0/8"), "{text}");
    }
}
