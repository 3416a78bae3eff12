//! Server-side apply: field sets (FieldsV1) per apply manager in `metadata.managedFields`,
//! merging an applied configuration into the live object, removing fields a manager stopped
//! applying, and conflicts between apply managers (resolved by `force`).
//! Only `Apply` operations are tracked; plain updates do not record field ownership.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::smp::{ListStrategy, list_strategy};

/// One step of a field path: a map field or a list element identified by its merge key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    /// `f:<name>`
    Field(String),
    /// `k:{"name":"web"}` (the key object as compact JSON)
    Key(String),
}

type Path = Vec<Seg>;

/// A conflict: (other manager, its apiVersion, field path as kube prints it).
pub type Conflict = (String, String, String);

/// Fields outside any field set.
fn skipped(path: &[String]) -> bool {
    matches!(
        path.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["apiVersion"]
            | ["kind"]
            | ["metadata", "name"]
            | ["metadata", "namespace"]
            | ["metadata", "managedFields"]
            | ["metadata", "resourceVersion"]
            | ["metadata", "uid"]
            | ["metadata", "creationTimestamp"]
            | ["metadata", "generation"]
            | ["status"]
    )
}

fn collect(v: &Value, names: &mut Vec<String>, path: &mut Path, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                names.push(k.clone());
                if !skipped(names) {
                    path.push(Seg::Field(k.clone()));
                    collect(child, names, path, out);
                    path.pop();
                }
                names.pop();
            }
        }
        Value::Array(items) => match list_strategy(names) {
            ListStrategy::MergeKey(key) => {
                for item in items {
                    let Some(kv) = item.get(key) else { continue };
                    let mut kobj = Map::new();
                    kobj.insert(key.to_string(), kv.clone());
                    path.push(Seg::Key(Value::Object(kobj).to_string()));
                    out.insert(path.clone());
                    if let Some(m) = item.as_object() {
                        for (k, child) in m {
                            names.push(k.clone());
                            path.push(Seg::Field(k.clone()));
                            collect(child, names, path, out);
                            path.pop();
                            names.pop();
                        }
                    }
                    path.pop();
                }
            }
            _ => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The leaf paths an applied configuration sets.
pub fn field_set(applied: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    collect(applied, &mut Vec::new(), &mut Vec::new(), &mut out);
    out
}

fn seg_key(s: &Seg) -> String {
    match s {
        Seg::Field(f) => format!("f:{f}"),
        Seg::Key(k) => format!("k:{k}"),
    }
}

/// Renders a set as FieldsV1 JSON.
pub fn to_fields_v1(set: &BTreeSet<Path>) -> Value {
    let mut root = json!({});
    for p in set {
        let mut cur = &mut root;
        for s in p {
            let k = seg_key(s);
            if !cur.get(&k).is_some_and(Value::is_object) {
                cur[&k] = json!({});
            }
            cur = &mut cur[&k];
        }
        if p.last().is_some_and(|s| matches!(s, Seg::Key(_))) {
            cur["."] = json!({});
        }
    }
    root
}

/// Parses FieldsV1 JSON back into leaf paths.
pub fn from_fields_v1(v: &Value) -> BTreeSet<Path> {
    fn walk(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        let Some(m) = v.as_object() else { return };
        let children: Vec<_> = m.iter().filter(|(k, _)| k.as_str() != ".").collect();
        if (m.contains_key(".") || children.is_empty()) && !path.is_empty() {
            out.insert(path.clone());
        }
        for (k, child) in children {
            let seg = if let Some(f) = k.strip_prefix("f:") {
                Seg::Field(f.to_string())
            } else if let Some(key) = k.strip_prefix("k:") {
                Seg::Key(key.to_string())
            } else {
                continue;
            };
            path.push(seg);
            walk(child, path, out);
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

fn value_at<'a>(v: &'a Value, p: &[Seg]) -> Option<&'a Value> {
    let mut cur = v;
    for s in p {
        cur = match s {
            Seg::Field(f) => cur.get(f)?,
            Seg::Key(k) => {
                let key: Map<String, Value> = serde_json::from_str(k).ok()?;
                cur.as_array()?
                    .iter()
                    .find(|item| key.iter().all(|(kk, kv)| item.get(kk) == Some(kv)))?
            }
        };
    }
    Some(cur)
}

fn remove_at(v: &mut Value, p: &[Seg]) {
    let Some((last, parent)) = p.split_last() else {
        return;
    };
    let mut cur = v;
    for s in parent {
        let next = match s {
            Seg::Field(f) => cur.get_mut(f),
            Seg::Key(k) => {
                let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
                    return;
                };
                cur.as_array_mut().and_then(|a| {
                    a.iter_mut()
                        .find(|item| key.iter().all(|(kk, kv)| item.get(kk) == Some(kv)))
                })
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        Seg::Field(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        Seg::Key(k) => {
            if let (Ok(key), Some(a)) = (
                serde_json::from_str::<Map<String, Value>>(k),
                cur.as_array_mut(),
            ) {
                a.retain(|item| !key.iter().all(|(kk, kv)| item.get(kk) == Some(kv)));
            }
        }
    }
}

/// Renders a path like kube does in conflict messages (`.spec.containers[name="web"].image`).
pub fn path_string(p: &[Seg]) -> String {
    let mut s = String::new();
    for seg in p {
        match seg {
            Seg::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Seg::Key(k) => {
                let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = key.iter().map(|(kk, kv)| format!("{kk}={kv}")).collect();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
        }
    }
    s
}

fn merge(live: &mut Value, applied: &Value, names: &mut Vec<String>) {
    match (live, applied) {
        (Value::Object(lm), Value::Object(am)) => {
            for (k, av) in am {
                names.push(k.clone());
                match lm.get_mut(k) {
                    Some(lv) if !skipped(names) || k == "metadata" => merge(lv, av, names),
                    Some(lv) => *lv = av.clone(),
                    None => {
                        lm.insert(k.clone(), av.clone());
                    }
                }
                names.pop();
            }
        }
        (Value::Array(la), Value::Array(aa)) => match list_strategy(names) {
            ListStrategy::MergeKey(key) => {
                for item in aa {
                    match item
                        .get(key)
                        .and_then(|kv| la.iter_mut().find(|l| l.get(key) == Some(kv)))
                    {
                        Some(existing) => merge(existing, item, names),
                        None => la.push(item.clone()),
                    }
                }
            }
            _ => *la = aa.clone(),
        },
        (l, a) => *l = a.clone(),
    }
}

struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    raw: Value,
    set: BTreeSet<Path>,
}

/// Applies `applied` for `manager` onto `live` (None = the object does not exist yet).
/// Returns the new object with `metadata.managedFields` updated, or the conflicts.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let mut obj = live.cloned().unwrap_or_else(|| json!({}));
    let mut entries: Vec<Entry> = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|raw| Entry {
            manager: raw
                .get("manager")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            operation: raw
                .get("operation")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            api_version: raw
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            set: raw.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
            raw,
        })
        .collect();
    let new_set = field_set(applied);
    let mut conflicts = Vec::new();
    for e in entries
        .iter()
        .filter(|e| e.operation == "Apply" && e.manager != manager)
    {
        for p in new_set.intersection(&e.set) {
            // A list element's own entry only records membership; its fields are compared.
            let marker = matches!(p.last(), Some(Seg::Key(_)));
            if !marker && value_at(&obj, p) != value_at(applied, p) {
                conflicts.push((e.manager.clone(), e.api_version.clone(), path_string(p)));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    if force {
        for e in entries.iter_mut().filter(|e| e.manager != manager) {
            let before = e.set.len();
            e.set.retain(|p| {
                !new_set.contains(p)
                    || matches!(p.last(), Some(Seg::Key(_)))
                    || value_at(&obj, p) == value_at(applied, p)
            });
            if e.set.len() != before {
                e.raw["fieldsV1"] = to_fields_v1(&e.set);
            }
        }
    }
    let old_set = entries
        .iter()
        .find(|e| e.manager == manager && e.operation == "Apply")
        .map(|e| e.set.clone())
        .unwrap_or_default();
    merge(&mut obj, applied, &mut Vec::new());
    for p in old_set.difference(&new_set) {
        let owned_elsewhere = entries
            .iter()
            .any(|e| e.manager != manager && e.set.contains(p));
        if !owned_elsewhere {
            remove_at(&mut obj, p);
        }
    }
    entries.retain(|e| (e.manager != manager || e.operation != "Apply") && !e.set.is_empty());
    let mut managed: Vec<Value> = entries.into_iter().map(|e| e.raw).collect();
    managed.push(json!({
        "manager": manager,
        "operation": "Apply",
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": to_fields_v1(&new_set),
    }));
    if let Some(m) = crate::meta::metadata_mut(&mut obj) {
        m.insert("managedFields".into(), Value::Array(managed));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data})
    }

    #[test]
    fn fields_v1_round_trip_with_keys() {
        let d = json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "x"}]}}, "replicas": 2}});
        let set = field_set(&d);
        let v1 = to_fields_v1(&set);
        assert!(
            v1["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]["f:image"]
                .is_object()
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_creates_merges_and_removes_dropped_fields() {
        let first = apply(
            None,
            &cm(json!({"a": "1", "b": "2"})),
            "m1",
            false,
            "v1",
            "t",
        )
        .unwrap();
        assert_eq!(first["data"], json!({"a": "1", "b": "2"}));
        assert_eq!(first["metadata"]["managedFields"][0]["manager"], "m1");
        // Someone else's field survives; the manager's dropped field goes.
        let mut live = first.clone();
        live["data"]["other"] = json!("x");
        let second = apply(Some(&live), &cm(json!({"a": "1"})), "m1", false, "v1", "t").unwrap();
        assert_eq!(second["data"], json!({"a": "1", "other": "x"}));
    }

    #[test]
    fn list_elements_do_not_conflict_by_themselves() {
        let d = |image: &str, replicas: i64| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}})
        };
        let mut live = apply(None, &d("a", 1), "m1", false, "apps/v1", "t").unwrap();
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Always");
        let err = apply(Some(&live), &d("a", 5), "m2", false, "apps/v1", "t").unwrap_err();
        assert_eq!(
            err,
            vec![(
                "m1".to_string(),
                "apps/v1".to_string(),
                ".spec.replicas".to_string()
            )]
        );
        let err = apply(Some(&live), &d("b", 1), "m2", false, "apps/v1", "t").unwrap_err();
        assert_eq!(
            err[0].2,
            ".spec.template.spec.containers[name=\"web\"].image"
        );
    }

    #[test]
    fn conflicts_between_managers_and_force() {
        let live = apply(None, &cm(json!({"a": "1"})), "m1", false, "v1", "t").unwrap();
        let err = apply(Some(&live), &cm(json!({"a": "2"})), "m2", false, "v1", "t").unwrap_err();
        assert_eq!(
            err,
            vec![("m1".to_string(), "v1".to_string(), ".data.a".to_string())]
        );
        // Same value: shared ownership, no conflict.
        assert!(apply(Some(&live), &cm(json!({"a": "1"})), "m2", false, "v1", "t").is_ok());
        let forced = apply(Some(&live), &cm(json!({"a": "2"})), "m2", true, "v1", "t").unwrap();
        assert_eq!(forced["data"]["a"], "2");
        let managers: Vec<&str> = forced["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, ["m2"], "m1 lost its only field");
    }
}
