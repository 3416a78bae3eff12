//! `/stats/summary` (the Summary API JSON: node, pods, containers with cpu and memory) and
//! `/metrics/resource` (Prometheus text for metrics-server), from the runtime's cgroup stats and
//! the host's /proc.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};
use skiff_runtime::Runtime;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::PodLookup;

/// Previous cumulative CPU samples, for `usageNanoCores`.
#[derive(Debug, Default)]
pub struct CpuSamples(Mutex<HashMap<String, (Instant, u64)>>);

impl CpuSamples {
    /// Records `usage_ns` for `key`; returns the rate since the previous sample (ns per second).
    fn rate(&self, key: &str, usage_ns: u64) -> Option<u64> {
        let now = Instant::now();
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prev = m.insert(key.to_string(), (now, usage_ns));
        let (t, u) = prev?;
        let dt = now.duration_since(t).as_nanos();
        if dt == 0 || usage_ns < u {
            return None;
        }
        Some(((u128::from(usage_ns - u) * 1_000_000_000) / dt) as u64)
    }
}

/// One container's numbers.
#[derive(Debug, Clone)]
pub struct ContainerSample {
    /// container name
    pub name: String,
    /// start time (ns since the epoch)
    pub started_ns: Option<i64>,
    /// cumulative cpu time (ns)
    pub cpu_ns: u64,
    /// memory usage
    pub memory_bytes: u64,
    /// working set
    pub working_set_bytes: u64,
}

/// One pod's numbers.
#[derive(Debug, Clone)]
pub struct PodSample {
    /// namespace
    pub namespace: String,
    /// name
    pub name: String,
    /// uid
    pub uid: String,
    /// start time (RFC 3339), from the pod status
    pub start_time: Option<String>,
    /// containers with stats
    pub containers: Vec<ContainerSample>,
}

/// The node's numbers.
#[derive(Debug, Clone, Default)]
pub struct NodeSample {
    /// cumulative cpu time of all cpus (ns)
    pub cpu_ns: u64,
    /// MemTotal - MemFree
    pub memory_bytes: u64,
    /// MemTotal - MemAvailable
    pub working_set_bytes: u64,
    /// boot time (s since the epoch)
    pub boot_s: Option<i64>,
}

fn read_node() -> NodeSample {
    let mut n = NodeSample::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        for line in stat.lines() {
            if let Some(rest) = line.strip_prefix("cpu ") {
                // user nice system idle iowait irq softirq steal: busy = all but idle, iowait
                let v: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let busy: u64 = v
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
                    .map(|(_, x)| *x)
                    .sum();
                // USER_HZ is 100 on Linux
                n.cpu_ns = busy * 10_000_000;
            } else if let Some(rest) = line.strip_prefix("btime ") {
                n.boot_s = rest.trim().parse().ok();
            }
        }
    }
    if let Ok(mi) = std::fs::read_to_string("/proc/meminfo") {
        let get = |k: &str| {
            mi.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|x| x.parse::<u64>().ok())
                .map(|kb| kb * 1024)
        };
        let total = get("MemTotal:").unwrap_or(0);
        n.memory_bytes = total.saturating_sub(get("MemFree:").unwrap_or(0));
        n.working_set_bytes = total.saturating_sub(get("MemAvailable:").unwrap_or(0));
    }
    n
}

/// Collects the numbers of every pod on the node.
pub async fn collect(runtime: &Arc<dyn Runtime>, pods: &Arc<dyn PodLookup>) -> Vec<PodSample> {
    let mut out = Vec::new();
    for p in pods.pods() {
        let meta = &p.pod.metadata;
        let mut sample = PodSample {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            start_time: p
                .pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .and_then(|t| serde_json::to_value(t).ok())
                .and_then(|v| v.as_str().map(str::to_string)),
            containers: Vec::new(),
        };
        for c in &p.containers {
            let Some(id) = &c.id else { continue };
            let Ok(st) = runtime.container_status(id).await else {
                continue;
            };
            if st.state != skiff_runtime::ContainerState::Running {
                continue;
            }
            let Ok(stats) = runtime.container_stats(id).await else {
                continue;
            };
            sample.containers.push(ContainerSample {
                name: c.name.clone(),
                started_ns: st.started_at,
                cpu_ns: stats.cpu_usage_ns,
                memory_bytes: stats.memory_usage_bytes,
                working_set_bytes: stats.memory_working_set_bytes,
            });
        }
        out.push(sample);
    }
    out
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn ns_time(ns: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .map(rfc3339)
        .unwrap_or_default()
}

fn cpu_json(now: &str, cpu_ns: u64, rate: Option<u64>) -> Value {
    let mut v = json!({"time": now, "usageCoreNanoSeconds": cpu_ns});
    if let Some(r) = rate {
        v["usageNanoCores"] = json!(r);
    }
    v
}

fn mem_json(now: &str, usage: u64, ws: u64) -> Value {
    json!({"time": now, "usageBytes": usage, "workingSetBytes": ws})
}

/// The Summary API document.
pub async fn summary(
    runtime: &Arc<dyn Runtime>,
    pods: &Arc<dyn PodLookup>,
    samples: &CpuSamples,
    node_name: &str,
) -> Value {
    let now = rfc3339(OffsetDateTime::now_utc());
    let node = read_node();
    let mut pod_docs = Vec::new();
    for p in collect(runtime, pods).await {
        let mut containers = Vec::new();
        let (mut cpu, mut mem, mut ws) = (0u64, 0u64, 0u64);
        for c in &p.containers {
            cpu += c.cpu_ns;
            mem += c.memory_bytes;
            ws += c.working_set_bytes;
            let key = format!("{}/{}", p.uid, c.name);
            let mut doc = json!({
                "name": c.name,
                "cpu": cpu_json(&now, c.cpu_ns, samples.rate(&key, c.cpu_ns)),
                "memory": mem_json(&now, c.memory_bytes, c.working_set_bytes),
            });
            if let Some(s) = c.started_ns {
                doc["startTime"] = json!(ns_time(s));
            }
            containers.push(doc);
        }
        let mut doc = json!({
            "podRef": {"name": p.name, "namespace": p.namespace, "uid": p.uid},
            "containers": containers,
            "cpu": cpu_json(&now, cpu, samples.rate(&p.uid, cpu)),
            "memory": mem_json(&now, mem, ws),
        });
        if let Some(t) = p.start_time {
            doc["startTime"] = json!(t);
        }
        pod_docs.push(doc);
    }
    let mut node_doc = json!({
        "nodeName": node_name,
        "cpu": cpu_json(&now, node.cpu_ns, samples.rate("\0node", node.cpu_ns)),
        "memory": mem_json(&now, node.memory_bytes, node.working_set_bytes),
    });
    if let Some(b) = node.boot_s {
        node_doc["startTime"] = json!(ns_time(b.saturating_mul(1_000_000_000)));
    }
    json!({"node": node_doc, "pods": pod_docs})
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `/metrics/resource` Prometheus text.
pub async fn resource_metrics(runtime: &Arc<dyn Runtime>, pods: &Arc<dyn PodLookup>) -> String {
    let ts = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let node = read_node();
    let pods = collect(runtime, pods).await;
    let mut s = String::new();
    let header = |s: &mut String, name: &str, help: &str, ty: &str| {
        let _ = writeln!(s, "# HELP {name} [STABLE] {help}");
        let _ = writeln!(s, "# TYPE {name} {ty}");
    };
    header(
        &mut s,
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the container in core-seconds",
        "counter",
    );
    for p in &pods {
        for c in &p.containers {
            let _ = writeln!(
                s,
                "container_cpu_usage_seconds_total{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {} {ts}",
                label(&c.name),
                label(&p.namespace),
                label(&p.name),
                c.cpu_ns as f64 / 1e9
            );
        }
    }
    header(
        &mut s,
        "container_memory_working_set_bytes",
        "Current working set of the container in bytes",
        "gauge",
    );
    for p in &pods {
        for c in &p.containers {
            let _ = writeln!(
                s,
                "container_memory_working_set_bytes{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {} {ts}",
                label(&c.name),
                label(&p.namespace),
                label(&p.name),
                c.working_set_bytes
            );
        }
    }
    header(
        &mut s,
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds",
        "gauge",
    );
    for p in &pods {
        for c in &p.containers {
            if let Some(st) = c.started_ns {
                let _ = writeln!(
                    s,
                    "container_start_time_seconds{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {} {ts}",
                    label(&c.name),
                    label(&p.namespace),
                    label(&p.name),
                    st as f64 / 1e9
                );
            }
        }
    }
    header(
        &mut s,
        "node_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the node in core-seconds",
        "counter",
    );
    let _ = writeln!(
        s,
        "node_cpu_usage_seconds_total {} {ts}",
        node.cpu_ns as f64 / 1e9
    );
    header(
        &mut s,
        "node_memory_working_set_bytes",
        "Current working set of the node in bytes",
        "gauge",
    );
    let _ = writeln!(
        s,
        "node_memory_working_set_bytes {} {ts}",
        node.working_set_bytes
    );
    header(
        &mut s,
        "pod_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the pod in core-seconds",
        "counter",
    );
    for p in &pods {
        let cpu: u64 = p.containers.iter().map(|c| c.cpu_ns).sum();
        let _ = writeln!(
            s,
            "pod_cpu_usage_seconds_total{{namespace=\"{}\",pod=\"{}\"}} {} {ts}",
            label(&p.namespace),
            label(&p.name),
            cpu as f64 / 1e9
        );
    }
    header(
        &mut s,
        "pod_memory_working_set_bytes",
        "Current working set of the pod in bytes",
        "gauge",
    );
    for p in &pods {
        let ws: u64 = p.containers.iter().map(|c| c.working_set_bytes).sum();
        let _ = writeln!(
            s,
            "pod_memory_working_set_bytes{{namespace=\"{}\",pod=\"{}\"}} {ws} {ts}",
            label(&p.namespace),
            label(&p.name),
        );
    }
    header(
        &mut s,
        "scrape_error",
        "1 if there was an error while getting container metrics, 0 otherwise",
        "gauge",
    );
    let _ = writeln!(s, "scrape_error 0");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_numbers_come_from_proc() {
        let n = read_node();
        assert!(
            n.cpu_ns > 0 && n.working_set_bytes > 0 && n.boot_s.is_some(),
            "{n:?}"
        );
    }

    #[test]
    fn cpu_rate_needs_two_samples() {
        let s = CpuSamples::default();
        assert_eq!(s.rate("a", 1_000), None);
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert!(s.rate("a", 10_000_000).unwrap() > 0);
    }
}
