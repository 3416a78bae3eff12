//! TTL-after-finished controller: deletes a finished Job (Complete or Failed)
//! `ttlSecondsAfterFinished` seconds after it finished, with Background propagation so the
//! garbage collector removes its pods.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Preconditions};

use crate::queue::Queue;
use crate::util::{key, split_key};
use crate::{ControllerError, Ctx};

/// Runs the controller until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let queue = Queue::default();
    let jobs = ctx.jobs.clone();
    crate::informer::feed(
        &ctx.jobs,
        queue.clone(),
        |j: &Job| {
            if wants_ttl(j) {
                vec![key(&j.metadata)]
            } else {
                vec![]
            }
        },
        move || {
            jobs.store
                .state()
                .iter()
                .filter(|j| wants_ttl(j))
                .map(|j| key(&j.metadata))
                .collect()
        },
    );
    for j in ctx.jobs.store.state() {
        if wants_ttl(&j) {
            queue.add(key(&j.metadata));
        }
    }
    queue
        .work("ttl-after-finished", |k| sync(ctx.clone(), k))
        .await;
}

fn wants_ttl(j: &Job) -> bool {
    j.spec
        .as_ref()
        .is_some_and(|s| s.ttl_seconds_after_finished.is_some())
        && j.metadata.deletion_timestamp.is_none()
        && finish_time(j).is_some()
}

/// When the Job finished: its completionTime, or when its Complete/Failed condition became
/// True.
pub fn finish_time(j: &Job) -> Option<Timestamp> {
    let st = j.status.as_ref()?;
    let cond = st
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?;
    if cond.type_ == "Complete"
        && let Some(t) = &st.completion_time
    {
        return Some(t.0);
    }
    Some(
        cond.last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(Timestamp::now),
    )
}

/// How long until the Job expires (zero when it has), if it has a TTL and has finished.
pub fn time_left(j: &Job, now: Timestamp) -> Option<Duration> {
    let ttl = j.spec.as_ref()?.ttl_seconds_after_finished?;
    let done = finish_time(j)?;
    let expire = done.as_millisecond() + i64::from(ttl) * 1000;
    let left = expire - now.as_millisecond();
    Some(Duration::from_millis(u64::try_from(left).unwrap_or(0)))
}

async fn sync(ctx: Arc<Ctx>, k: String) -> Result<Option<Duration>, ControllerError> {
    let (ns, name) = split_key(&k);
    let Some(job) = ctx.jobs.get(ns, name) else {
        return Ok(None);
    };
    if !wants_ttl(&job) {
        return Ok(None);
    }
    let Some(left) = time_left(&job, Timestamp::now()) else {
        return Ok(None);
    };
    if !left.is_zero() {
        return Ok(Some(left));
    }
    let api = Api::<Job>::namespaced(ctx.client.clone(), ns);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: job.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {
            tracing::info!(job = %k, "deleted finished job after its ttl");
            Ok(None)
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expiry_from_completion_time() {
        let j: Job = serde_json::from_value(json!({
            "metadata": {"name": "j"},
            "spec": {"template": {}, "ttlSecondsAfterFinished": 100},
            "status": {"completionTime": "2026-01-01T00:00:00Z",
                "conditions": [{"type": "Complete", "status": "True"}]}
        }))
        .unwrap_or_default();
        let at = |s: &str| s.parse::<Timestamp>().unwrap_or(Timestamp::UNIX_EPOCH);
        assert_eq!(
            time_left(&j, at("2026-01-01T00:00:40Z")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            time_left(&j, at("2026-01-01T00:05:00Z")),
            Some(Duration::ZERO)
        );
    }
}
