//! Core/v1 Events about pods (Pulling, Created, Started, Killing, Unhealthy, ...), best effort.
//!
//! Written through `skiff-events`' recorder, as the kubelet's event broadcaster does: recording
//! never waits for the API server (a pod's start-up never waits on an Event write), a full
//! backlog drops the Event, and repeats (probe failures, back-offs) fold into one Event whose
//! count grows.

use k8s_openapi::api::core::v1::Pod;

use crate::pods::Shared;

pub use skiff_events::Recorder;

/// The kubelet's recorder: component `kubelet`, reported from `node`.
pub fn recorder(client: kube::Client, node: &str) -> Recorder {
    Recorder::new(client, "kubelet").on_host(node)
}

/// Records an event about `pod` (queued; written in the background). Failures are logged,
/// never returned.
pub async fn record(
    sh: &Shared,
    pod: &Pod,
    kind: &'static str,
    reason: &'static str,
    message: &str,
) {
    let mut object = skiff_events::reference(pod);
    if object.namespace.is_none() {
        object.namespace = Some("default".into());
    }
    sh.events.event_ref(object, kind, reason, message);
}
