//! CronJob controller: parses the 5-field cron schedule (and `@hourly`-style nicknames) in the
//! CronJob's `timeZone`, starts a Job `<cronjob>-<minutes since epoch>` for the most recent
//! missed time (honouring startingDeadlineSeconds, suspend and concurrencyPolicy
//! Allow/Forbid/Replace), tracks active Jobs and lastScheduleTime/lastSuccessfulTime, and prunes
//! finished Jobs beyond the history limits.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use crate::events::{NORMAL, Recorder, WARNING, api_message};
use crate::job::{finished, true_cond};
use crate::queue::Queue;
use crate::util::{self, controller_ref, split_key};
use crate::{ControllerError, Ctx};

/// Annotation on a Job with the time it was scheduled for (RFC 3339, in the CronJob's zone).
pub const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// More missed start times than this are reported as a warning (as upstream).
const TOO_MANY_MISSED: usize = 100;

/// A parsed schedule in its time zone.
pub struct Schedule {
    cron: Cron,
    tz: chrono_tz::Tz,
}

/// Parses a 5-field schedule (or nickname) and an IANA time zone (UTC when unset).
pub fn parse_schedule(schedule: &str, time_zone: Option<&str>) -> Result<Schedule, String> {
    let tz = match time_zone {
        None | Some("") => chrono_tz::UTC,
        Some(z) => z
            .parse::<chrono_tz::Tz>()
            .map_err(|_| format!("unknown time zone {z:?}"))?,
    };
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(schedule)
        .map_err(|e| format!("unparseable schedule {schedule:?}: {e}"))?;
    Ok(Schedule { cron, tz })
}

impl Schedule {
    /// The first schedule time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The most recent schedule time in `(earliest, now]`, and how many there were.
    pub fn most_recent(
        &self,
        earliest: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> (Option<DateTime<Utc>>, usize) {
        let mut last = None;
        let mut n = 0;
        let mut t = earliest;
        while let Some(next) = self.next_after(t) {
            if next > now {
                break;
            }
            n += 1;
            last = Some(next);
            t = next;
            if n > TOO_MANY_MISSED {
                // Jump close to now; only the latest time matters from here.
                if let Some(prev) = self
                    .cron
                    .find_previous_occurrence(&now.with_timezone(&self.tz), true)
                    .ok()
                    .map(|d| d.with_timezone(&Utc))
                {
                    last = Some(prev);
                }
                break;
            }
        }
        (last, n)
    }

    /// `t` written in the schedule's zone (the scheduled-timestamp annotation).
    pub fn local_rfc3339(&self, t: DateTime<Utc>) -> String {
        t.with_timezone(&self.tz)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }
}

/// The name of the Job for scheduled time `t`: `<cronjob>-<minutes since epoch>`.
pub fn job_name(cronjob: &str, t: DateTime<Utc>) -> String {
    format!("{cronjob}-{}", t.timestamp() / 60)
}

fn to_chrono(t: Timestamp) -> DateTime<Utc> {
    Utc.timestamp_opt(t.as_second(), 0)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

fn to_time(t: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(t.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Runs the controller until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let queue = Queue::default();
    let _ = crate::informer::feed_owner(&ctx.cronjobs, &ctx.jobs, "CronJob", &queue);
    queue.work("cronjob", |k| sync(ctx.clone(), k)).await;
}

fn job_ref(j: &Job) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: j.metadata.name.clone(),
        namespace: j.metadata.namespace.clone(),
        uid: j.metadata.uid.clone(),
        resource_version: j.metadata.resource_version.clone(),
        ..Default::default()
    }
}

async fn delete_job(
    rec: &Recorder,
    cj: &CronJob,
    api: &Api<Job>,
    name: &str,
) -> Result<(), ControllerError> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            rec.event(
                cj,
                NORMAL,
                "SuccessfulDelete",
                format!("Deleted job {name}"),
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The Event source of this controller (as kube-controller-manager names it).
const COMPONENT: &str = "cronjob-controller";

async fn sync(ctx: Arc<Ctx>, k: String) -> Result<Option<Duration>, ControllerError> {
    let (ns, name) = split_key(&k);
    let Some(cj) = ctx.cronjobs.get(ns, name) else {
        return Ok(None);
    };
    let Some(spec) = cj.spec.as_ref() else {
        return Ok(None);
    };
    let cj_uid = cj.metadata.uid.clone().unwrap_or_default();
    let jobs_api = Api::<Job>::namespaced(ctx.client.clone(), ns);
    let cj_api = Api::<CronJob>::namespaced(ctx.client.clone(), ns);
    let rec = ctx.events.component(COMPONENT);
    let now = to_chrono(Timestamp::now());
    let mut jobs: Vec<Arc<Job>> = ctx
        .jobs
        .in_namespace(ns)
        .into_iter()
        .filter(|j| controller_ref(&j.metadata).is_some_and(|r| r.uid == cj_uid))
        .filter(|j| !util::deleting(&j.metadata))
        .collect();
    let old = cj.status.clone().unwrap_or_default();
    let mut active: Vec<&Arc<Job>> = jobs.iter().filter(|j| finished(j).is_none()).collect();
    let mut last_success = old.last_successful_time.clone();
    for j in &jobs {
        if let Some(done) = true_cond(j.status.as_ref(), "Complete")
            && let Some(t) = j
                .status
                .as_ref()
                .and_then(|s| s.completion_time.clone())
                .or_else(|| done.last_transition_time.clone())
            && last_success.as_ref().is_none_or(|l| l.0 < t.0)
        {
            last_success = Some(t);
        }
    }
    let mut last_schedule = old.last_schedule_time.clone();
    let mut requeue = None;

    // History limits: drop the oldest finished Jobs beyond them.
    let limit = |v: Option<i32>, d: i32| usize::try_from(v.unwrap_or(d).max(0)).unwrap_or(0);
    for (kind, keep) in [
        ("Complete", limit(spec.successful_jobs_history_limit, 3)),
        ("Failed", limit(spec.failed_jobs_history_limit, 1)),
    ] {
        let mut done: Vec<&Arc<Job>> = jobs.iter().filter(|j| finished(j) == Some(kind)).collect();
        if done.len() > keep {
            done.sort_by_key(|j| {
                j.status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .or(j.metadata.creation_timestamp.as_ref())
                    .map(|t| t.0)
            });
            for j in &done[..done.len() - keep] {
                delete_job(
                    &rec,
                    &cj,
                    &jobs_api,
                    j.metadata.name.as_deref().unwrap_or(""),
                )
                .await?;
            }
        }
    }

    if !util::deleting(&cj.metadata) && !spec.suspend.unwrap_or(false) {
        match parse_schedule(&spec.schedule, spec.time_zone.as_deref()) {
            Err(e) => {
                tracing::warn!(cronjob = %k, error = %e, "cannot schedule");
            }
            Ok(sched) => {
                let created = cj
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| to_chrono(t.0))
                    .unwrap_or(now);
                let mut earliest = last_schedule
                    .as_ref()
                    .map(|t| to_chrono(t.0))
                    .unwrap_or(created);
                if let Some(sds) = spec.starting_deadline_seconds {
                    let floor = now - chrono::Duration::seconds(sds);
                    earliest = earliest.max(floor);
                }
                let (due, missed) = sched.most_recent(earliest, now);
                if missed > TOO_MANY_MISSED {
                    tracing::warn!(cronjob = %k, missed, "too many missed start times; check clock skew");
                }
                if let Some(next) = sched.next_after(now) {
                    let wait =
                        (next - now).to_std().unwrap_or_default() + Duration::from_millis(100);
                    requeue = Some(wait);
                }
                if let Some(t) = due {
                    let too_late = spec
                        .starting_deadline_seconds
                        .is_some_and(|sds| t + chrono::Duration::seconds(sds) < now);
                    let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
                    let jname = job_name(name, t);
                    let exists = jobs
                        .iter()
                        .any(|j| j.metadata.name.as_deref() == Some(&jname));
                    if too_late {
                        tracing::info!(cronjob = %k, scheduled = %t, "missed starting deadline");
                    } else if exists {
                        last_schedule = Some(to_time(t));
                    } else if policy == "Forbid" && !active.is_empty() {
                        tracing::debug!(cronjob = %k, "a job is still active; skipping (Forbid)");
                    } else {
                        if policy == "Replace" {
                            for j in &active {
                                delete_job(
                                    &rec,
                                    &cj,
                                    &jobs_api,
                                    j.metadata.name.as_deref().unwrap_or(""),
                                )
                                .await?;
                            }
                            active.clear();
                        }
                        let job = job_for(&cj, &sched, t);
                        match jobs_api.create(&PostParams::default(), &job).await {
                            Ok(j) => {
                                tracing::info!(cronjob = %k, job = %jname, "created job");
                                rec.event(
                                    &*cj,
                                    NORMAL,
                                    "SuccessfulCreate",
                                    format!("Created job {jname}"),
                                );
                                jobs.push(Arc::new(j));
                                last_schedule = Some(to_time(t));
                            }
                            Err(kube::Error::Api(s)) if s.code == 409 => {
                                // Ours from an earlier pass that the cache has not seen yet.
                                last_schedule = Some(to_time(t));
                            }
                            Err(e) => {
                                let e = ControllerError::from(e);
                                rec.event(
                                    &*cj,
                                    WARNING,
                                    "FailedCreate",
                                    format!("Error creating job: {}", api_message(&e)),
                                );
                                return Err(e);
                            }
                        }
                    }
                }
            }
        }
    }
    // Jobs that were active and have finished since.
    for r in old.active.iter().flatten() {
        if let Some(j) = jobs.iter().find(|j| j.metadata.uid == r.uid)
            && let Some(c) = finished(j)
        {
            rec.event(
                &*cj,
                NORMAL,
                "SawCompletedJob",
                format!(
                    "Saw completed job: {}, status: {c}",
                    j.metadata.name.as_deref().unwrap_or("")
                ),
            );
        }
    }
    let active: Vec<ObjectReference> = jobs
        .iter()
        .filter(|j| finished(j).is_none())
        .map(|j| job_ref(j))
        .collect();
    let status = json!({
        "active": if active.is_empty() { serde_json::Value::Null } else { json!(active) },
        "lastScheduleTime": last_schedule,
        "lastSuccessfulTime": last_success,
    });
    let same = old
        .active
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|r| &r.uid)
        .collect::<Vec<_>>()
        == active.iter().map(|r| &r.uid).collect::<Vec<_>>()
        && old.last_schedule_time == last_schedule
        && old.last_successful_time == last_success;
    if !same && !util::patch_status(&cj_api, name, status).await? {
        return Ok(None);
    }
    Ok(requeue)
}

/// The Job of `cj` for scheduled time `t`.
fn job_for(cj: &CronJob, sched: &Schedule, t: DateTime<Utc>) -> Job {
    let name = cj.metadata.name.clone().unwrap_or_default();
    let tmpl = cj
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .unwrap_or_default();
    let tmeta = tmpl.metadata.unwrap_or_default();
    let mut annotations = tmeta.annotations.unwrap_or_default();
    annotations.insert(SCHEDULED_TIMESTAMP.into(), sched.local_rfc3339(t));
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(&name, t)),
            namespace: cj.metadata.namespace.clone(),
            labels: tmeta.labels,
            annotations: Some(annotations),
            owner_references: Some(vec![util::owner_ref("batch/v1", "CronJob", &cj.metadata)]),
            ..Default::default()
        },
        spec: tmpl.spec,
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
    }

    #[test]
    fn every_minute_and_nicknames() {
        let s = parse_schedule("* * * * *", None).map_err(|e| e.to_string());
        let Ok(s) = s else {
            panic!("{s:?}", s = s.err())
        };
        assert_eq!(
            s.next_after(at("2026-01-01T00:00:30Z")),
            Some(at("2026-01-01T00:01:00Z"))
        );
        let h = parse_schedule("@hourly", None).ok();
        assert_eq!(
            h.and_then(|h| h.next_after(at("2026-01-01T00:00:30Z"))),
            Some(at("2026-01-01T01:00:00Z"))
        );
        assert!(parse_schedule("* * * * * *", None).is_err());
        assert!(parse_schedule("61 * * * *", None).is_err());
        assert!(parse_schedule("* * * * *", Some("Mars/Base")).is_err());
    }

    #[test]
    fn most_recent_missed_time() {
        let Ok(s) = parse_schedule("*/5 * * * *", None) else {
            panic!("parse")
        };
        let (t, n) = s.most_recent(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:17:00Z"));
        assert_eq!(t, Some(at("2026-01-01T00:15:00Z")));
        assert_eq!(n, 3);
        let (t, n) = s.most_recent(at("2026-01-01T00:15:00Z"), at("2026-01-01T00:17:00Z"));
        assert_eq!((t, n), (None, 0));
        // Thousands missed: still the latest one.
        let (t, n) = s.most_recent(at("2025-01-01T00:00:00Z"), at("2026-01-01T00:17:00Z"));
        assert_eq!(t, Some(at("2026-01-01T00:15:00Z")));
        assert!(n > TOO_MANY_MISSED);
    }

    #[test]
    fn time_zone_and_job_name() {
        let Ok(s) = parse_schedule("0 9 * * *", Some("Europe/Berlin")) else {
            panic!("parse")
        };
        // 09:00 in Berlin in winter is 08:00 UTC.
        let next = s.next_after(at("2026-01-10T00:00:00Z"));
        assert_eq!(next, Some(at("2026-01-10T08:00:00Z")));
        let t = at("2026-01-10T08:00:00Z");
        assert_eq!(s.local_rfc3339(t), "2026-01-10T09:00:00+01:00");
        assert_eq!(
            job_name("hello", t),
            format!("hello-{}", t.timestamp() / 60)
        );
    }
}
