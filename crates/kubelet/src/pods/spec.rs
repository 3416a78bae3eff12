//! Pure translations of pod spec pieces: resource quantities, QoS class, `$(VAR)` expansion,
//! /etc/hosts and /etc/resolv.conf contents, downward API field paths.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A quantity as a number of base units (bytes, cores) times 1000 (milli-units).
pub fn quantity_milli(q: &Quantity) -> Option<i128> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: f64 = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with('e') || e.starts_with('E') => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    Some((n * mult * 1000.0).round() as i128)
}

/// Bytes of a memory quantity.
pub fn quantity_bytes(q: &Quantity) -> Option<i64> {
    quantity_milli(q).map(|m| (m / 1000) as i64)
}

/// The pod's QoS class.
pub fn qos_class(pod: &Pod) -> &'static str {
    let Some(spec) = pod.spec.as_ref() else {
        return "BestEffort";
    };
    let all: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &all {
        let res = c.resources.as_ref();
        let req = res.and_then(|r| r.requests.as_ref());
        let lim = res.and_then(|r| r.limits.as_ref());
        for k in ["cpu", "memory"] {
            let r = req
                .and_then(|m| m.get(k))
                .or_else(|| lim.and_then(|m| m.get(k)));
            let l = lim.and_then(|m| m.get(k));
            if r.is_some() || l.is_some() {
                any = true;
            }
            match (r, l) {
                (Some(r), Some(l)) if quantity_milli(r) == quantity_milli(l) => {}
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Expands `$(VAR)` references from `vars`; `$$(X)` escapes to `$(X)`; unknown references stay
/// as written (as Kubernetes does).
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'('
                && let Some(end) = s[i + 2..].find(')')
            {
                let name = &s[i + 2..i + 2 + end];
                match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&s[i..i + 3 + end]),
                }
                i += 3 + end;
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\0');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

/// `/etc/hosts` for a pod.
pub fn hosts_file(pod: &Pod, pod_ip: Option<&str>) -> String {
    let spec = pod.spec.as_ref();
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let hostname = spec
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| name.to_string());
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if let Some(ip) = pod_ip {
        let fqdn = match (
            spec.and_then(|s| s.subdomain.as_deref()),
            pod.metadata.namespace.as_deref(),
        ) {
            (Some(sub), Some(ns)) if !sub.is_empty() => {
                format!("{hostname}.{sub}.{ns}.svc.cluster.local\t")
            }
            _ => String::new(),
        };
        s.push_str(&format!("{ip}\t{fqdn}{hostname}\n"));
    }
    for a in spec
        .and_then(|s| s.host_aliases.as_ref())
        .into_iter()
        .flatten()
    {
        let names = a.hostnames.clone().unwrap_or_default().join("\t");
        s.push_str(&format!(
            "\n# Entries added by HostAliases.\n{}\t{names}\n",
            a.ip
        ));
    }
    s
}

/// `/etc/resolv.conf` for a pod, given the node's own resolv.conf text.
pub fn resolv_conf(pod: &Pod, cluster_dns: &str, domain: &str, host_resolv: &str) -> String {
    let spec = pod.spec.as_ref();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let host_net = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut servers: Vec<String> = Vec::new();
    let mut search: Vec<String> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let host_servers = || -> Vec<String> {
        host_resolv
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver"))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.starts_with("127.") && v != "::1")
            .collect()
    };
    let host_search = || -> Vec<String> {
        host_resolv
            .lines()
            .filter_map(|l| l.strip_prefix("search"))
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    let cluster_first = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_net,
        _ => false,
    };
    if cluster_first {
        servers = vec![cluster_dns.to_string()];
        search = vec![
            format!("{ns}.svc.{domain}"),
            format!("svc.{domain}"),
            domain.to_string(),
        ];
        search.extend(host_search());
        options = vec!["ndots:5".into()];
    } else if policy != "None" {
        servers = host_servers();
        search = host_search();
    }
    if let Some(c) = spec.and_then(|s| s.dns_config.as_ref()) {
        servers.extend(c.nameservers.clone().unwrap_or_default());
        search.extend(c.searches.clone().unwrap_or_default());
        for o in c.options.iter().flatten() {
            let Some(name) = o.name.clone() else { continue };
            options.retain(|x| x.split(':').next() != Some(name.as_str()));
            options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    let mut out = String::new();
    for s in servers.iter().take(3) {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

/// The value of a downward-API field path (`metadata.name`, `metadata.labels['k']`, ...).
pub fn field_value(pod: &Pod, path: &str, node_name: &str, host_ip: &str) -> Option<String> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let map_key = |prefix: &str| -> Option<String> {
        path.strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")
            .map(str::to_string)
    };
    if let Some(k) = map_key("metadata.labels") {
        return Some(m.labels.as_ref()?.get(&k)?.clone());
    }
    if let Some(k) = map_key("metadata.annotations") {
        return Some(m.annotations.as_ref()?.get(&k)?.clone());
    }
    let kv = |map: Option<&BTreeMap<String, String>>| -> String {
        map.map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v:?}\n"))
                .collect::<String>()
        })
        .unwrap_or_default()
    };
    Some(match path {
        "metadata.name" => m.name.clone()?,
        "metadata.namespace" => m.namespace.clone()?,
        "metadata.uid" => m.uid.clone()?,
        "metadata.labels" => kv(m.labels.as_ref()),
        "metadata.annotations" => kv(m.annotations.as_ref()),
        "spec.nodeName" => spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| node_name.into()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone())?,
        "status.hostIP" => host_ip.to_string(),
        "status.hostIPs" => host_ip.to_string(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.podIPs" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        _ => return None,
    })
}

/// The value of a `resourceFieldRef` (`limits.memory`, `requests.cpu`, ...), with divisor.
pub fn resource_value(
    c: &Container,
    resource: &str,
    divisor: Option<&Quantity>,
    node_alloc_cpu_milli: i128,
    node_alloc_mem: i128,
) -> Option<String> {
    let res = c.resources.as_ref();
    let (kind, name) = resource.split_once('.')?;
    let map = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return None,
    };
    let v = match map.and_then(|m| m.get(name)).and_then(quantity_milli) {
        Some(v) => v,
        None if kind == "limits" && name == "cpu" => node_alloc_cpu_milli,
        None if kind == "limits" && name == "memory" => node_alloc_mem * 1000,
        None => 0,
    };
    let div = divisor
        .and_then(quantity_milli)
        .filter(|d| *d > 0)
        .unwrap_or(1000);
    // Round up, as the kubelet does.
    Some(((v + div - 1) / div).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};
    use kube::api::ObjectMeta;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_milli(&q("500m")), Some(500));
        assert_eq!(quantity_milli(&q("2")), Some(2000));
        assert_eq!(quantity_bytes(&q("64Mi")), Some(64 << 20));
        assert_eq!(quantity_bytes(&q("1G")), Some(1_000_000_000));
        assert_eq!(quantity_bytes(&q("1e3")), Some(1000));
        assert_eq!(quantity_milli(&q("abc")), None);
    }

    #[test]
    fn expansion() {
        let vars = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)", &vars), "x-$(B)-$(A)");
        assert_eq!(expand("é$(A", &vars), "é$(A");
    }

    fn pod(containers: Vec<Container>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers,
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn qos() {
        let c = |req: &[(&str, &str)], lim: &[(&str, &str)]| Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: Some(req.iter().map(|(k, v)| (k.to_string(), q(v))).collect()),
                limits: Some(lim.iter().map(|(k, v)| (k.to_string(), q(v))).collect()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(qos_class(&pod(vec![c(&[], &[])])), "BestEffort");
        assert_eq!(
            qos_class(&pod(vec![c(&[], &[("cpu", "1"), ("memory", "1Gi")])])),
            "Guaranteed"
        );
        assert_eq!(qos_class(&pod(vec![c(&[("cpu", "1")], &[])])), "Burstable");
    }

    #[test]
    fn resolv_cluster_first() {
        let p = pod(vec![]);
        let r = resolv_conf(&p, "10.43.0.10", "cluster.local", "nameserver 1.1.1.1\n");
        assert_eq!(
            r,
            "nameserver 10.43.0.10\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        let mut p = pod(vec![]);
        if let Some(s) = p.spec.as_mut() {
            s.dns_policy = Some("Default".into());
        }
        let r = resolv_conf(&p, "10.43.0.10", "cluster.local", "nameserver 1.1.1.1\n");
        assert_eq!(r, "nameserver 1.1.1.1\n");
    }

    #[test]
    fn hosts_has_pod_ip_and_name() {
        let h = hosts_file(&pod(vec![]), Some("10.42.0.5"));
        assert!(h.contains("10.42.0.5\tp\n"), "{h}");
        assert!(h.contains("127.0.0.1\tlocalhost"));
    }

    #[test]
    fn fields() {
        let mut p = pod(vec![]);
        p.metadata.labels = Some(BTreeMap::from([("app".into(), "web".into())]));
        assert_eq!(
            field_value(&p, "metadata.name", "n", "1.2.3.4").as_deref(),
            Some("p")
        );
        assert_eq!(
            field_value(&p, "metadata.labels['app']", "n", "").as_deref(),
            Some("web")
        );
        assert_eq!(
            field_value(&p, "metadata.labels", "n", "").as_deref(),
            Some("app=\"web\"\n")
        );
        assert_eq!(
            field_value(&p, "status.hostIP", "n", "1.2.3.4").as_deref(),
            Some("1.2.3.4")
        );
    }
}
