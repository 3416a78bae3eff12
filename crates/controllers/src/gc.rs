//! Garbage collector: follows ownerReferences across the kinds the controller manager caches.
//! Dependents whose owners are all gone are deleted (Background); owners deleted with
//! Foreground propagation (`foregroundDeletion` finalizer) lose their dependents first; owners
//! deleted with Orphan propagation (`orphan` finalizer) release their dependents first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::discovery::ApiResource;
use serde_json::json;

use crate::informer::Informer;
use crate::queue::Queue;
use crate::{ControllerError, Ctx};

/// An object's metadata behind the informer's `Arc`, so a scan reads the cache without copying.
trait AsMeta: Send + Sync {
    fn meta(&self) -> &ObjectMeta;
}

impl<K: Resource + Send + Sync> AsMeta for K {
    fn meta(&self) -> &ObjectMeta {
        Resource::meta(self)
    }
}

/// A cached kind the collector reads metadata from.
trait MetaSource: Send + Sync {
    /// Every cached object of the kind (shared, not cloned).
    fn snapshot(&self) -> Vec<Arc<dyn AsMeta>>;
}

impl<K> MetaSource for Informer<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn snapshot(&self) -> Vec<Arc<dyn AsMeta>> {
        self.store
            .state()
            .into_iter()
            .map(|o| o as Arc<dyn AsMeta>)
            .collect()
    }
}

struct Kind {
    ar: ApiResource,
    namespaced: bool,
    source: Arc<dyn MetaSource>,
}

fn ar(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn kinds(ctx: &Ctx) -> Vec<Kind> {
    vec![
        Kind {
            ar: ar("v1", "Pod", "pods"),
            namespaced: true,
            source: ctx.pods.clone(),
        },
        Kind {
            ar: ar("v1", "Node", "nodes"),
            namespaced: false,
            source: ctx.nodes.clone(),
        },
        Kind {
            ar: ar("apps/v1", "ReplicaSet", "replicasets"),
            namespaced: true,
            source: ctx.replicasets.clone(),
        },
        Kind {
            ar: ar("apps/v1", "Deployment", "deployments"),
            namespaced: true,
            source: ctx.deployments.clone(),
        },
        Kind {
            ar: ar("v1", "Service", "services"),
            namespaced: true,
            source: ctx.services.clone(),
        },
        Kind {
            ar: ar("v1", "Endpoints", "endpoints"),
            namespaced: true,
            source: ctx.endpoints.clone(),
        },
        Kind {
            ar: ar("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
            namespaced: true,
            source: ctx.slices.clone(),
        },
        Kind {
            ar: ar("coordination.k8s.io/v1", "Lease", "leases"),
            namespaced: true,
            source: ctx.leases.clone(),
        },
        Kind {
            ar: ar("batch/v1", "Job", "jobs"),
            namespaced: true,
            source: ctx.jobs.clone(),
        },
        Kind {
            ar: ar("batch/v1", "CronJob", "cronjobs"),
            namespaced: true,
            source: ctx.cronjobs.clone(),
        },
        Kind {
            ar: ar("apps/v1", "DaemonSet", "daemonsets"),
            namespaced: true,
            source: ctx.daemonsets.clone(),
        },
        Kind {
            ar: ar("apps/v1", "ControllerRevision", "controllerrevisions"),
            namespaced: true,
            source: ctx.revisions.clone(),
        },
        Kind {
            ar: ar("apps/v1", "StatefulSet", "statefulsets"),
            namespaced: true,
            source: ctx.statefulsets.clone(),
        },
        Kind {
            ar: ar("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
            namespaced: true,
            source: ctx.pvcs.clone(),
        },
    ]
}

/// Runs the collector until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let queue = Queue::default();
    macro_rules! watch {
        ($inf:expr) => {
            crate::informer::feed(
                &$inf,
                queue.clone(),
                |_| vec!["scan".into()],
                || vec!["scan".into()],
            );
        };
    }
    watch!(ctx.pods);
    watch!(ctx.nodes);
    watch!(ctx.replicasets);
    watch!(ctx.deployments);
    watch!(ctx.services);
    watch!(ctx.endpoints);
    watch!(ctx.slices);
    watch!(ctx.leases);
    watch!(ctx.jobs);
    watch!(ctx.cronjobs);
    watch!(ctx.daemonsets);
    watch!(ctx.revisions);
    watch!(ctx.statefulsets);
    watch!(ctx.pvcs);
    queue.add("scan");
    let kinds = Arc::new(kinds(&ctx));
    queue
        .work("garbage-collector", |_| {
            let ctx = ctx.clone();
            let kinds = kinds.clone();
            async move {
                let started = std::time::Instant::now();
                scan(&ctx, &kinds).await?;
                // Coalesce bursts of events into one scan per interval; rescan now and then.
                // The interval grows with the scan's own duration (×10, at most 1 s), so that
                // on a big cluster under a stream of changes the full scan takes a bounded
                // share of the CPU instead of running back to back.
                let pause = (started.elapsed() * 10)
                    .clamp(Duration::from_millis(100), Duration::from_secs(1));
                tokio::time::sleep(pause).await;
                Ok(Some(Duration::from_secs(30)))
            }
        })
        .await;
}

/// One cached object as the scan sees it: its kind's index and its (shared) metadata.
struct Obj {
    kind: usize,
    obj: Arc<dyn AsMeta>,
}

impl Obj {
    fn m(&self) -> &ObjectMeta {
        self.obj.meta()
    }
    fn ns(&self) -> &str {
        self.m().namespace.as_deref().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.m().name.as_deref().unwrap_or_default()
    }
    fn uid(&self) -> &str {
        self.m().uid.as_deref().unwrap_or_default()
    }
    fn rv(&self) -> Option<&str> {
        self.m().resource_version.as_deref()
    }
    fn deleting(&self) -> bool {
        self.m().deletion_timestamp.is_some()
    }
    fn finalizers(&self) -> &[String] {
        self.m().finalizers.as_deref().unwrap_or_default()
    }
    fn refs(&self) -> &[OwnerReference] {
        self.m().owner_references.as_deref().unwrap_or_default()
    }
}

fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').map(|(g, _)| g).unwrap_or("")
}

impl Kind {
    fn api(&self, client: &kube::Client, ns: &str) -> Api<DynamicObject> {
        if self.namespaced {
            Api::namespaced_with(client.clone(), ns, &self.ar)
        } else {
            Api::all_with(client.clone(), &self.ar)
        }
    }
}

async fn scan(ctx: &Ctx, kinds: &[Kind]) -> Result<(), ControllerError> {
    // The scan runs often on a busy cluster: it shares the informers' objects instead of
    // copying every object's metadata each time.
    let mut objs: Vec<Obj> = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        objs.extend(
            k.source
                .snapshot()
                .into_iter()
                .map(|obj| Obj { kind: i, obj }),
        );
    }
    let by_uid: HashMap<&str, usize> = objs.iter().enumerate().map(|(i, o)| (o.uid(), i)).collect();
    let kind_of = |r: &OwnerReference| {
        kinds
            .iter()
            .position(|k| k.ar.kind == r.kind && k.ar.group == group_of(&r.api_version))
    };
    // owner index -> (dependent index, blockOwnerDeletion)
    let mut deps: HashMap<usize, Vec<(usize, bool)>> = HashMap::new();
    let mut verified: HashMap<String, bool> = HashMap::new();
    for (i, o) in objs.iter().enumerate() {
        if o.refs().is_empty() {
            continue;
        }
        let mut gone: Vec<&OwnerReference> = Vec::new();
        let mut alive = 0;
        for r in o.refs() {
            match (by_uid.get(r.uid.as_str()), kind_of(r)) {
                (Some(&oi), _) => {
                    alive += 1;
                    deps.entry(oi)
                        .or_default()
                        .push((i, r.block_owner_deletion == Some(true)));
                }
                (None, None) => alive += 1,
                (None, Some(ki)) => {
                    // The cache may lag: ask the API before acting.
                    let absent = match verified.get(&r.uid) {
                        Some(v) => *v,
                        None => {
                            let k = &kinds[ki];
                            let v = match k.api(&ctx.client, o.ns()).get_opt(&r.name).await? {
                                None => true,
                                Some(live) => live.metadata.uid.as_deref() != Some(r.uid.as_str()),
                            };
                            verified.insert(r.uid.clone(), v);
                            v
                        }
                    };
                    if absent {
                        gone.push(r);
                    } else {
                        alive += 1;
                    }
                }
            }
        }
        if gone.is_empty() || o.deleting() {
            continue;
        }
        let api = kinds[o.kind].api(&ctx.client, o.ns());
        if alive == 0 {
            tracing::info!(kind = %kinds[o.kind].ar.kind, namespace = %o.ns(), name = %o.name(), "deleting dependent whose owners are gone");
            ignore_missing(
                api.delete(o.name(), &DeleteParams::background())
                    .await
                    .map(|_| ()),
            )?;
        } else {
            let keep: Vec<&OwnerReference> = o
                .refs()
                .iter()
                .filter(|r| !gone.iter().any(|g| g.uid == r.uid))
                .collect();
            let patch = json!({"metadata": {"ownerReferences": keep, "resourceVersion": o.rv()}});
            ignore_missing(
                api.patch(o.name(), &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ()),
            )?;
        }
    }
    // Owners being deleted with Orphan or Foreground propagation.
    for (oi, o) in objs.iter().enumerate() {
        if !o.deleting() {
            continue;
        }
        let my = deps.get(&oi).cloned().unwrap_or_default();
        if o.finalizers().iter().any(|f| f == "orphan") {
            for (di, _) in &my {
                let d = &objs[*di];
                let keep: Vec<&OwnerReference> =
                    d.refs().iter().filter(|r| r.uid != o.uid()).collect();
                let patch =
                    json!({"metadata": {"ownerReferences": keep, "resourceVersion": d.rv()}});
                ignore_missing(
                    kinds[d.kind]
                        .api(&ctx.client, d.ns())
                        .patch(d.name(), &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .map(|_| ()),
                )?;
            }
            remove_finalizer(ctx, &kinds[o.kind], o, "orphan").await?;
        } else if o.finalizers().iter().any(|f| f == "foregroundDeletion") {
            for (di, block) in &my {
                let d = &objs[*di];
                if d.deleting() {
                    continue;
                }
                let dp = DeleteParams {
                    propagation_policy: Some(if *block {
                        PropagationPolicy::Foreground
                    } else {
                        PropagationPolicy::Background
                    }),
                    ..Default::default()
                };
                ignore_missing(
                    kinds[d.kind]
                        .api(&ctx.client, d.ns())
                        .delete(d.name(), &dp)
                        .await
                        .map(|_| ()),
                )?;
            }
            if !my.iter().any(|(_, block)| *block) {
                remove_finalizer(ctx, &kinds[o.kind], o, "foregroundDeletion").await?;
            }
        }
    }
    Ok(())
}

async fn remove_finalizer(ctx: &Ctx, kind: &Kind, o: &Obj, f: &str) -> Result<(), ControllerError> {
    let rest: Vec<&String> = o.finalizers().iter().filter(|x| *x != f).collect();
    let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": o.rv()}});
    tracing::info!(kind = %kind.ar.kind, namespace = %o.ns(), name = %o.name(), finalizer = f, "dependents handled; removing finalizer");
    ignore_missing(
        kind.api(&ctx.client, o.ns())
            .patch(o.name(), &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ()),
    )
}

/// 404 (already gone) and 409 (changed under us; the next scan sees the new state) are fine.
fn ignore_missing(r: Result<(), kube::Error>) -> Result<(), ControllerError> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        other => other.map_err(Into::into),
    }
}
