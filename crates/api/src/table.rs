//! Server-side printing: `meta.k8s.io/v1` Table columns and cells for the common built-in kinds
//! (kube-apiserver's columns), NAME/AGE for the rest.

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::meta::{age, lookup, lookup_string};

/// One column definition: (name, type, priority).
type Col = (&'static str, &'static str, u8);

/// Column definitions of `kind` (in `group`).
pub fn columns(group: &str, kind: &str) -> Vec<Col> {
    let name = ("Name", "string", 0);
    let age = ("Age", "string", 0);
    match (group, kind) {
        ("", "Pod") => vec![
            name,
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            age,
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        ("", "Namespace") => vec![name, ("Status", "string", 0), age],
        ("", "ConfigMap") => vec![name, ("Data", "integer", 0), age],
        ("", "Secret") => vec![name, ("Type", "string", 0), ("Data", "integer", 0), age],
        ("", "Service") => vec![
            name,
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            age,
            ("Selector", "string", 1),
        ],
        ("", "Endpoints") => vec![name, ("Endpoints", "string", 0), age],
        ("", "Node") => vec![
            name,
            ("Status", "string", 0),
            ("Roles", "string", 0),
            age,
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        ("", "Event") => vec![
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        ("apps", "Deployment") => vec![
            name,
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("apps", "ReplicaSet") => vec![
            name,
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("apps", "StatefulSet") => vec![
            name,
            ("Ready", "string", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
        ],
        ("apps", "DaemonSet") => vec![
            name,
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Node Selector", "string", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("batch", "Job") => vec![
            name,
            ("Status", "string", 0),
            ("Completions", "string", 0),
            ("Duration", "string", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("batch", "CronJob") => vec![
            name,
            ("Schedule", "string", 0),
            ("Timezone", "string", 0),
            ("Suspend", "boolean", 0),
            ("Active", "integer", 0),
            ("Last Schedule", "string", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("policy", "PodDisruptionBudget") => vec![
            name,
            ("Min Available", "string", 0),
            ("Max Unavailable", "string", 0),
            ("Allowed Disruptions", "integer", 0),
            age,
        ],
        _ => vec![name, ("Age", "date", 0)],
    }
}

/// The `columnDefinitions` array.
pub fn column_definitions(group: &str, kind: &str) -> Value {
    Value::Array(
        columns(group, kind)
            .into_iter()
            .map(|(n, t, p)| {
                let mut c = json!({"name": n, "type": t, "format": "", "description": n, "priority": p});
                if n == "Name" {
                    c["format"] = json!("name");
                    c["description"] = json!("Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names");
                }
                c
            })
            .collect(),
    )
}

fn int(obj: &Value, path: &str) -> i64 {
    lookup(obj, path).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn containers_images(obj: &Value, path: &str) -> (String, String) {
    let cs = lookup(obj, path)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<String> = cs.iter().map(|c| lookup_string(c, "name")).collect();
    let images: Vec<String> = cs.iter().map(|c| lookup_string(c, "image")).collect();
    (names.join(","), images.join(","))
}

fn selector_string(sel: Option<&Value>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let mut parts = Vec::new();
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in ml {
            parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    if let Some(me) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in me {
            let key = lookup_string(e, "key");
            let vals: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            match lookup_string(e, "operator").as_str() {
                "In" => parts.push(format!("{key} in ({})", vals.join(","))),
                "NotIn" => parts.push(format!("{key} notin ({})", vals.join(","))),
                "Exists" => parts.push(key),
                "DoesNotExist" => parts.push(format!("!{key}")),
                _ => {}
            }
        }
    }
    or_none(parts.join(","))
}

fn map_selector(m: Option<&Value>) -> String {
    let parts: Vec<String> = m
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    or_none(parts.join(","))
}

fn pod_cells(obj: &Value, now: OffsetDateTime) -> Vec<Value> {
    let total = lookup(obj, "spec.containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let statuses = lookup(obj, "status.containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = statuses
        .iter()
        .filter(|s| s.get("ready") == Some(&json!(true)))
        .count();
    let restarts: i64 = statuses.iter().map(|s| int(s, "restartCount")).sum();
    let mut reason = lookup_string(obj, "status.reason");
    if reason.is_empty() {
        reason = lookup_string(obj, "status.phase");
    }
    for s in &statuses {
        let w = lookup_string(s, "state.waiting.reason");
        let t = lookup_string(s, "state.terminated.reason");
        if !w.is_empty() {
            reason = w;
        } else if !t.is_empty() {
            reason = t;
        }
    }
    if crate::meta::meta_str(obj, "deletionTimestamp").is_some() {
        reason = "Terminating".into();
    }
    vec![
        json!(crate::meta::name(obj)),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts.to_string()),
        json!(age(obj, now)),
        json!(or_none(lookup_string(obj, "status.podIP"))),
        json!(or_none(lookup_string(obj, "spec.nodeName"))),
        json!(or_none(lookup_string(obj, "status.nominatedNodeName"))),
        json!("<none>"),
    ]
}

fn service_ports(obj: &Value) -> String {
    let ports = lookup(obj, "spec.ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let parts: Vec<String> = ports
        .iter()
        .map(|p| {
            let np = int(p, "nodePort");
            let proto = lookup_string(p, "protocol");
            if np > 0 {
                format!("{}:{np}/{proto}", int(p, "port"))
            } else {
                format!("{}/{proto}", int(p, "port"))
            }
        })
        .collect();
    or_none(parts.join(","))
}

fn node_cells(obj: &Value, now: OffsetDateTime) -> Vec<Value> {
    let conds = lookup(obj, "status.conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut status = match conds.iter().find(|c| lookup_string(c, "type") == "Ready") {
        Some(c) if lookup_string(c, "status") == "True" => "Ready".to_string(),
        _ => "NotReady".to_string(),
    };
    if lookup(obj, "spec.unschedulable") == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = crate::meta::labels(obj)
        .keys()
        .filter_map(|k| {
            k.strip_prefix("node-role.kubernetes.io/")
                .map(str::to_string)
        })
        .collect();
    roles.sort();
    let addrs = lookup(obj, "status.addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let addr = |t: &str| {
        or_none(
            addrs
                .iter()
                .find(|a| lookup_string(a, "type") == t)
                .map(|a| lookup_string(a, "address"))
                .unwrap_or_default(),
        )
    };
    vec![
        json!(crate::meta::name(obj)),
        json!(status),
        json!(or_none(roles.join(","))),
        json!(age(obj, now)),
        json!(lookup_string(obj, "status.nodeInfo.kubeletVersion")),
        json!(addr("InternalIP")),
        json!(addr("ExternalIP")),
        json!(lookup_string(obj, "status.nodeInfo.osImage")),
        json!(lookup_string(obj, "status.nodeInfo.kernelVersion")),
        json!(lookup_string(
            obj,
            "status.nodeInfo.containerRuntimeVersion"
        )),
    ]
}

/// The cells of one row.
pub fn cells(group: &str, kind: &str, obj: &Value, now: OffsetDateTime) -> Vec<Value> {
    let name = json!(crate::meta::name(obj));
    let a = json!(age(obj, now));
    let count = |field: &str| {
        obj.get(field)
            .and_then(Value::as_object)
            .map_or(0, |m| m.len())
            + if field == "data" {
                obj.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len())
            } else {
                0
            }
    };
    match (group, kind) {
        ("", "Pod") => pod_cells(obj, now),
        ("", "Namespace") => vec![name, json!(lookup_string(obj, "status.phase")), a],
        ("", "ConfigMap") => vec![name, json!(count("data")), a],
        ("", "Secret") => {
            let n = obj
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
            vec![name, json!(lookup_string(obj, "type")), json!(n), a]
        }
        ("", "Service") => {
            let t = lookup_string(obj, "spec.type");
            let ext = lookup(obj, "spec.externalIPs")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            // As kubectl's printer: a LoadBalancer shows its ingress addresses (then any
            // externalIPs), `<pending>` while it has none.
            let lb = lookup(obj, "status.loadBalancer.ingress")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|i| {
                            i.get("ip")
                                .or_else(|| i.get("hostname"))
                                .and_then(Value::as_str)
                                .filter(|s| !s.is_empty())
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let ext = match t.as_str() {
                "LoadBalancer" => match (lb.is_empty(), ext.is_empty()) {
                    (true, true) => "<pending>".to_string(),
                    (false, true) => lb,
                    (true, false) => ext,
                    (false, false) => format!("{lb},{ext}"),
                },
                "ExternalName" => lookup_string(obj, "spec.externalName"),
                _ if ext.is_empty() => "<none>".to_string(),
                _ => ext,
            };
            vec![
                name,
                json!(t),
                json!(or_none(lookup_string(obj, "spec.clusterIP"))),
                json!(ext),
                json!(service_ports(obj)),
                a,
                json!(map_selector(lookup(obj, "spec.selector"))),
            ]
        }
        ("", "Endpoints") => {
            let mut eps = Vec::new();
            for s in obj
                .get("subsets")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                let ports = s
                    .get("ports")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for addr in s
                    .get("addresses")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                {
                    let ip = lookup_string(&addr, "ip");
                    if ports.is_empty() {
                        eps.push(ip.clone());
                    }
                    for p in &ports {
                        eps.push(format!("{ip}:{}", int(p, "port")));
                    }
                }
            }
            vec![name, json!(or_none(eps.join(","))), a]
        }
        ("", "Node") => node_cells(obj, now),
        ("", "Event") => {
            let last = lookup(obj, "lastTimestamp")
                .and_then(Value::as_str)
                .or_else(|| lookup(obj, "eventTime").and_then(Value::as_str))
                .and_then(crate::meta::parse_time)
                .map(|t| crate::meta::human_duration((now - t).whole_seconds()))
                .unwrap_or_else(|| age(obj, now));
            let object = format!(
                "{}/{}",
                lookup_string(obj, "involvedObject.kind").to_lowercase(),
                lookup_string(obj, "involvedObject.name")
            );
            vec![
                json!(last),
                json!(lookup_string(obj, "type")),
                json!(lookup_string(obj, "reason")),
                json!(object),
                json!(lookup_string(obj, "message")),
            ]
        }
        ("apps", "Deployment") => {
            let (c, i) = containers_images(obj, "spec.template.spec.containers");
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(obj, "status.readyReplicas"),
                    int(obj, "spec.replicas")
                )),
                json!(int(obj, "status.updatedReplicas")),
                json!(int(obj, "status.availableReplicas")),
                a,
                json!(c),
                json!(i),
                json!(selector_string(lookup(obj, "spec.selector"))),
            ]
        }
        ("apps", "ReplicaSet") => {
            let (c, i) = containers_images(obj, "spec.template.spec.containers");
            vec![
                name,
                json!(int(obj, "spec.replicas")),
                json!(int(obj, "status.replicas")),
                json!(int(obj, "status.readyReplicas")),
                a,
                json!(c),
                json!(i),
                json!(selector_string(lookup(obj, "spec.selector"))),
            ]
        }
        ("apps", "StatefulSet") => {
            let (c, i) = containers_images(obj, "spec.template.spec.containers");
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(obj, "status.readyReplicas"),
                    int(obj, "spec.replicas")
                )),
                a,
                json!(c),
                json!(i),
            ]
        }
        ("apps", "DaemonSet") => {
            let (c, i) = containers_images(obj, "spec.template.spec.containers");
            vec![
                name,
                json!(int(obj, "status.desiredNumberScheduled")),
                json!(int(obj, "status.currentNumberScheduled")),
                json!(int(obj, "status.numberReady")),
                json!(int(obj, "status.updatedNumberScheduled")),
                json!(int(obj, "status.numberAvailable")),
                json!(map_selector(lookup(obj, "spec.template.spec.nodeSelector"))),
                a,
                json!(c),
                json!(i),
                json!(selector_string(lookup(obj, "spec.selector"))),
            ]
        }
        ("batch", "Job") => {
            let (c, i) = containers_images(obj, "spec.template.spec.containers");
            let conds = lookup(obj, "status.conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let has = |t: &str| {
                conds
                    .iter()
                    .any(|c| lookup_string(c, "type") == t && lookup_string(c, "status") == "True")
            };
            let status = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else if lookup(obj, "spec.suspend") == Some(&json!(true)) {
                "Suspended"
            } else {
                "Running"
            };
            let completions = match lookup(obj, "spec.completions").and_then(Value::as_i64) {
                Some(n) => format!("{}/{n}", int(obj, "status.succeeded")),
                None => format!(
                    "{}/1 of {}",
                    int(obj, "status.succeeded"),
                    int(obj, "spec.parallelism")
                ),
            };
            let start = lookup(obj, "status.startTime")
                .and_then(Value::as_str)
                .and_then(crate::meta::parse_time);
            let end = lookup(obj, "status.completionTime")
                .and_then(Value::as_str)
                .and_then(crate::meta::parse_time);
            let duration = match start {
                Some(s) => crate::meta::human_duration((end.unwrap_or(now) - s).whole_seconds()),
                None => String::new(),
            };
            vec![
                name,
                json!(status),
                json!(completions),
                json!(duration),
                a,
                json!(c),
                json!(i),
                json!(selector_string(lookup(obj, "spec.selector"))),
            ]
        }
        ("batch", "CronJob") => {
            let (c, i) = containers_images(obj, "spec.jobTemplate.spec.template.spec.containers");
            let last = lookup(obj, "status.lastScheduleTime")
                .and_then(Value::as_str)
                .and_then(crate::meta::parse_time)
                .map(|t| crate::meta::human_duration((now - t).whole_seconds()))
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                json!(lookup_string(obj, "spec.schedule")),
                json!(or_none(lookup_string(obj, "spec.timeZone"))),
                json!(lookup(obj, "spec.suspend") == Some(&json!(true))),
                json!(
                    lookup(obj, "status.active")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len)
                ),
                json!(last),
                a,
                json!(c),
                json!(i),
                json!(selector_string(lookup(
                    obj,
                    "spec.jobTemplate.spec.selector"
                ))),
            ]
        }
        ("policy", "PodDisruptionBudget") => {
            // An int-or-string field as kubectl prints it; N/A when unset.
            let ios = |path: &str| match lookup(obj, path) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => "N/A".to_string(),
            };
            vec![
                name,
                json!(ios("spec.minAvailable")),
                json!(ios("spec.maxUnavailable")),
                json!(int(obj, "status.disruptionsAllowed")),
                a,
            ]
        }
        _ => vec![
            name,
            json!(crate::meta::meta_str(obj, "creationTimestamp").unwrap_or_default()),
        ],
    }
}

/// The row object: PartialObjectMetadata (default) or the full object (`includeObject=Object`).
pub fn row(
    group: &str,
    kind: &str,
    obj: &Value,
    include_object: &str,
    now: OffsetDateTime,
) -> Value {
    let object = match include_object {
        "Object" => obj.clone(),
        "None" => Value::Null,
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        }),
    };
    let mut r = json!({"cells": cells(group, kind, obj, now)});
    if !object.is_null() {
        r["object"] = object;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_row() {
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}], "nodeName": "n1"},
            "status": {"phase": "Running", "containerStatuses": [{"ready": true, "restartCount": 2}]}});
        let c = cells("", "Pod", &pod, OffsetDateTime::now_utc());
        assert_eq!(c[1], "1/1");
        assert_eq!(c[2], "Running");
        assert_eq!(c[3], "2");
        assert_eq!(c[6], "n1");
        assert_eq!(columns("", "Pod").len(), c.len());
    }

    #[test]
    fn load_balancer_external_ip_is_its_ingress() {
        let now = OffsetDateTime::now_utc();
        let ext = |svc: Value| cells("", "Service", &svc, now)[3].clone();
        let spec = json!({"type": "LoadBalancer", "clusterIP": "10.43.0.5"});
        assert_eq!(ext(json!({"spec": spec})), json!("<pending>"));
        assert_eq!(
            ext(
                json!({"spec": spec, "status": {"loadBalancer": {"ingress": [
                {"ip": "192.0.2.2"}, {"hostname": "lb.example"}]}}})
            ),
            json!("192.0.2.2,lb.example")
        );
        let with_ext = json!({"type": "LoadBalancer", "externalIPs": ["198.51.100.1"]});
        assert_eq!(ext(json!({"spec": with_ext})), json!("198.51.100.1"));
        assert_eq!(
            ext(json!({"spec": with_ext,
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.2"}]}}})),
            json!("192.0.2.2,198.51.100.1")
        );
        assert_eq!(ext(json!({"spec": {"type": "ClusterIP"}})), json!("<none>"));
    }

    #[test]
    fn column_counts_match() {
        let now = OffsetDateTime::now_utc();
        for (g, k) in [
            ("", "Namespace"),
            ("", "ConfigMap"),
            ("", "Secret"),
            ("", "Service"),
            ("", "Endpoints"),
            ("", "Node"),
            ("", "Event"),
            ("apps", "Deployment"),
            ("apps", "ReplicaSet"),
            ("apps", "StatefulSet"),
            ("apps", "DaemonSet"),
            ("batch", "Job"),
            ("batch", "CronJob"),
            ("policy", "PodDisruptionBudget"),
            ("x", "Other"),
        ] {
            assert_eq!(
                columns(g, k).len(),
                cells(g, k, &json!({}), now).len(),
                "{k}"
            );
        }
    }
}
