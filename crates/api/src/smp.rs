//! Strategic merge patch for built-in kinds: maps merge recursively, lists with a merge key are
//! merged element by element, other lists are replaced; `$patch`, `$retainKeys`,
//! `$setElementOrder/<field>` and `$deleteFromPrimitiveList/<field>` directives are honoured.

use serde_json::{Map, Value};

/// Errors of a strategic merge patch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmpError {
    /// The patch is not a JSON object.
    #[error("strategic merge patch must be a JSON object")]
    NotAnObject,
    /// An unknown `$patch` directive.
    #[error("unknown patch type: {0}")]
    UnknownDirective(String),
}

/// How a list field is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListStrategy {
    /// Merge elements by this key.
    MergeKey(&'static str),
    /// Primitive list merged as a set.
    MergePrimitive,
    /// Replace the whole list.
    Replace,
}

const POD_SPEC_LISTS: &[&str] = &["containers", "initContainers", "ephemeralContainers"];

/// The merge strategy of the list at `path` (field names from the object root, no indices).
/// Only the last two names are looked at (`openapi_v2` in the apiserver relies on that).
pub fn list_strategy(path: &[String]) -> ListStrategy {
    let Some(last) = path.last().map(String::as_str) else {
        return ListStrategy::Replace;
    };
    let parent = path.len().checked_sub(2).map(|i| path[i].as_str());
    match last {
        "containers" | "initContainers" | "ephemeralContainers" => ListStrategy::MergeKey("name"),
        "env" | "volumes" | "imagePullSecrets" | "resourceClaims" | "schedulingGates" => {
            ListStrategy::MergeKey("name")
        }
        "volumeMounts" => ListStrategy::MergeKey("mountPath"),
        "volumeDevices" => ListStrategy::MergeKey("devicePath"),
        "hostAliases" => ListStrategy::MergeKey("ip"),
        "conditions" => ListStrategy::MergeKey("type"),
        "addresses" if parent == Some("status") => ListStrategy::MergeKey("type"),
        "ownerReferences" => ListStrategy::MergeKey("uid"),
        "topologySpreadConstraints" => ListStrategy::MergeKey("topologyKey"),
        "finalizers" if parent == Some("metadata") => ListStrategy::MergePrimitive,
        "ports" => match parent {
            Some(p) if POD_SPEC_LISTS.contains(&p) => ListStrategy::MergeKey("containerPort"),
            Some("spec") => ListStrategy::MergeKey("port"),
            _ => ListStrategy::Replace,
        },
        _ => ListStrategy::Replace,
    }
}

/// Applies a strategic merge `patch` to `original`.
pub fn strategic_merge(original: &Value, patch: &Value) -> Result<Value, SmpError> {
    let Some(p) = patch.as_object() else {
        return Err(SmpError::NotAnObject);
    };
    let base = original.as_object().cloned().unwrap_or_default();
    let mut path = Vec::new();
    Ok(Value::Object(merge_map(base, p, &mut path)?))
}

fn merge_map(
    mut base: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<Map<String, Value>, SmpError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut out = patch.clone();
            out.remove("$patch");
            return Ok(strip_directives(out));
        }
        Some("delete") => return Ok(Map::new()),
        Some("merge") | None => {}
        Some(other) => return Err(SmpError::UnknownDirective(other.to_string())),
    }
    let retain = patch.get("$retainKeys").and_then(Value::as_array).cloned();
    for (k, pv) in patch {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (base.get_mut(field), pv.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if pv.is_null() {
            base.remove(k);
            continue;
        }
        path.push(k.clone());
        let merged = match (base.remove(k), pv) {
            (Some(Value::Object(b)), Value::Object(po)) => Value::Object(merge_map(b, po, path)?),
            (Some(Value::Array(b)), Value::Array(pa)) => Value::Array(merge_list(b, pa, path)?),
            (None, Value::Object(po)) => Value::Object(merge_map(Map::new(), po, path)?),
            (None, Value::Array(pa)) => Value::Array(merge_list(Vec::new(), pa, path)?),
            (_, other) => strip_value(other.clone()),
        };
        path.pop();
        base.insert(k.clone(), merged);
    }
    // $setElementOrder: reorder merged lists as the patch says.
    for (k, order) in patch {
        if let (Some(field), Some(order)) = (k.strip_prefix("$setElementOrder/"), order.as_array())
        {
            path.push(field.to_string());
            let strat = list_strategy(path);
            path.pop();
            if let Some(Value::Array(list)) = base.get_mut(field) {
                reorder(list, order, strat);
            }
        }
    }
    if let Some(keys) = retain {
        let keep: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
        base.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(base)
}

fn reorder(list: &mut Vec<Value>, order: &[Value], strat: ListStrategy) {
    let key_of = |v: &Value| -> Value {
        match strat {
            ListStrategy::MergeKey(k) => v.get(k).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let order_keys: Vec<Value> = order.iter().map(&key_of).collect();
    let mut ordered = Vec::with_capacity(list.len());
    for ok in &order_keys {
        if let Some(i) = list.iter().position(|v| &key_of(v) == ok) {
            ordered.push(list.remove(i));
        }
    }
    ordered.append(list);
    *list = ordered;
}

fn merge_list(
    mut base: Vec<Value>,
    patch: &[Value],
    path: &mut Vec<String>,
) -> Result<Vec<Value>, SmpError> {
    // A `{"$patch": "replace"}` element replaces the whole list with the other elements.
    if patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .cloned()
            .map(strip_value)
            .collect());
    }
    match list_strategy(path) {
        ListStrategy::Replace => Ok(patch.iter().cloned().map(strip_value).collect()),
        ListStrategy::MergePrimitive => {
            for e in patch {
                if !base.contains(e) {
                    base.push(e.clone());
                }
            }
            Ok(base)
        }
        ListStrategy::MergeKey(key) => {
            for pe in patch {
                let Some(po) = pe.as_object() else {
                    base.push(pe.clone());
                    continue;
                };
                let kv = po.get(key);
                let idx = kv.and_then(|kv| base.iter().position(|b| b.get(key) == Some(kv)));
                let directive = po.get("$patch").and_then(Value::as_str);
                match (idx, directive) {
                    (Some(i), Some("delete")) => {
                        base.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), _) => {
                        let b = match base.remove(i) {
                            Value::Object(m) => m,
                            _ => Map::new(),
                        };
                        base.insert(i, Value::Object(merge_map(b, po, path)?));
                    }
                    (None, _) => {
                        base.push(Value::Object(merge_map(Map::new(), po, path)?));
                    }
                }
            }
            Ok(base)
        }
    }
}

fn strip_directives(mut m: Map<String, Value>) -> Map<String, Value> {
    m.retain(|k, _| !k.starts_with('$'));
    for v in m.values_mut() {
        *v = strip_value(std::mem::take(v));
    }
    m
}

fn strip_value(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip_directives(m)),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_value).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deploy() -> Value {
        json!({"metadata": {"name": "d", "labels": {"a": "1"}, "finalizers": ["x"]},
          "spec": {"replicas": 1, "template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
             "ports": [{"containerPort": 80, "protocol": "TCP"}]},
            {"name": "side", "image": "busybox"}]}}}})
    }

    #[test]
    fn maps_merge_and_null_deletes() {
        let out = strategic_merge(
            &deploy(),
            &json!({"metadata": {"labels": {"b": "2", "a": null}}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["spec"]["replicas"], 1);
    }

    #[test]
    fn containers_merge_by_name() {
        let p = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "web"}, {"name": "side"}],
            "containers": [{"name": "web", "image": "nginx:2", "env": [{"name": "B", "value": "3"}, {"name": "A", "$patch": "delete"}]}]}}}});
        let out = strategic_merge(&deploy(), &p).unwrap();
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs.as_array().unwrap().len(), 2);
        assert_eq!(cs[0]["image"], "nginx:2");
        assert_eq!(cs[0]["env"], json!([{"name": "B", "value": "3"}]));
        assert_eq!(cs[0]["ports"][0]["containerPort"], 80);
        assert_eq!(cs[1]["name"], "side");
    }

    #[test]
    fn delete_container_and_replace_directives() {
        let p = json!({"spec": {"template": {"spec": {"containers": [{"name": "side", "$patch": "delete"}]}}}});
        let out = strategic_merge(&deploy(), &p).unwrap();
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let p = json!({"metadata": {"labels": {"$patch": "replace", "z": "9"}}});
        let out = strategic_merge(&deploy(), &p).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"z": "9"}));
        let p = json!({"metadata": {"finalizers": ["y"]}});
        let out = strategic_merge(&deploy(), &p).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["x", "y"]));
        let p = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}});
        let out = strategic_merge(&deploy(), &p).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!([]));
    }

    #[test]
    fn retain_keys_and_replaced_lists() {
        let orig = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}, "args": ["a", "b"]}});
        let p = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}, "args": ["c"]}});
        let out = strategic_merge(&orig, &p).unwrap();
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(out["spec"]["args"], json!(["c"]));
    }

    #[test]
    fn service_ports_merge_by_port() {
        let orig = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}});
        let p = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}]}});
        let out = strategic_merge(&orig, &p).unwrap();
        assert_eq!(
            out["spec"]["ports"][0],
            json!({"port": 80, "name": "http", "targetPort": 8080})
        );
        assert_eq!(out["spec"]["ports"].as_array().unwrap().len(), 2);
    }
}
