//! Leader election on a `coordination.k8s.io/v1` Lease (as client-go's leaderelection does):
//! one holder at a time runs the component; the holder renews every retry period and gives up
//! when it cannot renew within the renew deadline; others take over when the lease expires.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Lease settings (defaults as kube-scheduler and kube-controller-manager use).
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Lease name (`kube-scheduler`, `kube-controller-manager`).
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This candidate's identity (node name and a random suffix).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// A leader that cannot renew for this long stops.
    pub renew_deadline: Duration,
    /// Interval between acquire and renew attempts.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Defaults for lease `name` in kube-system: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(name: &str, identity: &str) -> LeaderConfig {
        LeaderConfig {
            name: name.into(),
            namespace: "kube-system".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

enum Outcome {
    Shutdown,
    Lost,
    Ended,
}

/// Runs `component` whenever this candidate holds the lease, until `shutdown` completes. The
/// component gets a receiver that turns `true` when it must stop (leadership lost or shutdown);
/// on shutdown the lease is released so another server takes over at once.
pub async fn run_elected<F, Fut>(
    client: kube::Client,
    cfg: LeaderConfig,
    shutdown: impl Future<Output = ()>,
    component: F,
) where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api = Api::<Lease>::namespaced(client, &cfg.namespace);
    tokio::pin!(shutdown);
    loop {
        loop {
            let got = tokio::select! {
                () = &mut shutdown => return,
                r = try_acquire(&api, &cfg) => r,
            };
            match got {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::debug!(lease = %cfg.name, error = %e, "lease acquire failed"),
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(cfg.retry_period) => {}
            }
        }
        tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(component(stop_rx));
        let mut renewed = Instant::now();
        let outcome = loop {
            tokio::select! {
                () = &mut shutdown => break Outcome::Shutdown,
                _ = &mut task => break Outcome::Ended,
                () = tokio::time::sleep(cfg.retry_period) => {
                    match try_acquire(&api, &cfg).await {
                        Ok(true) => renewed = Instant::now(),
                        Ok(false) => break Outcome::Lost,
                        Err(e) => {
                            tracing::warn!(lease = %cfg.name, error = %e, "lease renewal failed");
                            if renewed.elapsed() > cfg.renew_deadline {
                                break Outcome::Lost;
                            }
                        }
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        if !matches!(outcome, Outcome::Ended)
            && tokio::time::timeout(Duration::from_secs(10), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
        match outcome {
            Outcome::Shutdown => {
                release(&api, &cfg).await;
                return;
            }
            Outcome::Lost => {
                tracing::warn!(lease = %cfg.name, "lost leadership; stopped");
            }
            Outcome::Ended => {
                tracing::error!(lease = %cfg.name, "component stopped on its own; standing down");
                release(&api, &cfg).await;
                tokio::time::sleep(cfg.retry_period).await;
            }
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Takes or renews the lease; `Ok(false)` when someone else holds it.
pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, kube::Error> {
    let secs = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(15);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder != cfg.identity {
        let renew = spec
            .renew_time
            .as_ref()
            .map(|t| t.0.as_millisecond())
            .unwrap_or(0);
        let dur = i64::from(spec.lease_duration_seconds.unwrap_or(secs)) * 1000;
        if !holder.is_empty() && renew + dur > Timestamp::now().as_millisecond() {
            return Ok(false);
        }
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(secs);
    spec.renew_time = Some(now());
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaderConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    if let Err(e) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
        tracing::debug!(lease = %cfg.name, error = %e, "releasing the lease failed");
    }
}
