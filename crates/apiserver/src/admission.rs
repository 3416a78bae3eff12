//! Built-in admission that needs the store: the Priority plugin (priorityClassName →
//! spec.priority and preemptionPolicy, globalDefault classes), the built-in PriorityClasses, and
//! the ServiceAccount plugin (default service account, `kube-api-access-*` token volume,
//! imagePullSecrets from the service account).

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

/// Creates the `default` ServiceAccount of each built-in namespace if missing (what the
/// service-account controller would do a moment later).
pub(crate) async fn bootstrap_default_service_accounts(
    st: &ApiState,
) -> Result<(), ApiServerError> {
    let Some(r) = find("", "v1", "serviceaccounts") else {
        return Ok(());
    };
    for ns in crate::DEFAULT_NAMESPACES {
        let key = r.key(Some(ns), "default");
        let err = |source| ApiServerError::Bootstrap {
            what: format!("serviceaccount {ns}/default"),
            source,
        };
        if st.store.get(&key).await.map_err(err)?.is_some() {
            continue;
        }
        let mut obj =
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
        prepare_new(r, &mut obj, Some(ns));
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

/// Where the ServiceAccount plugin mounts the API credentials in every container.
pub const SERVICE_ACCOUNT_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Prefix of the projected token volume's name.
const TOKEN_VOLUME_PREFIX: &str = "kube-api-access-";
/// The token lifetime the volume asks for (kube-apiserver's 3607 s).
const TOKEN_VOLUME_EXPIRATION_SECONDS: i64 = 3607;

/// The ServiceAccount admission plugin for a new pod, as kube-apiserver's: defaults
/// `spec.serviceAccountName` to `default`, refuses pods whose service account does not exist
/// (403), mounts a `kube-api-access-*` projected volume (token, `ca.crt`, `namespace`) read-only
/// at [`SERVICE_ACCOUNT_MOUNT_PATH`] in every container without a mount there unless automount is
/// off on the pod or its service account, and copies the service account's imagePullSecrets
/// when the pod has none. Mirror pods are left alone.
pub(crate) async fn pod_service_account(
    st: &ApiState,
    pods: &ResourceInfo,
    pod: &mut Value,
) -> Result<(), ApiError> {
    if pod
        .pointer("/metadata/annotations/kubernetes.io~1config.mirror")
        .is_some()
    {
        return Ok(());
    }
    let Some(r) = find("", "v1", "serviceaccounts") else {
        return Ok(());
    };
    let ns = meta::namespace(pod).unwrap_or("default").to_string();
    let name = meta::name(pod).to_string();
    let sa_name = pod
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .or_else(|| {
            pod.pointer("/spec/serviceAccount")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        })
        .unwrap_or("default")
        .to_string();
    let kv = st
        .store
        .get(&r.key(Some(&ns), &sa_name))
        .await
        .map_err(store_err)?;
    let Some(kv) = kv else {
        return Err(ApiError::forbidden(
            pods,
            &name,
            &format!(
                "error looking up service account {ns}/{sa_name}: serviceaccount \"{sa_name}\" not found"
            ),
        ));
    };
    let sa = decode(&kv)?;
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    spec.insert("serviceAccountName".into(), json!(sa_name));
    spec.insert("serviceAccount".into(), json!(sa_name));
    let automount = spec
        .get("automountServiceAccountToken")
        .and_then(Value::as_bool)
        .or_else(|| {
            sa.get("automountServiceAccountToken")
                .and_then(Value::as_bool)
        })
        .unwrap_or(true);
    if automount {
        mount_token_volume(spec);
    }
    let has_pull_secrets = spec
        .get("imagePullSecrets")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if !has_pull_secrets
        && let Some(secrets) = sa.get("imagePullSecrets").and_then(Value::as_array)
        && !secrets.is_empty()
    {
        spec.insert("imagePullSecrets".into(), json!(secrets));
    }
    Ok(())
}

/// Adds the token volume and its mounts to a pod spec (kube-apiserver's shape).
pub(crate) fn mount_token_volume(spec: &mut serde_json::Map<String, Value>) {
    let existing: Vec<String> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .filter_map(|x| x.get("name").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let reuse = existing
        .iter()
        .find(|n| n.starts_with(TOKEN_VOLUME_PREFIX))
        .cloned();
    let volume_name = reuse.clone().unwrap_or_else(|| {
        loop {
            let n = meta::generate_name(TOKEN_VOLUME_PREFIX);
            if !existing.contains(&n) {
                break n;
            }
        }
    });
    let mount =
        json!({"name": volume_name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT_PATH});
    let mut needed = false;
    for list in ["initContainers", "containers"] {
        let Some(ctrs) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in ctrs.iter_mut() {
            let Some(c) = c.as_object_mut() else {
                continue;
            };
            let mounts = c.entry("volumeMounts").or_insert_with(|| json!([]));
            let Some(mounts) = mounts.as_array_mut() else {
                continue;
            };
            let taken = mounts.iter().any(|m| {
                m.get("mountPath").and_then(Value::as_str) == Some(SERVICE_ACCOUNT_MOUNT_PATH)
            });
            if !taken {
                mounts.push(mount.clone());
                needed = true;
            }
        }
    }
    if reuse.is_none() && needed {
        let volume = json!({
            "name": volume_name,
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": TOKEN_VOLUME_EXPIRATION_SECONDS, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ],
            },
        });
        match spec.get_mut("volumes").and_then(Value::as_array_mut) {
            Some(v) => v.push(volume),
            None => {
                spec.insert("volumes".into(), json!([volume]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_of(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn token_volume_has_kube_apiserver_shape() {
        let mut spec = spec_of(json!({
            "initContainers": [{"name": "i", "image": "x"}],
            "containers": [
                {"name": "a", "image": "x", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "b", "image": "x", "volumeMounts": [{"name": "own", "mountPath": SERVICE_ACCOUNT_MOUNT_PATH}]},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}, {"name": "own", "emptyDir": {}}],
        }));
        mount_token_volume(&mut spec);
        let vols = spec["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 3);
        let v = &vols[2];
        let name = v["name"].as_str().unwrap();
        assert!(name.starts_with("kube-api-access-"), "{name}");
        assert_eq!(name.len(), "kube-api-access-".len() + 5);
        assert!(
            name["kube-api-access-".len()..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_eq!(
            v["projected"],
            json!({"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ]})
        );
        let mount =
            json!({"name": name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT_PATH});
        assert_eq!(spec["initContainers"][0]["volumeMounts"], json!([mount]));
        assert_eq!(spec["containers"][0]["volumeMounts"][1], mount);
        // A container with its own mount at the path keeps it alone.
        assert_eq!(
            spec["containers"][1]["volumeMounts"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // Admitting again (an existing kube-api-access volume) adds nothing.
        let before = spec.clone();
        mount_token_volume(&mut spec);
        assert_eq!(spec, before);
    }

    #[test]
    fn no_volume_when_every_container_has_its_own_mount() {
        let mut spec = spec_of(json!({
            "containers": [{"name": "a", "image": "x", "volumeMounts": [{"name": "own", "mountPath": SERVICE_ACCOUNT_MOUNT_PATH}]}],
            "volumes": [{"name": "own", "emptyDir": {}}],
        }));
        mount_token_volume(&mut spec);
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 1);
    }
}
