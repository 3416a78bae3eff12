//! Event TTL collector: kube-apiserver expires Events after `--event-ttl` (1 h) through etcd
//! leases; our store has none, so this loop deletes core/v1 Events whose last activity
//! (lastTimestamp, eventTime, series.lastObservedTime or creationTimestamp) is older than the TTL.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams};

use crate::Ctx;

/// The last time anything happened to `ev`.
pub fn last_activity(ev: &Event) -> Option<Timestamp> {
    [
        ev.last_timestamp.as_ref().map(|t| t.0),
        ev.event_time.as_ref().map(|t| t.0),
        ev.series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref())
            .map(|t| t.0),
        ev.metadata.creation_timestamp.as_ref().map(|t| t.0),
    ]
    .into_iter()
    .flatten()
    .max()
}

/// Deletes expired Events every `event_ttl_period` until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let api: Api<Event> = Api::all(ctx.client.clone());
    let ttl = ctx.config.event_ttl;
    loop {
        match sweep(&ctx.client, &api, ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "expired events deleted"),
            Err(e) => tracing::info!(error = %e, "event ttl sweep failed; retrying"),
        }
        tokio::time::sleep(ctx.config.event_ttl_period).await;
    }
}

/// One pass: deletes every Event older than `ttl`; returns how many were deleted.
async fn sweep(
    client: &kube::Client,
    api: &Api<Event>,
    ttl: std::time::Duration,
) -> Result<usize, kube::Error> {
    let now = Timestamp::now();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let mut deleted = 0;
    let mut lp = ListParams::default().limit(500);
    loop {
        let list = api.list(&lp).await?;
        for ev in &list.items {
            let Some(last) = last_activity(ev) else {
                continue;
            };
            if now.as_millisecond().saturating_sub(last.as_millisecond()) < ttl_ms {
                continue;
            }
            let ns = ev.metadata.namespace.as_deref().unwrap_or("default");
            let name = ev.metadata.name.as_deref().unwrap_or("");
            match Api::<Event>::namespaced(client.clone(), ns)
                .delete(name, &DeleteParams::default())
                .await
            {
                Ok(_) => deleted += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok(deleted),
        }
    }
}
