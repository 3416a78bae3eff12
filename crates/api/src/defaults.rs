//! Defaulting of built-in kinds: the defaults kube-apiserver fills in and users see in `-o yaml`.

use serde_json::{Map, Value, json};

fn set_default(m: &mut Map<String, Value>, key: &str, v: Value) {
    // Kubernetes defaulting treats an empty string like an unset field.
    if m.get(key)
        .is_none_or(|x| x.is_null() || x.as_str() == Some(""))
    {
        m.insert(key.to_string(), v);
    }
}

fn obj_at<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Map<String, Value>> {
    let mut cur = v;
    for p in path {
        cur = cur.get_mut(*p)?;
    }
    cur.as_object_mut()
}

fn ensure_obj<'a>(m: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Map<String, Value>> {
    let e = m.entry(key.to_string()).or_insert_with(|| json!({}));
    if e.is_null() {
        *e = json!({});
    }
    e.as_object_mut()
}

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_container(c: &mut Value) {
    let Some(m) = c.as_object_mut() else { return };
    let image = m
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    set_default(m, "imagePullPolicy", json!(image_pull_policy(&image)));
    set_default(m, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(m, "terminationMessagePolicy", json!("File"));
    set_default(m, "resources", json!({}));
    if let Some(ports) = m.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = m.get_mut(probe).and_then(Value::as_object_mut) {
            set_default(p, "timeoutSeconds", json!(1));
            set_default(p, "periodSeconds", json!(10));
            set_default(p, "successThreshold", json!(1));
            set_default(p, "failureThreshold", json!(3));
            if let Some(h) = p.get_mut("httpGet").and_then(Value::as_object_mut) {
                set_default(h, "path", json!("/"));
                set_default(h, "scheme", json!("HTTP"));
            }
        }
    }
}

/// Copies each `resources.limits` entry a container has no request for into
/// `resources.requests` (pods only; templates keep what the user wrote).
fn requests_from_limits(c: &mut Value) {
    let Some(res) = c.get_mut("resources").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(limits) = res.get("limits").and_then(Value::as_object).cloned() else {
        return;
    };
    if limits.is_empty() {
        return;
    }
    let Some(requests) = ensure_obj(res, "requests") else {
        return;
    };
    for (k, v) in limits {
        requests.entry(k).or_insert(v);
    }
}

/// The pod's QoS class from its containers' requests and limits (Guaranteed when every
/// container's cpu and memory requests equal set limits; BestEffort when none are set).
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten()
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let get = |kind: &str, r: &str| {
            c.pointer(&format!("/resources/{kind}/{r}"))
                .map(|v| v.to_string().trim_matches('"').to_string())
        };
        for r in ["cpu", "memory"] {
            let (req, lim) = (get("requests", r), get("limits", r));
            if req.is_some() || lim.is_some() {
                any = true;
            }
            match (req, lim) {
                (Some(a), Some(b)) if a == b => {}
                (None, Some(_)) => {}
                _ => guaranteed = false,
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// DefaultTolerationSeconds admission: a new pod that does not already tolerate the
/// `node.kubernetes.io/not-ready` / `unreachable` NoExecute taints gets a 300 s toleration of each.
pub fn default_toleration_seconds(pod: &mut Value) {
    let Some(spec) = obj_at(pod, &["spec"]) else {
        return;
    };
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    let Some(list) = tolerations.as_array_mut() else {
        return;
    };
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let tolerated = list.iter().any(|t| {
            let k = t.get("key").and_then(Value::as_str).unwrap_or("");
            let e = t.get("effect").and_then(Value::as_str).unwrap_or("");
            (k == key || k.is_empty()) && (e == "NoExecute" || e.is_empty())
        });
        if !tolerated {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
}

/// Defaults a PodSpec (pods and every pod template).
pub fn default_pod_spec(spec: &mut Map<String, Value>) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    for key in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(key).and_then(Value::as_array_mut) {
            cs.iter_mut().for_each(default_container);
        }
    }
    if let Some(vols) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in vols.iter_mut().filter_map(Value::as_object_mut) {
            for (src, field) in [("configMap", "defaultMode"), ("secret", "defaultMode")] {
                if let Some(s) = v.get_mut(src).and_then(Value::as_object_mut) {
                    set_default(s, field, json!(420));
                }
            }
        }
    }
}

fn default_template(obj: &mut Value, path: &[&str]) {
    if let Some(spec) = obj_at(obj, path) {
        default_pod_spec(spec);
    }
}

/// A Job without `manualSelector: true` gets a selector on its own uid and the matching
/// template labels (`batch.kubernetes.io/controller-uid`, `batch.kubernetes.io/job-name` and the
/// legacy `controller-uid`, `job-name`), as kube-apiserver's Job strategy does on create.
fn job_selector(obj: &mut Value) {
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string);
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string);
    let (Some(uid), Some(name)) = (uid, name) else {
        return;
    };
    let Some(spec) = obj_at(obj, &["spec"]) else {
        return;
    };
    if spec.get("manualSelector") == Some(&json!(true))
        || spec.get("selector").is_some_and(|s| !s.is_null())
    {
        return;
    }
    spec.insert(
        "selector".into(),
        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
    );
    let Some(tmpl) = ensure_obj(spec, "template") else {
        return;
    };
    let Some(meta) = ensure_obj(tmpl, "metadata") else {
        return;
    };
    let Some(labels) = ensure_obj(meta, "labels") else {
        return;
    };
    for (k, v) in [
        ("batch.kubernetes.io/controller-uid", &uid),
        ("batch.kubernetes.io/job-name", &name),
        ("controller-uid", &uid),
        ("job-name", &name),
    ] {
        labels.entry(k).or_insert_with(|| json!(v));
    }
}

/// Applies the defaults of `kind` (in `group`) to a new or updated object.
pub fn apply_defaults(group: &str, kind: &str, obj: &mut Value) {
    match (group, kind) {
        ("", "Pod") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                default_pod_spec(spec);
                set_default(spec, "enableServiceLinks", json!(true));
                set_default(spec, "serviceAccountName", json!("default"));
                let sa = spec
                    .get("serviceAccountName")
                    .cloned()
                    .unwrap_or(json!("default"));
                set_default(spec, "serviceAccount", sa);
                for key in ["containers", "initContainers"] {
                    if let Some(cs) = spec.get_mut(key).and_then(Value::as_array_mut) {
                        cs.iter_mut().for_each(requests_from_limits);
                    }
                }
            }
            let qos = obj.get("spec").map(qos_class).unwrap_or("BestEffort");
            if let Some(o) = obj.as_object_mut()
                && let Some(st) = ensure_obj(o, "status")
            {
                set_default(st, "phase", json!("Pending"));
                set_default(st, "qosClass", json!(qos));
            }
        }
        ("", "PodTemplate") => default_template(obj, &["template", "spec"]),
        ("scheduling.k8s.io", "PriorityClass") => {
            if let Some(o) = obj.as_object_mut() {
                set_default(o, "preemptionPolicy", json!("PreemptLowerPriority"));
            }
        }
        ("", "ReplicationController") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "replicas", json!(1));
            }
            default_template(obj, &["spec", "template", "spec"]);
        }
        ("apps", "Deployment") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "replicas", json!(1));
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(spec, "progressDeadlineSeconds", json!(600));
                if let Some(st) = ensure_obj(spec, "strategy") {
                    set_default(st, "type", json!("RollingUpdate"));
                    if st.get("type") == Some(&json!("RollingUpdate"))
                        && let Some(ru) = ensure_obj(st, "rollingUpdate")
                    {
                        set_default(ru, "maxUnavailable", json!("25%"));
                        set_default(ru, "maxSurge", json!("25%"));
                    }
                }
            }
            default_template(obj, &["spec", "template", "spec"]);
        }
        ("apps", "ReplicaSet") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "replicas", json!(1));
            }
            default_template(obj, &["spec", "template", "spec"]);
        }
        ("apps", "StatefulSet") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "replicas", json!(1));
                set_default(spec, "podManagementPolicy", json!("OrderedReady"));
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(
                    spec,
                    "updateStrategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
                );
                set_default(
                    spec,
                    "persistentVolumeClaimRetentionPolicy",
                    json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
                );
            }
            default_template(obj, &["spec", "template", "spec"]);
        }
        ("apps", "DaemonSet") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(
                    spec,
                    "updateStrategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
                );
            }
            default_template(obj, &["spec", "template", "spec"]);
        }
        ("batch", "Job") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                if spec.get("completions").is_none() && spec.get("parallelism").is_none() {
                    spec.insert("completions".into(), json!(1));
                }
                set_default(spec, "parallelism", json!(1));
                set_default(spec, "backoffLimit", json!(6));
                set_default(spec, "completionMode", json!("NonIndexed"));
                set_default(spec, "suspend", json!(false));
                set_default(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
            }
            job_selector(obj);
            default_template(obj, &["spec", "template", "spec"]);
        }
        ("batch", "CronJob") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "concurrencyPolicy", json!("Allow"));
                set_default(spec, "suspend", json!(false));
                set_default(spec, "successfulJobsHistoryLimit", json!(3));
                set_default(spec, "failedJobsHistoryLimit", json!(1));
            }
            default_template(obj, &["spec", "jobTemplate", "spec", "template", "spec"]);
        }
        ("", "Service") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "type", json!("ClusterIP"));
                set_default(spec, "sessionAffinity", json!("None"));
                if spec.get("type") != Some(&json!("ExternalName")) {
                    set_default(spec, "internalTrafficPolicy", json!("Cluster"));
                    set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
                    set_default(spec, "ipFamilies", json!(["IPv4"]));
                }
                let t = spec
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if t == "NodePort" || t == "LoadBalancer" {
                    set_default(spec, "externalTrafficPolicy", json!("Cluster"));
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        set_default(p, "protocol", json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            set_default(p, "targetPort", port);
                        }
                    }
                }
            }
            if let Some(o) = obj.as_object_mut()
                && let Some(st) = ensure_obj(o, "status")
            {
                set_default(st, "loadBalancer", json!({}));
            }
        }
        ("", "Namespace") => {
            let name = crate::meta::name(obj).to_string();
            if let Some(o) = obj.as_object_mut() {
                if let Some(spec) = ensure_obj(o, "spec") {
                    set_default(spec, "finalizers", json!(["kubernetes"]));
                }
                if let Some(st) = ensure_obj(o, "status") {
                    set_default(st, "phase", json!("Active"));
                }
            }
            if let Some(md) = crate::meta::metadata_mut(obj)
                && let Some(labels) = ensure_obj(md, "labels")
            {
                labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        ("", "Secret") => {
            if let Some(o) = obj.as_object_mut() {
                set_default(o, "type", json!("Opaque"));
                // `stringData` is write-only: its entries are merged into `data` (base64),
                // overriding keys of the same name, and never stored.
                if let Some(Value::Object(sd)) = o.remove("stringData") {
                    use base64::Engine;
                    if let Some(data) = ensure_obj(o, "data") {
                        for (k, v) in sd {
                            let text = match v {
                                Value::String(t) => t,
                                other => other.to_string(),
                            };
                            data.insert(
                                k,
                                json!(base64::engine::general_purpose::STANDARD.encode(text)),
                            );
                        }
                    }
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "volumeMode", json!("Filesystem"));
            }
            if let Some(o) = obj.as_object_mut()
                && let Some(st) = ensure_obj(o, "status")
            {
                set_default(st, "phase", json!("Pending"));
            }
        }
        ("", "PersistentVolume") => {
            if let Some(spec) = obj_at(obj, &["spec"]) {
                set_default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
                set_default(spec, "volumeMode", json!("Filesystem"));
            }
        }
        ("storage.k8s.io", "StorageClass") => {
            if let Some(o) = obj.as_object_mut() {
                set_default(o, "reclaimPolicy", json!("Delete"));
                set_default(o, "volumeBindingMode", json!("Immediate"));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_default_from_limits_and_qos() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x", "resources": {"limits": {"cpu": "1", "memory": "64Mi"}}}]}});
        apply_defaults("", "Pod", &mut pod);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["requests"],
            json!({"cpu": "1", "memory": "64Mi"})
        );
        assert_eq!(pod["status"]["qosClass"], "Guaranteed");
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x", "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "1", "memory": "64Mi"}}}]}});
        apply_defaults("", "Pod", &mut pod);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["requests"],
            json!({"cpu": "100m", "memory": "64Mi"})
        );
        assert_eq!(pod["status"]["qosClass"], "Burstable");
        let mut pod = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        apply_defaults("", "Pod", &mut pod);
        assert_eq!(pod["status"]["qosClass"], "BestEffort");
        assert_eq!(pod["spec"]["serviceAccountName"], "default");
        // Templates keep what the user wrote.
        let mut d = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "x", "resources": {"limits": {"cpu": "1"}}}]}}}});
        apply_defaults("apps", "Deployment", &mut d);
        assert!(
            d.pointer("/spec/template/spec/containers/0/resources/requests")
                .is_none()
        );
    }

    #[test]
    fn toleration_seconds() {
        let mut pod = json!({"spec": {"containers": []}});
        default_toleration_seconds(&mut pod);
        let t = pod["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0]["key"], "node.kubernetes.io/not-ready");
        assert_eq!(t[1]["tolerationSeconds"], 300);
        let mut pod = json!({"spec": {"tolerations": [
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5},
            {"key": "other", "operator": "Exists"}]}});
        default_toleration_seconds(&mut pod);
        let t = pod["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0]["tolerationSeconds"], 5);
        assert_eq!(t[2]["key"], "node.kubernetes.io/not-ready");
        // An empty-key Exists toleration tolerates everything.
        let mut pod = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        default_toleration_seconds(&mut pod);
        assert_eq!(pod["spec"]["tolerations"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn pod_defaults() {
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "busybox"}, {"name": "b", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]}});
        apply_defaults("", "Pod", &mut pod);
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["dnsPolicy"], "ClusterFirst");
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(pod["spec"]["schedulerName"], "default-scheduler");
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(
            pod["spec"]["containers"][1]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(pod["spec"]["containers"][1]["ports"][0]["protocol"], "TCP");
        assert_eq!(pod["status"]["phase"], "Pending");
    }

    #[test]
    fn deployment_and_service_defaults() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x:1"}]}}}});
        apply_defaults("apps", "Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
        let mut s = json!({"spec": {"ports": [{"port": 80}]}});
        apply_defaults("", "Service", &mut s);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["sessionAffinity"], "None");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
    }

    #[test]
    fn secret_string_data_merges_into_data() {
        let mut s =
            json!({"data": {"a": "b2xk", "keep": "eA=="}, "stringData": {"a": "new", "b": "two"}});
        apply_defaults("", "Secret", &mut s);
        assert_eq!(s["type"], "Opaque");
        assert_eq!(s["data"]["a"], "bmV3");
        assert_eq!(s["data"]["b"], "dHdv");
        assert_eq!(s["data"]["keep"], "eA==");
        assert!(s.get("stringData").is_none());
    }
}

#[cfg(test)]
mod job_tests {
    use super::*;

    #[test]
    fn job_gets_selector_and_labels_on_its_uid() {
        let mut j = json!({"metadata": {"name": "pi", "uid": "u1"},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}}});
        apply_defaults("batch", "Job", &mut j);
        assert_eq!(
            j["spec"]["selector"],
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": "u1"}})
        );
        let l = &j["spec"]["template"]["metadata"]["labels"];
        assert_eq!(l["batch.kubernetes.io/job-name"], "pi");
        assert_eq!(l["job-name"], "pi");
        assert_eq!(l["controller-uid"], "u1");
        let mut manual = json!({"metadata": {"name": "m", "uid": "u2"},
            "spec": {"manualSelector": true, "selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}}}}});
        apply_defaults("batch", "Job", &mut manual);
        assert_eq!(
            manual["spec"]["selector"],
            json!({"matchLabels": {"a": "b"}})
        );
        assert!(manual["spec"]["template"]["metadata"]["labels"]["job-name"].is_null());
    }
}
