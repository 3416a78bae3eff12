//! Validation of built-in objects: names (DNS-1123 rules), labels, and the required fields users
//! most often get wrong. Returns causes with field paths for a 422 `Invalid`.

use serde_json::Value;

use crate::resources::ResourceInfo;
use crate::selector::LabelSelector;
use crate::status::Cause;

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn is_label_chars(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 label (namespaces).
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && is_label_chars(s)
}

/// RFC 1123 subdomain (most object names).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label_chars)
}

/// DNS-1035 label (services).
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
}

/// Which naming rule a kind's names follow.
fn name_rule(r: &ResourceInfo) -> fn(&str) -> Vec<String> {
    match (r.group, r.resource) {
        ("", "namespaces") => |s| {
            let mut v = Vec::new();
            if s.len() > 63 {
                v.push("must be no more than 63 characters".into());
            }
            if !is_label_chars(s) {
                v.push(LABEL_MSG.into());
            }
            v
        },
        ("", "services") => |s| {
            let mut v = Vec::new();
            if s.len() > 63 {
                v.push("must be no more than 63 characters".into());
            }
            if !(is_label_chars(s) && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)) {
                v.push(DNS1035_MSG.into());
            }
            v
        },
        ("rbac.authorization.k8s.io", _)
        | ("authentication.k8s.io", _)
        | ("authorization.k8s.io", _) => |s| {
            if s == "." || s == ".." {
                vec![format!("may not be '{s}'")]
            } else if s.contains('/') || s.contains('%') {
                vec![format!(
                    "may not contain '{}'",
                    if s.contains('/') { "/" } else { "%" }
                )]
            } else {
                vec![]
            }
        },
        _ => |s| {
            let mut v = Vec::new();
            if s.len() > 253 {
                v.push("must be no more than 253 characters".into());
            }
            if !s.split('.').all(is_label_chars) {
                v.push(SUBDOMAIN_MSG.into());
            }
            v
        },
    }
}

/// Problems with `name` for resource `r`, as causes on `metadata.name`.
pub fn validate_name(r: &ResourceInfo, name: &str) -> Vec<Cause> {
    if name.is_empty() {
        return vec![Cause::required(
            "metadata.name",
            "name or generateName is required",
        )];
    }
    name_rule(r)(name)
        .into_iter()
        .map(|m| Cause::invalid("metadata.name", name, &m))
        .collect()
}

fn validate_label_map(field: &str, v: Option<&Value>, values_too: bool, out: &mut Vec<Cause>) {
    let Some(v) = v else { return };
    let Some(m) = v.as_object() else {
        out.push(Cause::invalid(
            field,
            &v.to_string(),
            "must be a map of strings",
        ));
        return;
    };
    for (k, val) in m {
        let (prefix, nm) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        let name_ok = !nm.is_empty()
            && nm.len() <= 63
            && nm
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && nm.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
            && nm.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric);
        if !name_ok || prefix.is_some_and(|p| !is_dns1123_subdomain(p)) {
            out.push(Cause::invalid(
                field,
                k,
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
            ));
        }
        match val.as_str() {
            None => out.push(Cause::invalid(field, &val.to_string(), "must be a string")),
            Some(s) if values_too => {
                let ok = s.is_empty()
                    || (s.len() <= 63
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
                        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric));
                if !ok {
                    out.push(Cause::invalid(
                        field,
                        s,
                        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
                    ));
                }
            }
            Some(_) => {}
        }
    }
}

fn validate_pod_spec(path: &str, spec: Option<&Value>, out: &mut Vec<Cause>) {
    let Some(spec) = spec else {
        out.push(Cause::required(path, ""));
        return;
    };
    let containers = spec.get("containers").and_then(Value::as_array);
    match containers {
        None => out.push(Cause::required(&format!("{path}.containers"), "")),
        Some(cs) if cs.is_empty() => out.push(Cause::required(&format!("{path}.containers"), "")),
        Some(cs) => {
            for (i, c) in cs.iter().enumerate() {
                let p = format!("{path}.containers[{i}]");
                match c.get("name").and_then(Value::as_str) {
                    None | Some("") => out.push(Cause::required(&format!("{p}.name"), "")),
                    Some(n) if !is_dns1123_label(n) => {
                        out.push(Cause::invalid(&format!("{p}.name"), n, LABEL_MSG))
                    }
                    _ => {}
                }
                if c.get("image")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    out.push(Cause::required(&format!("{p}.image"), ""));
                }
            }
        }
    }
    if let Some(rp) = spec.get("restartPolicy").and_then(Value::as_str)
        && !["Always", "OnFailure", "Never"].contains(&rp)
    {
        out.push(Cause::not_supported(
            &format!("{path}.restartPolicy"),
            rp,
            &["Always", "OnFailure", "Never"],
        ));
    }
}

fn validate_workload(obj: &Value, out: &mut Vec<Cause>) {
    let spec = obj.get("spec");
    let selector = spec.and_then(|s| s.get("selector"));
    match selector {
        None => out.push(Cause::required("spec.selector", "")),
        Some(sel) => {
            let tmpl_labels = spec
                .and_then(|s| s.pointer("/template/metadata/labels"))
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let ls = selector_from_object(sel);
            match ls {
                Ok(ls) if ls.is_empty() => out.push(Cause::invalid(
                    "spec.selector",
                    "",
                    "empty selector is invalid for deployment",
                )),
                Ok(ls) if !ls.matches_labels(&tmpl_labels) => out.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    &serde_json::to_string(&tmpl_labels).unwrap_or_default(),
                    "`selector` does not match template `labels`",
                )),
                Ok(_) => {}
                Err(e) => out.push(Cause::invalid("spec.selector", &sel.to_string(), &e)),
            }
        }
    }
    if let Some(r) = spec.and_then(|s| s.get("replicas")).and_then(Value::as_i64)
        && r < 0
    {
        out.push(Cause::invalid(
            "spec.replicas",
            &r.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    validate_pod_spec(
        "spec.template.spec",
        spec.and_then(|s| s.pointer("/template/spec")),
        out,
    );
}

/// Converts a `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`) to a selector.
pub fn selector_from_object(sel: &Value) -> Result<LabelSelector, String> {
    use crate::selector::Requirement;
    let mut reqs = Vec::new();
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in ml {
            reqs.push(Requirement::In(
                k.clone(),
                vec![v.as_str().unwrap_or_default().to_string()],
            ));
        }
    }
    if let Some(me) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in me {
            let key = e
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let values: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let op = e
                .get("operator")
                .and_then(Value::as_str)
                .unwrap_or_default();
            reqs.push(match op {
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::NotExists(key),
                other => return Err(format!("{other:?} is not a valid label selector operator")),
            });
        }
    }
    Ok(LabelSelector(reqs))
}

/// Validates an object of resource `r` (after defaulting). An empty result means valid.
pub fn validate(r: &ResourceInfo, obj: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let name = crate::meta::name(obj);
    out.extend(validate_name(r, name));
    let md = obj.get("metadata");
    validate_label_map(
        "metadata.labels",
        md.and_then(|m| m.get("labels")),
        true,
        &mut out,
    );
    validate_label_map(
        "metadata.annotations",
        md.and_then(|m| m.get("annotations")),
        false,
        &mut out,
    );
    match (r.group, r.kind) {
        ("", "Pod") => validate_pod_spec("spec", obj.get("spec"), &mut out),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") => {
            validate_workload(obj, &mut out)
        }
        ("", "ConfigMap") => {
            if let Some(data) = obj.get("data").and_then(Value::as_object) {
                for (k, v) in data {
                    if !v.is_string() {
                        out.push(Cause::invalid(
                            &format!("data[{k}]"),
                            &v.to_string(),
                            "must be a string",
                        ));
                    }
                    if k.is_empty()
                        || !k
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    {
                        out.push(Cause::invalid("data", k, "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
                    }
                }
            }
        }
        ("", "Service") => {
            if let Some(ports) = obj.pointer("/spec/ports").and_then(Value::as_array) {
                for (i, p) in ports.iter().enumerate() {
                    let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                    if !(1..=65535).contains(&port) {
                        out.push(Cause::invalid(
                            &format!("spec.ports[{i}].port"),
                            &port.to_string(),
                            "must be between 1 and 65535, inclusive",
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;
    use serde_json::json;

    #[test]
    fn names() {
        let cm = find("", "v1", "configmaps").unwrap();
        assert!(validate_name(cm, "a.b-c").is_empty());
        let c = validate_name(cm, "Bad_Name");
        assert_eq!(c[0].field, "metadata.name");
        assert!(
            c[0].message
                .starts_with("Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain")
        );
        let ns = find("", "v1", "namespaces").unwrap();
        assert!(!validate_name(ns, "a.b").is_empty());
        let svc = find("", "v1", "services").unwrap();
        assert!(!validate_name(svc, "1abc").is_empty());
        let role = find("rbac.authorization.k8s.io", "v1", "clusterroles").unwrap();
        assert!(validate_name(role, "system:controller:x").is_empty());
    }

    #[test]
    fn pods_and_deployments() {
        let pod = find("", "v1", "pods").unwrap();
        let bad = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        let causes = validate(pod, &bad);
        assert_eq!(causes[0].field, "spec.containers[0].image");
        let d = find("apps", "v1", "deployments").unwrap();
        let bad = json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "y"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        assert_eq!(validate(d, &bad)[0].field, "spec.template.metadata.labels");
    }
}
