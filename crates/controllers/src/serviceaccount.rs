//! Per-namespace defaults, as kube-controller-manager's serviceaccount and root-ca-cert-publisher
//! controllers keep them: a `default` ServiceAccount in every active namespace and, when the
//! cluster CA is known, the `kube-root-ca.crt` ConfigMap (`ca.crt`) that projected service-account
//! volumes mount. Both are re-created when deleted and the ConfigMap is restored when edited.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, PostParams};

use crate::informer::{Informer, feed};
use crate::queue::Queue;
use crate::util::split_key;
use crate::{ControllerError, Ctx};

/// Name of the ServiceAccount every namespace gets.
pub const DEFAULT_SA: &str = "default";
/// Name of the ConfigMap holding the cluster CA in every namespace.
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";
/// The description annotation kube-controller-manager puts on that ConfigMap.
const ROOT_CA_DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.";

/// Runs both per-namespace controllers until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let namespaces = Informer::<Namespace>::spawn(Api::all(ctx.client.clone()), "namespaces");
    let sas = Informer::<ServiceAccount>::spawn(Api::all(ctx.client.clone()), "serviceaccounts");
    let cms = Informer::<ConfigMap>::spawn(Api::all(ctx.client.clone()), "configmaps");
    namespaces.synced().await;
    sas.synced().await;
    cms.synced().await;
    let queue = Queue::default();
    let all = {
        let ns = namespaces.clone();
        move || {
            ns.store
                .state()
                .iter()
                .filter_map(|n| n.metadata.name.clone())
                .collect::<Vec<_>>()
        }
    };
    feed(
        &namespaces,
        queue.clone(),
        |n: &Namespace| n.metadata.name.clone().into_iter().collect(),
        all.clone(),
    );
    feed(
        &sas,
        queue.clone(),
        |s: &ServiceAccount| {
            if s.metadata.name.as_deref() == Some(DEFAULT_SA) {
                s.metadata.namespace.clone().into_iter().collect()
            } else {
                Vec::new()
            }
        },
        all.clone(),
    );
    feed(
        &cms,
        queue.clone(),
        |c: &ConfigMap| {
            if c.metadata.name.as_deref() == Some(ROOT_CA_CONFIGMAP) {
                c.metadata.namespace.clone().into_iter().collect()
            } else {
                Vec::new()
            }
        },
        all.clone(),
    );
    for n in all() {
        queue.add(n);
    }
    let st = Arc::new(State {
        namespaces,
        sas,
        cms,
    });
    queue
        .work("serviceaccount", |k| sync(ctx.clone(), st.clone(), k))
        .await;
}

struct State {
    namespaces: Arc<Informer<Namespace>>,
    sas: Arc<Informer<ServiceAccount>>,
    cms: Arc<Informer<ConfigMap>>,
}

/// Whether a namespace accepts new objects (exists and is not being deleted).
fn active(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_none()
        && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
}

/// The ConfigMap data the cluster CA should be published as.
pub fn root_ca_data(ca_pem: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("ca.crt".to_string(), ca_pem.to_string())])
}

async fn sync(
    ctx: Arc<Ctx>,
    st: Arc<State>,
    key: String,
) -> Result<Option<Duration>, ControllerError> {
    let (_, ns_name) = split_key(&key);
    let Some(ns) = st.namespaces.get("", ns_name) else {
        return Ok(None);
    };
    if !active(&ns) {
        return Ok(None);
    }
    if st.sas.get(ns_name, DEFAULT_SA).is_none() {
        let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns_name);
        let sa = ServiceAccount {
            metadata: kube::api::ObjectMeta {
                name: Some(DEFAULT_SA.into()),
                namespace: Some(ns_name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => tracing::info!(namespace = ns_name, "created the default service account"),
            // Already there (the cache lags) or the namespace started terminating meanwhile.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 403 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(ca) = &ctx.config.root_ca_pem {
        let want = root_ca_data(ca);
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns_name);
        match st.cms.get(ns_name, ROOT_CA_CONFIGMAP) {
            None => {
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(ROOT_CA_CONFIGMAP.into()),
                        namespace: Some(ns_name.into()),
                        annotations: Some(BTreeMap::from([(
                            "kubernetes.io/description".to_string(),
                            ROOT_CA_DESCRIPTION.to_string(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(want),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => tracing::info!(namespace = ns_name, "published kube-root-ca.crt"),
                    Err(kube::Error::Api(s)) if s.code == 409 || s.code == 403 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Some(cm) if cm.data.as_ref() != Some(&want) || cm.binary_data.is_some() => {
                let mut fixed = (*cm).clone();
                fixed.data = Some(want);
                fixed.binary_data = None;
                let name = ROOT_CA_CONFIGMAP;
                match api.replace(name, &PostParams::default(), &fixed).await {
                    Ok(_) => tracing::info!(namespace = ns_name, "restored kube-root-ca.crt"),
                    Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                        return Ok(Some(Duration::from_millis(200)));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some(_) => {}
        }
    }
    Ok(None)
}
