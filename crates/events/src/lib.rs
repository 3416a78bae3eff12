//! core/v1 Events for skiff's controllers, scheduler and kubelet: a recorder that writes Events
//! in the background (a sync, a binding or a pod start never waits for, nor fails on, an Event
//! write; a full backlog drops the Event, as client-go's broadcaster does) and folds repeats of
//! the same involvedObject + type + reason + message into one Event whose `count` and
//! `lastTimestamp` grow, as client-go's EventCorrelator does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;

/// `Normal` event type.
pub const NORMAL: &str = "Normal";
/// `Warning` event type.
pub const WARNING: &str = "Warning";

/// How long a written Event is remembered for de-duplication (client-go keeps its cache
/// entries until they fall out of an LRU; Events themselves expire after the event TTL).
const DEDUP_WINDOW: Duration = Duration::from_secs(600);
/// Most Events waiting to be written; beyond that new ones are dropped (logged).
const BACKLOG: usize = 1024;
/// Most remembered Events per recorder.
const CACHE_MAX: usize = 4096;

/// One Event to write.
struct Pending {
    component: &'static str,
    host: Option<Arc<str>>,
    object: ObjectReference,
    type_: &'static str,
    reason: &'static str,
    message: String,
}

/// Writes Events as `component` (e.g. `replicaset-controller`). Cheap to clone; clones made by
/// [`Recorder::component`] share one writer task.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
    component: &'static str,
    host: Option<Arc<str>>,
}

/// The involved object reference of `obj`.
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    let m = obj.meta();
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        ..Default::default()
    }
}

impl Recorder {
    /// Starts a writer task; Events are recorded as `component`.
    pub fn new(client: kube::Client, component: &'static str) -> Recorder {
        let (tx, rx) = mpsc::channel(BACKLOG);
        tokio::spawn(writer(client, rx));
        Recorder {
            tx,
            component,
            host: None,
        }
    }

    /// This recorder, with Events reported from node `host` (`source.host` and
    /// `reportingInstance`, as the kubelet's are).
    pub fn on_host(mut self, host: &str) -> Recorder {
        self.host = Some(Arc::from(host));
        self
    }

    /// A recorder that shares this one's writer and records as `component`.
    pub fn component(&self, component: &'static str) -> Recorder {
        Recorder {
            tx: self.tx.clone(),
            component,
            host: self.host.clone(),
        }
    }

    /// Records an Event about `obj` (never blocks; a full backlog drops the Event, logged at
    /// debug level: a burst of thousands would otherwise flood the log).
    pub fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) {
        self.event_ref(reference(obj), type_, reason, message);
    }

    /// Records an Event about the object `object` refers to.
    pub fn event_ref(
        &self,
        object: ObjectReference,
        type_: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) {
        let p = Pending {
            component: self.component,
            host: self.host.clone(),
            object,
            type_,
            reason,
            message: message.into(),
        };
        if let Err(e) = self.tx.try_send(p) {
            tracing::debug!(component = self.component, reason, error = %e, "event dropped");
        }
    }
}

/// What the writer remembers of an Event it wrote.
struct Seen {
    name: String,
    count: i32,
    at: Instant,
}

type DedupKey = (
    &'static str,
    String,
    String,
    String,
    String,
    String,
    &'static str,
    &'static str,
    String,
);

fn dedup_key(p: &Pending) -> DedupKey {
    let o = &p.object;
    (
        p.component,
        o.kind.clone().unwrap_or_default(),
        o.namespace.clone().unwrap_or_default(),
        o.name.clone().unwrap_or_default(),
        o.uid.clone().unwrap_or_default(),
        o.api_version.clone().unwrap_or_default(),
        p.type_,
        p.reason,
        p.message.clone(),
    )
}

async fn writer(client: kube::Client, mut rx: mpsc::Receiver<Pending>) {
    let mut seen: HashMap<DedupKey, Seen> = HashMap::new();
    while let Some(p) = rx.recv().await {
        let component = p.component;
        let ns = p
            .object
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(client.clone(), &ns);
        let key = dedup_key(&p);
        let now = Timestamp::now();
        if let Some(s) = seen.get_mut(&key)
            && s.at.elapsed() < DEDUP_WINDOW
        {
            let count = s.count + 1;
            let patch = json!({"count": count, "lastTimestamp": Time(now)});
            match api
                .patch(&s.name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    s.count = count;
                    s.at = Instant::now();
                    continue;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    tracing::warn!(component, reason = p.reason, error = %e, "could not update event");
                    continue;
                }
            }
        }
        let obj_name = p.object.name.clone().unwrap_or_default();
        let nanos = now.as_nanosecond();
        let name = format!("{obj_name}.{nanos:x}");
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: p.object,
            reason: Some(p.reason.into()),
            message: Some(p.message),
            type_: Some(p.type_.into()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            reporting_component: Some(component.into()),
            reporting_instance: Some(p.host.as_deref().unwrap_or(component).into()),
            source: Some(EventSource {
                component: Some(component.into()),
                host: p.host.as_deref().map(str::to_string),
            }),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => {
                if seen.len() >= CACHE_MAX {
                    seen.retain(|_, s| s.at.elapsed() < DEDUP_WINDOW);
                    if seen.len() >= CACHE_MAX {
                        seen.clear();
                    }
                }
                seen.insert(
                    key,
                    Seen {
                        name,
                        count: 1,
                        at: Instant::now(),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(component, namespace = %ns, object = %obj_name, reason = ev.reason.as_deref().unwrap_or(""), error = %e, "could not record event");
            }
        }
    }
}
