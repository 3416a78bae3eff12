//! Built-in admission that needs the store: the Priority plugin (priorityClassName →
//! spec.priority and preemptionPolicy, globalDefault classes) and the built-in PriorityClasses.

use serde_json::{Value, json};
use skiff_api::resources::{ResourceInfo, find};
use skiff_api::{ApiError, meta};
use skiff_store::RangeRequest;

use crate::handlers::{decode, prepare_new, store_err};
use crate::{ApiServerError, ApiState};

/// The PriorityClasses every cluster has: (name, value, description).
pub const BUILTIN_PRIORITY_CLASSES: &[(&str, i64, &str)] = &[
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
    ),
];

/// Creates the built-in PriorityClasses if missing.
pub(crate) async fn bootstrap_priority_classes(st: &ApiState) -> Result<(), ApiServerError> {
    let Some(r) = find("scheduling.k8s.io", "v1", "priorityclasses") else {
        return Ok(());
    };
    for (name, value, description) in BUILTIN_PRIORITY_CLASSES {
        let key = r.key(None, name);
        let err = |source| ApiServerError::Bootstrap {
            what: format!("priorityclass {name}"),
            source,
        };
        if st.store.get(&key).await.map_err(err)?.is_some() {
            continue;
        }
        let mut obj = json!({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": name}, "value": value, "description": description,
        });
        prepare_new(r, &mut obj, None);
        let bytes = bytes::Bytes::from(serde_json::to_vec(&obj).unwrap_or_default());
        match st.store.create(&key, bytes).await {
            Ok(_) | Err(skiff_store::StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

/// The Priority admission plugin for a new pod: resolves `priorityClassName` (or the
/// globalDefault class) into `spec.priority` and `spec.preemptionPolicy`.
pub(crate) async fn pod_priority(
    st: &ApiState,
    pods: &ResourceInfo,
    pod: &mut Value,
) -> Result<(), ApiError> {
    let Some(r) = find("scheduling.k8s.io", "v1", "priorityclasses") else {
        return Ok(());
    };
    let name = meta::name(pod).to_string();
    let requested = pod
        .pointer("/spec/priorityClassName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let given_priority = pod.pointer("/spec/priority").and_then(Value::as_i64);
    // Deviation from kube-apiserver (which forbids it): a pod that names no class may carry its
    // own spec.priority; in-process tests and hollow-node benchmarks rely on it.
    if requested.is_empty()
        && let Some(p) = given_priority
    {
        if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
            spec.insert("priority".into(), json!(p));
            spec.entry("preemptionPolicy")
                .or_insert(json!("PreemptLowerPriority"));
        }
        return Ok(());
    }
    let class = if requested.is_empty() {
        default_class(st, r).await?
    } else {
        let kv = st
            .store
            .get(&r.key(None, &requested))
            .await
            .map_err(store_err)?;
        match kv {
            Some(kv) => Some(decode(&kv)?),
            None => {
                return Err(ApiError::forbidden(
                    pods,
                    &name,
                    &format!("no PriorityClass with name {requested} was found"),
                ));
            }
        }
    };
    let (class_name, priority, policy) = match &class {
        Some(c) => (
            meta::name(c).to_string(),
            c.get("value").and_then(Value::as_i64).unwrap_or(0),
            c.get("preemptionPolicy")
                .and_then(Value::as_str)
                .unwrap_or("PreemptLowerPriority")
                .to_string(),
        ),
        None => (String::new(), 0, "PreemptLowerPriority".to_string()),
    };
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    if let Some(given) = spec.get("priority").and_then(Value::as_i64)
        && given != priority
    {
        return Err(ApiError::forbidden(
            pods,
            &name,
            &format!(
                "the integer value of priority ({given}) must not be provided in pod spec; \
                 priority admission controller computed {priority} from the given PriorityClass name"
            ),
        ));
    }
    if class.is_some()
        && let Some(given) = spec.get("preemptionPolicy").and_then(Value::as_str)
        && given != policy
    {
        return Err(ApiError::forbidden(
            pods,
            &name,
            &format!(
                "the string value of PreemptionPolicy ({given}) must not be provided in pod spec; \
                 priority admission controller computed {policy} from the given PriorityClass name"
            ),
        ));
    }
    if !class_name.is_empty() {
        spec.insert("priorityClassName".into(), json!(class_name));
    }
    spec.insert("priority".into(), json!(priority));
    spec.entry("preemptionPolicy").or_insert(json!(policy));
    Ok(())
}

/// The globalDefault PriorityClass (the lowest value if several claim it).
async fn default_class(st: &ApiState, r: &ResourceInfo) -> Result<Option<Value>, ApiError> {
    let resp = st
        .store
        .range(RangeRequest {
            prefix: r.key_prefix(),
            ..Default::default()
        })
        .await
        .map_err(store_err)?;
    let mut best: Option<Value> = None;
    for kv in &resp.kvs {
        let c = decode(kv)?;
        if c.get("globalDefault").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let v = c.get("value").and_then(Value::as_i64).unwrap_or(0);
        let better = best
            .as_ref()
            .is_none_or(|b| v < b.get("value").and_then(Value::as_i64).unwrap_or(0));
        if better {
            best = Some(c);
        }
    }
    Ok(best)
}
