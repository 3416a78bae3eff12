//! skiff-controllers: one module per controller, each a client of the API through `kube`,
//! sharing one reflector per resource type, run by the controller manager inside `skiff server`.

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod events;
pub mod eventttl;
pub mod gc;
pub mod informer;
pub mod ipam;
pub mod job;
pub mod leader;
pub mod nodelifecycle;
pub mod podgc;
pub mod queue;
pub mod replicaset;
pub mod serviceaccount;
pub mod statefulset;
pub mod ttl;
pub mod util;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Endpoints, Node, PersistentVolumeClaim, Pod, ReplicationController, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;

use informer::Informer;

/// Errors of a reconcile pass (logged and retried by the work queue).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// An API request failed.
    #[error("api request failed: {0}")]
    Kube(#[from] kube::Error),
    /// The object cannot be handled as written.
    #[error("{0}")]
    Invalid(String),
}

/// Controller manager settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Pod network (`--cluster-cidr`) that node pod CIDRs are carved from.
    pub cluster_cidr: String,
    /// Prefix length of each node's pod CIDR.
    pub node_cidr_mask: u8,
    /// A node whose lease is not renewed for this long becomes `Ready=Unknown`.
    pub node_monitor_grace: Duration,
    /// How often node health is checked.
    pub node_monitor_period: Duration,
    /// The cluster CA (PEM) published as `kube-root-ca.crt` in every namespace; None: not
    /// published.
    pub root_ca_pem: Option<String>,
    /// How often PodGC runs (kube-controller-manager: 20 s).
    pub podgc_period: Duration,
    /// How long pods of a vanished node wait before PodGC checks the node again and deletes them.
    pub podgc_quarantine: Duration,
    /// Terminated pods kept before PodGC deletes the oldest (`--terminated-pod-gc-threshold`,
    /// 12500; 0 disables).
    pub terminated_pod_gc_threshold: usize,
    /// First wait before a failed Job pod is replaced; doubles with each failure (upstream: 10 s).
    pub job_pod_failure_backoff: Duration,
    /// Events whose last activity is older than this are deleted (kube-apiserver's
    /// `--event-ttl`, 1 h).
    pub event_ttl: Duration,
    /// How often expired Events are looked for.
    pub event_ttl_period: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            cluster_cidr: "10.42.0.0/16".into(),
            node_cidr_mask: 24,
            node_monitor_grace: Duration::from_secs(40),
            node_monitor_period: Duration::from_secs(5),
            root_ca_pem: None,
            podgc_period: Duration::from_secs(20),
            podgc_quarantine: Duration::from_secs(40),
            terminated_pod_gc_threshold: 12_500,
            job_pod_failure_backoff: Duration::from_secs(10),
            event_ttl: Duration::from_secs(3600),
            event_ttl_period: Duration::from_secs(60),
        }
    }
}

/// What every controller shares: the client, the settings and one informer per type.
pub struct Ctx {
    /// The API client.
    pub client: kube::Client,
    /// Settings.
    pub config: ControllerConfig,
    /// All pods.
    pub pods: Arc<Informer<Pod>>,
    /// All nodes.
    pub nodes: Arc<Informer<Node>>,
    /// All ReplicaSets.
    pub replicasets: Arc<Informer<ReplicaSet>>,
    /// All Deployments.
    pub deployments: Arc<Informer<Deployment>>,
    /// All Services.
    pub services: Arc<Informer<Service>>,
    /// All Endpoints.
    pub endpoints: Arc<Informer<Endpoints>>,
    /// All EndpointSlices.
    pub slices: Arc<Informer<EndpointSlice>>,
    /// Node leases (namespace `kube-node-lease`).
    pub leases: Arc<Informer<Lease>>,
    /// All Jobs.
    pub jobs: Arc<Informer<Job>>,
    /// All CronJobs.
    pub cronjobs: Arc<Informer<CronJob>>,
    /// All DaemonSets.
    pub daemonsets: Arc<Informer<DaemonSet>>,
    /// All ControllerRevisions.
    pub revisions: Arc<Informer<ControllerRevision>>,
    /// All StatefulSets.
    pub statefulsets: Arc<Informer<StatefulSet>>,
    /// All PersistentVolumeClaims.
    pub pvcs: Arc<Informer<PersistentVolumeClaim>>,
    /// All ReplicationControllers.
    pub rcs: Arc<Informer<ReplicationController>>,
    /// All PodDisruptionBudgets.
    pub pdbs: Arc<Informer<PodDisruptionBudget>>,
    /// The Event recorder (one writer; each controller records under its own component via
    /// [`events::Recorder::component`]).
    pub events: events::Recorder,
}

impl Ctx {
    /// Starts every informer and waits until each has read its first list.
    pub async fn start(client: kube::Client, config: ControllerConfig) -> Arc<Ctx> {
        let ctx = Ctx {
            pods: Informer::spawn(Api::all(client.clone()), "pods"),
            nodes: Informer::spawn(Api::all(client.clone()), "nodes"),
            replicasets: Informer::spawn(Api::all(client.clone()), "replicasets"),
            deployments: Informer::spawn(Api::all(client.clone()), "deployments"),
            services: Informer::spawn(Api::all(client.clone()), "services"),
            endpoints: Informer::spawn(Api::all(client.clone()), "endpoints"),
            slices: Informer::spawn(Api::all(client.clone()), "endpointslices"),
            leases: Informer::spawn(Api::namespaced(client.clone(), "kube-node-lease"), "leases"),
            jobs: Informer::spawn(Api::all(client.clone()), "jobs"),
            cronjobs: Informer::spawn(Api::all(client.clone()), "cronjobs"),
            daemonsets: Informer::spawn(Api::all(client.clone()), "daemonsets"),
            revisions: Informer::spawn(Api::all(client.clone()), "controllerrevisions"),
            statefulsets: Informer::spawn(Api::all(client.clone()), "statefulsets"),
            pvcs: Informer::spawn(Api::all(client.clone()), "persistentvolumeclaims"),
            rcs: Informer::spawn(Api::all(client.clone()), "replicationcontrollers"),
            pdbs: Informer::spawn(Api::all(client.clone()), "poddisruptionbudgets"),
            events: events::Recorder::new(client.clone(), "kube-controller-manager"),
            client,
            config,
        };
        ctx.pods.synced().await;
        ctx.nodes.synced().await;
        ctx.replicasets.synced().await;
        ctx.deployments.synced().await;
        ctx.services.synced().await;
        ctx.endpoints.synced().await;
        ctx.slices.synced().await;
        ctx.leases.synced().await;
        ctx.jobs.synced().await;
        ctx.cronjobs.synced().await;
        ctx.daemonsets.synced().await;
        ctx.revisions.synced().await;
        ctx.statefulsets.synced().await;
        ctx.pvcs.synced().await;
        ctx.rcs.synced().await;
        ctx.pdbs.synced().await;
        Arc::new(ctx)
    }
}

/// Runs every controller until `shutdown` completes.
///
/// The caller owns leader election: start this only on the server that holds the
/// `kube-controller-manager` Lease.
pub async fn run(
    client: kube::Client,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    tokio::pin!(shutdown);
    let ctx = tokio::select! {
        c = Ctx::start(client, config) => c,
        () = &mut shutdown => return Ok(()),
    };
    let tasks = vec![
        tokio::spawn(replicaset::run(ctx.clone())),
        tokio::spawn(deployment::run(ctx.clone())),
        tokio::spawn(gc::run(ctx.clone())),
        tokio::spawn(ipam::run(ctx.clone())),
        tokio::spawn(endpoints::run(ctx.clone())),
        tokio::spawn(nodelifecycle::run(ctx.clone())),
        tokio::spawn(podgc::run(ctx.clone())),
        tokio::spawn(serviceaccount::run(ctx.clone())),
        tokio::spawn(job::run(ctx.clone())),
        tokio::spawn(ttl::run(ctx.clone())),
        tokio::spawn(cronjob::run(ctx.clone())),
        tokio::spawn(daemonset::run(ctx.clone())),
        tokio::spawn(statefulset::run(ctx.clone())),
        tokio::spawn(disruption::run(ctx.clone())),
        tokio::spawn(eventttl::run(ctx.clone())),
    ];
    shutdown.await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    tracing::info!("controllers stopped");
    Ok(())
}
