//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!`, `<`, `>`) and field selectors,
//! parsed from their query-string form and matched against JSON objects.

use serde_json::Value;

use crate::meta;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key` exists.
    Exists(String),
    /// `!key`.
    NotExists(String),
    /// `key in (a,b)` / `key=a`.
    In(String, Vec<String>),
    /// `key notin (a,b)` / `key!=a`.
    NotIn(String, Vec<String>),
    /// `key>n`.
    Gt(String, i64),
    /// `key<n`.
    Lt(String, i64),
}

/// A parsed label selector (requirements ANDed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn check_key(k: &str) -> Result<String, String> {
    let k = k.trim();
    if k.is_empty() {
        return Err("found '', expected: identifier".into());
    }
    if k.chars()
        .any(|c| !(c.is_ascii_alphanumeric() || "-_./".contains(c)))
    {
        return Err(format!("invalid label key \"{k}\""));
    }
    Ok(k.to_string())
}

fn check_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.chars()
        .any(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
        || v.len() > 63
    {
        return Err(format!("invalid label value: \"{v}\""));
    }
    Ok(v.to_string())
}

fn set_values(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("found '{rest}', expected: '('"))?;
    inner
        .split(',')
        .map(check_value)
        .collect::<Result<Vec<_>, _>>()
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (x,y),!f`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top_level(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(format!("unable to parse requirement: found '' in {s:?}"));
            }
            if let Some(k) = p.strip_prefix('!') {
                reqs.push(Requirement::NotExists(check_key(k)?));
            } else if let Some(i) = p.find(" notin ").or_else(|| p.find(" notin(")) {
                reqs.push(Requirement::NotIn(
                    check_key(&p[..i])?,
                    set_values(&p[i + 6..])?,
                ));
            } else if let Some(i) = p.find(" in ").or_else(|| p.find(" in(")) {
                reqs.push(Requirement::In(
                    check_key(&p[..i])?,
                    set_values(&p[i + 3..])?,
                ));
            } else if let Some((k, v)) = p.split_once("!=") {
                reqs.push(Requirement::NotIn(check_key(k)?, vec![check_value(v)?]));
            } else if let Some((k, v)) = p.split_once("==") {
                reqs.push(Requirement::In(check_key(k)?, vec![check_value(v)?]));
            } else if let Some((k, v)) = p.split_once('=') {
                reqs.push(Requirement::In(check_key(k)?, vec![check_value(v)?]));
            } else if let Some((k, v)) = p.split_once('>') {
                let n = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid number {v:?}"))?;
                reqs.push(Requirement::Gt(check_key(k)?, n));
            } else if let Some((k, v)) = p.split_once('<') {
                let n = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid number {v:?}"))?;
                reqs.push(Requirement::Lt(check_key(k)?, n));
            } else {
                reqs.push(Requirement::Exists(check_key(p)?));
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether the selector matches everything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Matches a label map.
    pub fn matches_labels(&self, labels: &serde_json::Map<String, Value>) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| !vs.iter().any(|x| x == v)),
            Requirement::Gt(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            Requirement::Lt(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        })
    }

    /// Matches an object's labels.
    pub fn matches(&self, obj: &Value) -> bool {
        self.is_empty() || self.matches_labels(&meta::labels(obj))
    }
}

/// One field requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    /// Dotted field path.
    pub field: String,
    /// Expected value.
    pub value: String,
    /// `!=` instead of `=`.
    pub negate: bool,
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldRequirement>);

/// Field paths kube-apiserver accepts in field selectors, per kind (beyond metadata.name and
/// metadata.namespace, which every kind accepts).
pub fn supported_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "Event" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
            "regarding.kind",
            "regarding.name",
            "regarding.namespace",
        ],
        "Secret" => &["type"],
        "Node" => &["spec.unschedulable"],
        "Namespace" => &["status.phase"],
        "ReplicaSet" | "ReplicationController" => &["status.replicas"],
        "Job" => &["status.successful"],
        "CertificateSigningRequest" => &["spec.signerName"],
        _ => &[],
    }
}

impl FieldSelector {
    /// Parses `a=b,c!=d` and checks the fields against `kind`'s supported set.
    pub fn parse(s: &str, kind: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for part in s.split(',') {
            let (field, value, negate) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if field != "metadata.name"
                && field != "metadata.namespace"
                && !supported_fields(kind).contains(&field)
            {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push(FieldRequirement {
                field: field.to_string(),
                value: value.trim().to_string(),
                negate,
            });
        }
        Ok(FieldSelector(reqs))
    }

    /// Whether the selector matches everything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value a single `metadata.name=X` requirement asks for, if that is all it asks.
    pub fn single_name(&self) -> Option<&str> {
        match self.0.as_slice() {
            [r] if r.field == "metadata.name" && !r.negate => Some(&r.value),
            _ => None,
        }
    }

    /// Matches an object.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let mut v = meta::lookup_string(obj, &r.field);
            if (r.field == "spec.unschedulable" || r.field == "spec.hostNetwork") && v.is_empty() {
                v = "false".into();
            }
            (v == r.value) != r.negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})
    }

    #[test]
    fn label_selectors() {
        let o = obj(json!({"app": "web", "tier": "front", "n": "5"}));
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web,db)", true),
            ("app notin (web,db)", false),
            ("tier", true),
            ("!tier", false),
            ("missing!=x", true),
            ("app=web,tier=back", false),
            ("env in (prod), app", false),
            ("n>4", true),
            ("n<4", false),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        for (sel, want) in [
            ("metadata.name=a", true),
            ("metadata.name!=a", false),
            ("metadata.namespace=ns,spec.nodeName=n1", true),
            ("status.phase==Pending", false),
        ] {
            assert_eq!(
                FieldSelector::parse(sel, "Pod").unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert_eq!(
            FieldSelector::parse("spec.foo=x", "Pod").unwrap_err(),
            "field label not supported: spec.foo"
        );
        assert_eq!(
            FieldSelector::parse("metadata.name=x", "ConfigMap")
                .unwrap()
                .single_name(),
            Some("x")
        );
    }
}
