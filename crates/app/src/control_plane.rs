//! The control plane inside `skiff server`: the scheduler and the controller manager, with
//! in-process API clients. With an external datastore (etcd) each runs under leader election on
//! a Lease in kube-system (`kube-scheduler`, `kube-controller-manager`), so that several servers
//! sharing it run one of each; with the embedded store (one server by construction) they just run.

use tokio::sync::watch;
use tokio::task::JoinHandle;

use skiff_controllers::leader::{LeaderConfig, run_elected};

use crate::client::in_process_client;
use crate::server::ServerConfig;

/// The running scheduler and controller-manager candidates.
pub struct ControlPlane {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// This server's candidate identity: node name (or host name) and a random suffix.
fn identity(cfg: &ServerConfig) -> String {
    let name = cfg
        .node_name
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "skiff".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{name}_{:08x}", nanos ^ std::process::id().rotate_left(16))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Starts the scheduler and the controllers (each only while this server holds its lease).
/// `ca_pem` is the cluster CA, published in every namespace as `kube-root-ca.crt`.
pub fn start(router: axum::Router, cfg: &ServerConfig, ca_pem: &str) -> ControlPlane {
    let (stop, stop_rx) = watch::channel(false);
    let id = identity(cfg);
    let sched_client =
        in_process_client(router.clone(), "system:kube-scheduler", &["system:masters"]);
    let cm_client = in_process_client(
        router,
        "system:kube-controller-manager",
        &["system:masters"],
    );
    let controller_config = skiff_controllers::ControllerConfig {
        cluster_cidr: cfg.cluster_cidr.clone(),
        root_ca_pem: Some(ca_pem.to_string()),
        ..Default::default()
    };
    // With the embedded store only one server can run (the store file is locked), so the
    // scheduler and the controllers run without leader election there: renewing two Leases every
    // 2 s would write to the disk 86,400 times a day for nothing (an SD card's wear) and keep the
    // API server's whole write path hot in an otherwise idle server.
    let elect = cfg.datastore_endpoint.is_some();
    if !elect {
        tracing::info!("leader election off: the embedded store admits one server");
    }
    let mut tasks = Vec::new();
    let client = sched_client.clone();
    tasks.push(spawn_component(
        elect,
        sched_client,
        LeaderConfig::new("kube-scheduler", &id),
        stop_rx.clone(),
        move |rx| {
            let client = client.clone();
            async move {
                let cfg = skiff_scheduler::SchedulerConfig::default();
                if let Err(e) = skiff_scheduler::run(client, cfg, stopped(rx)).await {
                    tracing::error!(error = %e, "scheduler stopped");
                }
            }
        },
    ));
    let client = cm_client.clone();
    tasks.push(spawn_component(
        elect,
        cm_client,
        LeaderConfig::new("kube-controller-manager", &id),
        stop_rx,
        move |rx| {
            let client = client.clone();
            let config = controller_config.clone();
            async move {
                if let Err(e) = skiff_controllers::run(client, config, stopped(rx)).await {
                    tracing::error!(error = %e, "controllers stopped");
                }
            }
        },
    ));
    ControlPlane { stop, tasks }
}

/// Runs `component` under leader election on `lease` when `elect`, else at once until `stop`.
fn spawn_component<F, Fut>(
    elect: bool,
    client: kube::Client,
    lease: LeaderConfig,
    stop: watch::Receiver<bool>,
    component: F,
) -> JoinHandle<()>
where
    F: Fn(watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if elect {
        tokio::spawn(run_elected(client, lease, stopped(stop), component))
    } else {
        tokio::spawn(component(stop))
    }
}

impl ControlPlane {
    /// Stops both components and releases their leases.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            if tokio::time::timeout(std::time::Duration::from_secs(15), t)
                .await
                .is_err()
            {
                tracing::warn!("control plane did not stop in time");
            }
        }
    }
}
