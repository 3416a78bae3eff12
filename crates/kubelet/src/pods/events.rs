//! Core/v1 Events about pods (Pulling, Created, Started, Killing, Unhealthy, ...), best effort.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use crate::node::now;
use crate::pods::Shared;

/// Records an event about `pod`; failures are logged, never returned.
pub async fn record(sh: &Shared, pod: &Pod, kind: &str, reason: &str, message: &str) {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let ev = Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{stamp:x}")),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            resource_version: pod.metadata.resource_version.clone(),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(kind.into()),
        count: Some(1),
        first_timestamp: Some(now()),
        last_timestamp: Some(now()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(sh.cfg.node_name.clone()),
        }),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(sh.cfg.node_name.clone()),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(sh.client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        tracing::debug!(pod = %name, %reason, error = %e, "recording event failed");
    }
}
