//! Request metrics served at `/metrics` in the Prometheus text format:
//! `apiserver_request_total{verb,resource,code}` and the
//! `apiserver_request_duration_seconds{verb,resource}` histogram.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket upper bounds (seconds), as kube-apiserver's request duration buckets.
const BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Request counters and latency histograms.
#[derive(Default)]
pub(crate) struct Metrics {
    totals: Mutex<BTreeMap<(String, String, u16), u64>>,
    durations: Mutex<BTreeMap<(String, String), Histogram>>,
}

/// kube-apiserver's verb for a request: LIST/WATCH for collection GETs, else the method.
pub(crate) fn verb(method: &http::Method, path: &str, query: Option<&str>) -> &'static str {
    let watch = query.is_some_and(|q| {
        q.split('&')
            .any(|p| p == "watch=1" || p == "watch=true" || p == "watch")
    });
    match *method {
        http::Method::GET if watch => "WATCH",
        http::Method::GET if is_collection(path) => "LIST",
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE if is_collection(path) => "DELETECOLLECTION",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// The resource segments of an API path: (resource, name present, subresource).
fn resource_parts(path: &str) -> Option<(String, bool, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.as_slice() {
        ["api", _v, rest @ ..] => rest,
        ["apis", _g, _v, rest @ ..] => rest,
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, "status" | "finalize"] => rest.to_vec(),
        ["namespaces", _ns, r, tail @ ..] => {
            let mut v = vec![*r];
            v.extend_from_slice(tail);
            v
        }
        other => other.to_vec(),
    };
    match rest.as_slice() {
        [] => None,
        [r] => Some((r.to_string(), false, None)),
        [r, _name] => Some((r.to_string(), true, None)),
        [r, _name, sub, ..] => Some((r.to_string(), true, Some(sub.to_string()))),
    }
}

fn is_collection(path: &str) -> bool {
    matches!(resource_parts(path), Some((_, false, _)))
}

/// The `resource` label: `pods`, `pods/log`, or empty for non-resource paths.
pub(crate) fn resource(path: &str) -> String {
    match resource_parts(path) {
        Some((r, _, Some(sub))) => format!("{r}/{sub}"),
        Some((r, _, None)) => r,
        None => String::new(),
    }
}

impl Metrics {
    /// Records one finished request.
    pub(crate) fn observe(&self, verb: &str, resource: &str, code: u16, took: Duration) {
        if let Ok(mut t) = self.totals.lock() {
            *t.entry((verb.to_string(), resource.to_string(), code))
                .or_default() += 1;
        }
        // Watches and streams last as long as the client wants; kube-apiserver leaves them out.
        if verb == "WATCH" {
            return;
        }
        let secs = took.as_secs_f64();
        if let Ok(mut d) = self.durations.lock() {
            let h = d
                .entry((verb.to_string(), resource.to_string()))
                .or_insert_with(|| Histogram {
                    counts: vec![0; BUCKETS.len()],
                    ..Default::default()
                });
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += secs;
            h.count += 1;
        }
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP apiserver_request_total Counter of apiserver requests broken out by verb, resource and HTTP response code.\n");
        out.push_str("# TYPE apiserver_request_total counter\n");
        if let Ok(t) = self.totals.lock() {
            for ((verb, resource, code), n) in t.iter() {
                let _ = writeln!(
                    out,
                    "apiserver_request_total{{code=\"{code}\",resource=\"{resource}\",verb=\"{verb}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP apiserver_request_duration_seconds Response latency distribution in seconds for each verb and resource.\n");
        out.push_str("# TYPE apiserver_request_duration_seconds histogram\n");
        if let Ok(d) = self.durations.lock() {
            for ((verb, resource), h) in d.iter() {
                let labels = format!("resource=\"{resource}\",verb=\"{verb}\"");
                for (i, b) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "apiserver_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "apiserver_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    out,
                    "apiserver_request_duration_seconds_sum{{{labels}}} {}",
                    h.sum
                );
                let _ = writeln!(
                    out,
                    "apiserver_request_duration_seconds_count{{{labels}}} {}",
                    h.count
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn verbs_and_resources() {
        let p = "/api/v1/namespaces/default/pods";
        assert_eq!(verb(&Method::GET, p, None), "LIST");
        assert_eq!(verb(&Method::GET, p, Some("watch=1")), "WATCH");
        assert_eq!(verb(&Method::GET, &format!("{p}/x"), None), "GET");
        assert_eq!(verb(&Method::DELETE, p, None), "DELETECOLLECTION");
        assert_eq!(resource(&format!("{p}/x/log")), "pods/log");
        assert_eq!(resource("/apis/apps/v1/deployments"), "deployments");
        assert_eq!(resource("/api/v1/nodes/n1/status"), "nodes/status");
        assert_eq!(resource("/healthz"), "");
        assert_eq!(resource("/api/v1/namespaces"), "namespaces");
        assert_eq!(resource("/api/v1/namespaces/default"), "namespaces");
        assert_eq!(
            resource("/api/v1/namespaces/default/finalize"),
            "namespaces/finalize"
        );
    }

    #[test]
    fn exposition() {
        let m = Metrics::default();
        m.observe("LIST", "pods", 200, Duration::from_millis(3));
        m.observe("LIST", "pods", 200, Duration::from_millis(30));
        m.observe("WATCH", "pods", 200, Duration::from_secs(300));
        let text = m.render();
        assert!(
            text.contains(
                "apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"LIST\"} 2"
            )
        );
        assert!(text.contains("apiserver_request_duration_seconds_bucket{resource=\"pods\",verb=\"LIST\",le=\"0.005\"} 1"));
        assert!(text.contains("apiserver_request_duration_seconds_bucket{resource=\"pods\",verb=\"LIST\",le=\"0.05\"} 2"));
        assert!(text.contains(
            "apiserver_request_duration_seconds_count{resource=\"pods\",verb=\"LIST\"} 2"
        ));
        assert!(!text.contains(
            "apiserver_request_duration_seconds_count{resource=\"pods\",verb=\"WATCH\"}"
        ));
        assert!(
            text.contains(
                "apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"WATCH\"} 1"
            )
        );
    }
}
