//! The cluster zone: records built from Services, EndpointSlices and Pods (A/AAAA, SRV, PTR,
//! CNAME, headless and StatefulSet hostnames), and the lookup that tells answers, NODATA and
//! NXDOMAIN apart. Pure: no I/O.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// (target name, address, (port name, protocol, port)) of a ready endpoint.
type Endpoint = (String, IpAddr, Vec<(String, String, u16)>);

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What a lookup in the cluster zone found.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Records for the name and type.
    Records(Vec<Record>),
    /// An alias (ExternalName): the CNAME record, whatever type was asked.
    Alias(Box<Record>),
    /// The name exists, not with this type.
    NoData,
    /// No such name.
    NxDomain,
    /// Not ours (forward it).
    NotOurs,
}

/// All records of the cluster domain, keyed by lowercase FQDN (with the trailing dot).
#[derive(Debug, Default)]
pub struct Zone {
    domain: String,
    ttl: u32,
    records: HashMap<(String, RecordType), Vec<Record>>,
    names: HashSet<String>,
    soa: Option<Record>,
}

fn fqdn(s: &str) -> String {
    let mut s = s.to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    }
}

fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

impl Zone {
    /// An empty zone for `domain` (e.g. `cluster.local`) with record TTL `ttl`.
    pub fn empty(domain: &str, ttl: u32) -> Zone {
        let domain = fqdn(domain);
        let soa = Name::from_ascii(&domain).ok().map(|origin| {
            let mname =
                Name::from_ascii(format!("ns.dns.{domain}")).unwrap_or_else(|_| origin.clone());
            let rname =
                Name::from_ascii(format!("hostmaster.{domain}")).unwrap_or_else(|_| origin.clone());
            Record::from_rdata(
                origin,
                ttl,
                RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, ttl)),
            )
        });
        let mut z = Zone {
            domain,
            ttl,
            soa,
            ..Zone::default()
        };
        let d = z.domain.clone();
        for n in [format!("svc.{d}"), format!("pod.{d}")] {
            z.names.insert(n);
        }
        z.names.insert(d);
        z
    }

    /// The SOA record (for the authority section of NODATA/NXDOMAIN answers).
    pub fn soa(&self) -> Option<&Record> {
        self.soa.as_ref()
    }

    /// Whether `name` (lowercase FQDN) is inside the cluster domain.
    pub fn is_ours(&self, name: &str) -> bool {
        name == self.domain || name.ends_with(&format!(".{}", self.domain))
    }

    fn add(&mut self, name: &str, rdata: RData) {
        let Ok(n) = Name::from_ascii(name) else {
            return;
        };
        let rtype = rdata.record_type();
        let rec = Record::from_rdata(n, self.ttl, rdata);
        let list = self.records.entry((name.to_string(), rtype)).or_default();
        if !list.contains(&rec) {
            list.push(rec);
        }
        // the name and its ancestors inside the domain exist (empty non-terminals: NODATA)
        if name.ends_with(&self.domain) {
            let mut cur = name;
            while cur.len() > self.domain.len() {
                self.names.insert(cur.to_string());
                match cur.find('.') {
                    Some(i) => cur = &cur[i + 1..],
                    None => break,
                }
            }
        } else {
            self.names.insert(name.to_string());
        }
    }

    fn add_addr(&mut self, name: &str, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.add(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(name, RData::AAAA(AAAA(v6))),
        }
    }

    fn add_ptr(&mut self, ip: IpAddr, target: &str) {
        let rev = reverse_name(ip);
        if self.records.contains_key(&(rev.clone(), RecordType::PTR)) {
            return;
        }
        if let Ok(t) = Name::from_ascii(target) {
            self.add(&rev, RData::PTR(PTR(t)));
        }
    }

    /// Builds the zone from the API objects.
    pub fn build(
        domain: &str,
        ttl: u32,
        services: &[Service],
        slices: &[EndpointSlice],
        pods: &[Pod],
    ) -> Zone {
        let mut z = Zone::empty(domain, ttl);
        let d = z.domain.clone();
        let mut by_svc: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
        for s in slices {
            if let Some(name) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                let ns = s.metadata.namespace.clone().unwrap_or_default();
                by_svc.entry((ns, name.clone())).or_default().push(s);
            }
        }
        let mut headless: BTreeSet<(String, String)> = BTreeSet::new();
        for svc in services {
            let ns = svc.metadata.namespace.clone().unwrap_or_default();
            let name = svc.metadata.name.clone().unwrap_or_default();
            let Some(spec) = &svc.spec else { continue };
            let base = fqdn(&format!("{name}.{ns}.svc.{d}"));
            z.names.insert(format!("{ns}.svc.{d}"));
            if spec.type_.as_deref() == Some("ExternalName") {
                if let Some(target) = spec.external_name.as_deref()
                    && let Ok(t) = Name::from_ascii(fqdn(target))
                {
                    z.add(&base, RData::CNAME(CNAME(t)));
                }
                continue;
            }
            let cluster_ips: Vec<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            let is_headless = spec.cluster_ip.as_deref() == Some("None");
            // (target name, ip, port-by-name) of ready endpoints
            let mut eps: Vec<Endpoint> = Vec::new();
            for slice in by_svc
                .get(&(ns.clone(), name.clone()))
                .into_iter()
                .flatten()
            {
                let ports: Vec<(String, String, u16)> = slice
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| {
                        Some((
                            p.name.clone().unwrap_or_default(),
                            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                            u16::try_from(p.port?).ok()?,
                        ))
                    })
                    .collect();
                for ep in &slice.endpoints {
                    if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    for a in &ep.addresses {
                        let Ok(ip) = a.parse::<IpAddr>() else {
                            continue;
                        };
                        let host = ep.hostname.clone().unwrap_or_else(|| dashed(ip));
                        eps.push((fqdn(&format!("{host}.{base}")), ip, ports.clone()));
                    }
                }
            }
            if is_headless {
                headless.insert((ns.clone(), name.clone()));
                z.names.insert(base.clone());
                for (target, ip, _) in &eps {
                    z.add_addr(&base, *ip);
                    z.add_addr(target, *ip);
                    z.add_ptr(*ip, target);
                }
            } else {
                for ip in &cluster_ips {
                    z.add_addr(&base, *ip);
                    z.add_ptr(*ip, &base);
                }
                if cluster_ips.is_empty() {
                    z.names.insert(base.clone());
                }
            }
            for sp in spec.ports.iter().flatten() {
                let Some(pname) = sp.name.as_deref().filter(|n| !n.is_empty()) else {
                    continue;
                };
                let proto = sp.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
                let srv_name = fqdn(&format!("_{pname}._{proto}.{base}"));
                if is_headless {
                    let n = eps.len().max(1) as u16;
                    for (target, _, ports) in &eps {
                        let Some((_, _, port)) = ports
                            .iter()
                            .find(|(n2, p, _)| n2 == pname && p.eq_ignore_ascii_case(&proto))
                        else {
                            continue;
                        };
                        if let Ok(t) = Name::from_ascii(target) {
                            z.add(&srv_name, RData::SRV(SRV::new(0, 100 / n, *port, t)));
                        }
                    }
                } else if !cluster_ips.is_empty()
                    && let (Ok(t), Ok(port)) = (Name::from_ascii(&base), u16::try_from(sp.port))
                {
                    z.add(&srv_name, RData::SRV(SRV::new(0, 100, port, t)));
                }
            }
        }
        // Pods: hostname.subdomain records (subdomain = a headless service) and PTR for pod IPs.
        for pod in pods {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let ips: Vec<IpAddr> = pod
                .status
                .as_ref()
                .map(|s| {
                    s.pod_ips
                        .iter()
                        .flatten()
                        .map(|p| p.ip.clone())
                        .chain(s.pod_ip.clone())
                        .filter_map(|ip| ip.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            if ips.is_empty()
                || pod
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.host_network == Some(true))
            {
                continue;
            }
            if let Some(spec) = &pod.spec
                && let (Some(host), Some(sub)) = (&spec.hostname, &spec.subdomain)
                && headless.contains(&(ns.clone(), sub.clone()))
            {
                let name = fqdn(&format!("{host}.{sub}.{ns}.svc.{d}"));
                for ip in &ips {
                    z.add_addr(&name, *ip);
                    z.add_ptr(*ip, &name);
                }
            }
            for ip in &ips {
                let name = fqdn(&format!("{}.{ns}.pod.{d}", dashed(*ip)));
                z.add_ptr(*ip, &name);
            }
        }
        z
    }

    /// Looks `name` (lowercase FQDN) up for `rtype`.
    pub fn lookup(&self, name: &str, rtype: RecordType) -> Answer {
        if !self.is_ours(name) {
            return match self.records.get(&(name.to_string(), rtype)) {
                Some(r) if rtype == RecordType::PTR => Answer::Records(r.clone()),
                _ => Answer::NotOurs,
            };
        }
        if let Some(r) = self.records.get(&(name.to_string(), rtype)) {
            return Answer::Records(r.clone());
        }
        if let Some(c) = self
            .records
            .get(&(name.to_string(), RecordType::CNAME))
            .and_then(|r| r.first())
        {
            return Answer::Alias(Box::new(c.clone()));
        }
        if rtype == RecordType::SOA && name == self.domain {
            return match &self.soa {
                Some(s) => Answer::Records(vec![s.clone()]),
                None => Answer::NoData,
            };
        }
        // `1-2-3-4.<ns>.pod.<domain>`: any IP-shaped name answers (CoreDNS "pods insecure").
        let pod_suffix = format!(".pod.{}", self.domain);
        if let Some(rest) = name.strip_suffix(&pod_suffix)
            && let Some((first, ns)) = rest.split_once('.')
            && !ns.contains('.')
            && let Ok(ip) = first.replace('-', ".").parse::<Ipv4Addr>()
        {
            {
                return match rtype {
                    RecordType::A => match Name::from_ascii(name) {
                        Ok(n) => {
                            Answer::Records(vec![Record::from_rdata(n, self.ttl, RData::A(A(ip)))])
                        }
                        Err(_) => Answer::NxDomain,
                    },
                    _ => Answer::NoData,
                };
            }
        }
        if self.names.contains(name) {
            Answer::NoData
        } else {
            Answer::NxDomain
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn zone() -> Zone {
        let svcs: Vec<Service> = serde_json::from_value(json!([
            {"metadata": {"name": "web", "namespace": "default"},
             "spec": {"clusterIP": "10.43.0.20", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}},
            {"metadata": {"name": "nginx", "namespace": "default"},
             "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}},
            {"metadata": {"name": "ext", "namespace": "default"},
             "spec": {"type": "ExternalName", "externalName": "example.org"}}
        ]))
        .unwrap();
        let slices: Vec<EndpointSlice> = serde_json::from_value(json!([
            {"metadata": {"name": "nginx-1", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "nginx"}},
             "addressType": "IPv4",
             "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
             "endpoints": [{"addresses": ["10.42.0.5"], "hostname": "web-0"},
                           {"addresses": ["10.42.0.6"], "conditions": {"ready": false}}]}
        ]))
        .unwrap();
        let pods: Vec<Pod> = serde_json::from_value(json!([
            {"metadata": {"name": "web-1", "namespace": "default"},
             "spec": {"hostname": "web-1", "subdomain": "nginx", "containers": []},
             "status": {"podIP": "10.42.0.7"}}
        ]))
        .unwrap();
        Zone::build("cluster.local", 5, &svcs, &slices, &pods)
    }

    fn ips(a: Answer) -> Vec<String> {
        match a {
            Answer::Records(r) => r.iter().map(|r| r.data.to_string()).collect(),
            other => panic!("expected records, got {other:?}"),
        }
    }

    #[test]
    fn services_headless_pods_and_nodata() {
        let z = zone();
        assert_eq!(
            ips(z.lookup("web.default.svc.cluster.local.", RecordType::A)),
            ["10.43.0.20"]
        );
        assert_eq!(
            ips(z.lookup("nginx.default.svc.cluster.local.", RecordType::A)),
            ["10.42.0.5"]
        );
        assert_eq!(
            ips(z.lookup("web-0.nginx.default.svc.cluster.local.", RecordType::A)),
            ["10.42.0.5"]
        );
        assert_eq!(
            ips(z.lookup("web-1.nginx.default.svc.cluster.local.", RecordType::A)),
            ["10.42.0.7"]
        );
        assert_eq!(
            ips(z.lookup("1-2-3-4.default.pod.cluster.local.", RecordType::A)),
            ["1.2.3.4"]
        );
        assert_eq!(
            ips(z.lookup("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV)),
            ["0 100 80 web.default.svc.cluster.local."]
        );
        assert_eq!(
            ips(z.lookup(
                "_http._tcp.nginx.default.svc.cluster.local.",
                RecordType::SRV
            )),
            ["0 100 8080 web-0.nginx.default.svc.cluster.local."]
        );
        assert_eq!(
            ips(z.lookup("20.0.43.10.in-addr.arpa.", RecordType::PTR)),
            ["web.default.svc.cluster.local."]
        );
        assert_eq!(
            ips(z.lookup("7.0.42.10.in-addr.arpa.", RecordType::PTR)),
            ["web-1.nginx.default.svc.cluster.local."]
        );
        assert!(matches!(
            z.lookup("ext.default.svc.cluster.local.", RecordType::A),
            Answer::Alias(_)
        ));
        assert_eq!(
            z.lookup("web.default.svc.cluster.local.", RecordType::AAAA),
            Answer::NoData
        );
        assert_eq!(
            z.lookup("default.svc.cluster.local.", RecordType::A),
            Answer::NoData
        );
        assert_eq!(
            z.lookup("nope.default.svc.cluster.local.", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(z.lookup("example.org.", RecordType::A), Answer::NotOurs);
        assert_eq!(
            z.lookup("9.9.9.9.in-addr.arpa.", RecordType::PTR),
            Answer::NotOurs
        );
    }
}
