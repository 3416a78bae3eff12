//! Job controller: runs pods until `completions` succeed (NonIndexed or Indexed), at most
//! `parallelism` at once; counts finished pods through the `batch.kubernetes.io/job-tracking`
//! finalizer and `uncountedTerminatedPods`; fails the Job on backoffLimit, activeDeadlineSeconds
//! or a podFailurePolicy FailJob rule (FailureTarget, then Failed once no pod is left); completes
//! it (SuccessCriteriaMet, then Complete); suspends and resumes it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::{
    Job, JobCondition, JobStatus, PodFailurePolicyRule, UncountedTerminatedPods,
};
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::events::{NORMAL, Recorder, WARNING, api_message};
use crate::queue::Queue;
use crate::util::{self, controller_ref, deleting, split_key};
use crate::{ControllerError, Ctx};

/// Finalizer that keeps a finished pod until the Job has counted it.
pub const TRACKING_FINALIZER: &str = "batch.kubernetes.io/job-tracking";
/// Annotation (and label) with an Indexed Job pod's completion index.
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// Most pods created in one sync.
const BURST: usize = 500;
/// Longest wait before a failed pod is replaced (as upstream's six minutes).
const MAX_BACKOFF: Duration = Duration::from_secs(360);

/// What the controller remembers between syncs of one Job.
#[derive(Default)]
struct Memory {
    /// Pods created but not yet seen in the cache.
    adds: HashSet<String>,
    at: Option<Instant>,
    /// Failures seen and when the last one was noticed (replacement back-off).
    failed_seen: i32,
    last_failure: Option<Instant>,
    /// resourceVersion of this controller's last status write: a cached Job older than it is
    /// stale (it would count pods again or lose counts), so the sync waits for the cache.
    written_rv: Option<u64>,
    /// Pods whose tracking finalizer this controller removed (they are counted); the cache may
    /// still show the finalizer for a moment, and they must not be counted twice.
    released: HashSet<String>,
}

/// Runs the controller until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let queue = Queue::default();
    let _ = crate::informer::feed_owner(&ctx.jobs, &ctx.pods, "Job", &queue);
    let mem: Arc<Mutex<HashMap<String, Memory>>> = Arc::default();
    queue
        .work("job", |k| sync(ctx.clone(), mem.clone(), k))
        .await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The condition of `type_` that is True, if any.
pub fn true_cond<'a>(st: Option<&'a JobStatus>, type_: &str) -> Option<&'a JobCondition> {
    st?.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// Whether the Job has finished (Complete or Failed), and how.
pub fn finished(job: &Job) -> Option<&'static str> {
    if true_cond(job.status.as_ref(), "Complete").is_some() {
        Some("Complete")
    } else if true_cond(job.status.as_ref(), "Failed").is_some() {
        Some("Failed")
    } else {
        None
    }
}

fn has_finalizer(p: &Pod) -> bool {
    p.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == TRACKING_FINALIZER)
}

fn uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

fn pod_index(p: &Pod) -> Option<i32> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(COMPLETION_INDEX))
        .and_then(|v| v.parse().ok())
}

/// Parses `completedIndexes` ("0-2,5").
pub fn parse_indexes(s: &str) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<i32>(), b.parse::<i32>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(v) = part.parse() {
                    out.insert(v);
                }
            }
        }
    }
    out
}

/// Formats indexes as ranges ("0-2,5").
pub fn format_indexes(set: &BTreeSet<i32>) -> String {
    let mut parts = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        if start == end {
            parts.push(start.to_string());
        } else {
            parts.push(format!("{start}-{end}"));
        }
    }
    parts.join(",")
}

/// What a podFailurePolicy says about a failed pod.
#[derive(Debug, PartialEq, Eq)]
pub enum PolicyAction {
    /// Fail the whole Job, with this message.
    FailJob(String),
    /// Do not count the failure.
    Ignore,
    /// Count it (also when no rule matches).
    Count,
}

fn rule_matches(rule: &PodFailurePolicyRule, pod: &Pod) -> Option<String> {
    let st = pod.status.as_ref()?;
    if let Some(req) = &rule.on_exit_codes {
        let statuses = st
            .init_container_statuses
            .iter()
            .flatten()
            .chain(st.container_statuses.iter().flatten());
        for cs in statuses {
            if req.container_name.as_ref().is_some_and(|n| *n != cs.name) {
                continue;
            }
            let Some(code) = cs
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| t.exit_code)
            else {
                continue;
            };
            if code == 0 {
                continue;
            }
            let listed = req.values.contains(&code);
            let hit = match req.operator.as_str() {
                "In" => listed,
                "NotIn" => !listed,
                _ => false,
            };
            if hit {
                return Some(format!(
                    "Container {} for pod {}/{} failed with exit code {}",
                    cs.name,
                    pod.metadata.namespace.as_deref().unwrap_or(""),
                    pod.metadata.name.as_deref().unwrap_or(""),
                    code
                ));
            }
        }
        return None;
    }
    for pat in rule.on_pod_conditions.iter().flatten() {
        let want = pat.status.as_deref().unwrap_or("True");
        if st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == pat.type_ && c.status == want)
        {
            return Some(format!(
                "Pod {}/{} has condition {} matching",
                pod.metadata.namespace.as_deref().unwrap_or(""),
                pod.metadata.name.as_deref().unwrap_or(""),
                pat.type_
            ));
        }
    }
    None
}

/// Applies `job`'s podFailurePolicy to a failed pod: the first matching rule decides.
pub fn failure_policy(job: &Job, pod: &Pod) -> PolicyAction {
    let Some(policy) = job
        .spec
        .as_ref()
        .and_then(|s| s.pod_failure_policy.as_ref())
    else {
        return PolicyAction::Count;
    };
    for (i, rule) in policy.rules.iter().enumerate() {
        if let Some(msg) = rule_matches(rule, pod) {
            return match rule.action.as_str() {
                "FailJob" => {
                    PolicyAction::FailJob(format!("{msg} matching FailJob rule at index {i}"))
                }
                "Ignore" => PolicyAction::Ignore,
                _ => PolicyAction::Count,
            };
        }
    }
    PolicyAction::Count
}

fn new_cond(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> JobCondition {
    JobCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// Sets a condition, keeping the transition time when its status does not change.
fn set_cond(conds: &mut Vec<JobCondition>, c: JobCondition) {
    if let Some(old) = conds.iter_mut().find(|o| o.type_ == c.type_) {
        if old.status == c.status && old.reason == c.reason {
            return;
        }
        *old = c;
    } else {
        conds.push(c);
    }
}

/// How a pod finished, as the Job counts it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
}

/// Whether a pod counts as failed: phase Failed, or (when the Job replaces terminating pods)
/// deleted before it succeeded, as upstream counts orphaned pods.
fn pod_failed(job: &Job, p: &Pod) -> bool {
    if util::phase(p) == "Failed" {
        return true;
    }
    let only_failed = job
        .spec
        .as_ref()
        .and_then(|s| s.pod_replacement_policy.as_deref())
        == Some("Failed")
        || job
            .spec
            .as_ref()
            .is_some_and(|s| s.pod_failure_policy.is_some());
    !only_failed && deleting(&p.metadata) && util::phase(p) != "Succeeded"
}

/// The Event source of this controller (as kube-controller-manager names it).
const COMPONENT: &str = "job-controller";

/// A failure reason as an Event reason (Event reasons are static strings).
fn event_reason(reason: &str) -> &'static str {
    match reason {
        "BackoffLimitExceeded" => "BackoffLimitExceeded",
        "DeadlineExceeded" => "DeadlineExceeded",
        "PodFailurePolicy" => "PodFailurePolicy",
        "MaxFailedIndexesExceeded" => "MaxFailedIndexesExceeded",
        _ => "Failed",
    }
}

async fn sync(
    ctx: Arc<Ctx>,
    mem: Arc<Mutex<HashMap<String, Memory>>>,
    k: String,
) -> Result<Option<Duration>, ControllerError> {
    let (ns, name) = split_key(&k);
    let Some(job) = ctx.jobs.get(ns, name) else {
        lock(&mem).remove(&k);
        return Ok(None);
    };
    let Some(spec) = job.spec.as_ref() else {
        return Ok(None);
    };
    let job_uid = job.metadata.uid.clone().unwrap_or_default();
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let jobs_api = Api::<Job>::namespaced(ctx.client.clone(), ns);
    let rec = ctx.events.component(COMPONENT);
    let cached_rv = job
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(w) = lock(&mem).get(&k).and_then(|m| m.written_rv)
        && cached_rv.is_some_and(|c| c < w)
    {
        return Ok(Some(Duration::from_millis(50)));
    }
    let now = Timestamp::now();
    let owned: Vec<Arc<Pod>> = ctx
        .pods
        .in_namespace(ns)
        .into_iter()
        .filter(|p| controller_ref(&p.metadata).is_some_and(|r| r.uid == job_uid))
        .collect();

    // A finished Job only lets go of its pods' finalizers.
    if finished(&job).is_some() {
        for p in owned.iter().filter(|p| has_finalizer(p)) {
            remove_finalizer(&pods_api, p).await?;
        }
        lock(&mem).remove(&k);
        return Ok(None);
    }

    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let suspended = spec.suspend.unwrap_or(false);
    let old = job.status.clone().unwrap_or_default();
    let mut st = old.clone();
    let mut conds = st.conditions.take().unwrap_or_default();
    let mut unc = st.uncounted_terminated_pods.take().unwrap_or_default();
    let mut unc_s: BTreeSet<String> = unc
        .succeeded
        .take()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut unc_f: BTreeSet<String> = unc.failed.take().unwrap_or_default().into_iter().collect();
    let mut completed = parse_indexes(st.completed_indexes.as_deref().unwrap_or(""));
    let mut failure: Option<(String, String)> = true_cond(Some(&old), "FailureTarget").map(|c| {
        (
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default(),
        )
    });
    let finishing = failure.is_some() || true_cond(Some(&old), "SuccessCriteriaMet").is_some();

    // Pods released earlier that the cache still shows with the finalizer are counted already.
    let released_before: HashSet<String> = {
        let mut m = lock(&mem);
        let e = m.entry(k.clone()).or_default();
        e.released
            .retain(|u| owned.iter().any(|p| uid(p) == *u && has_finalizer(p)));
        e.released.clone()
    };

    // 1. Record newly finished pods as uncounted before their finalizers go.
    let mut release: Vec<Arc<Pod>> = Vec::new();
    let mut new_uncounted = false;
    for p in owned
        .iter()
        .filter(|p| has_finalizer(p) && !released_before.contains(&uid(p)))
    {
        let u = uid(p);
        if unc_s.contains(&u) || unc_f.contains(&u) {
            release.push(p.clone());
            continue;
        }
        let outcome = if util::phase(p) == "Succeeded" {
            Some(Outcome::Succeeded)
        } else if pod_failed(&job, p) || (deleting(&p.metadata) && finishing) {
            Some(Outcome::Failed)
        } else {
            None
        };
        match outcome {
            Some(Outcome::Succeeded) => {
                unc_s.insert(u);
                new_uncounted = true;
            }
            Some(Outcome::Failed) => match failure_policy(&job, p) {
                PolicyAction::Ignore => {}
                PolicyAction::FailJob(msg) => {
                    if failure.is_none() {
                        failure = Some(("PodFailurePolicy".into(), msg));
                    }
                    unc_f.insert(u);
                    new_uncounted = true;
                }
                PolicyAction::Count => {
                    unc_f.insert(u);
                    new_uncounted = true;
                }
            },
            None => continue,
        }
        release.push(p.clone());
    }
    if new_uncounted {
        let unc_json = json!({"succeeded": unc_s, "failed": unc_f});
        let rv = patch_status(
            &jobs_api,
            name,
            json!({"uncountedTerminatedPods": unc_json}),
        )
        .await?;
        lock(&mem).entry(k.clone()).or_default().written_rv = rv;
    }

    // 2. Remove the finalizers, then count the pods.
    for p in &release {
        remove_finalizer(&pods_api, p).await?;
        lock(&mem)
            .entry(k.clone())
            .or_default()
            .released
            .insert(uid(p));
    }
    let released: HashSet<String> = release.iter().map(|p| uid(p)).collect();
    let still_held: HashSet<String> = owned
        .iter()
        .filter(|p| {
            has_finalizer(p) && !released.contains(&uid(p)) && !released_before.contains(&uid(p))
        })
        .map(|p| uid(p))
        .collect();
    let by_uid: HashMap<String, &Arc<Pod>> = owned.iter().map(|p| (uid(p), p)).collect();
    let mut succeeded = st.succeeded.unwrap_or(0);
    let mut failed = st.failed.unwrap_or(0);
    for u in std::mem::take(&mut unc_s) {
        if still_held.contains(&u) {
            unc_s.insert(u);
            continue;
        }
        if indexed {
            if let Some(i) = by_uid.get(&u).and_then(|p| pod_index(p))
                && completions.is_none_or(|c| i < c)
            {
                completed.insert(i);
            }
        } else {
            succeeded += 1;
        }
    }
    for u in std::mem::take(&mut unc_f) {
        if still_held.contains(&u) {
            unc_f.insert(u);
            continue;
        }
        failed += 1;
    }
    if indexed {
        succeeded = i32::try_from(completed.len()).unwrap_or(i32::MAX);
    }

    // 3. Pods still running.
    let active: Vec<&Arc<Pod>> = owned.iter().filter(|p| util::is_active(p)).collect();
    let terminating = owned
        .iter()
        .filter(|p| deleting(&p.metadata) && !matches!(util::phase(p), "Succeeded" | "Failed"))
        .count();

    // Back-off memory.
    {
        let mut m = lock(&mem);
        let e = m.entry(k.clone()).or_default();
        if failed > e.failed_seen {
            e.failed_seen = failed;
            e.last_failure = Some(Instant::now());
        }
        let present: HashSet<&str> = owned
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        e.adds.retain(|n| !present.contains(n.as_str()));
    }

    // 4. Start time, suspension and the reasons to fail.
    let mut requeue: Option<Duration> = None;
    if suspended {
        if !conds
            .iter()
            .any(|c| c.type_ == "Suspended" && c.status == "True")
        {
            set_cond(
                &mut conds,
                new_cond("Suspended", "True", "JobSuspended", "Job suspended", now),
            );
        }
    } else {
        if conds
            .iter()
            .any(|c| c.type_ == "Suspended" && c.status == "True")
        {
            set_cond(
                &mut conds,
                new_cond("Suspended", "False", "JobResumed", "Job resumed", now),
            );
            st.start_time = Some(Time(now));
        }
        if st.start_time.is_none() {
            st.start_time = Some(Time(now));
        }
    }
    if failure.is_none() && failed > backoff_limit {
        failure = Some((
            "BackoffLimitExceeded".into(),
            "Job has reached the specified backoff limit".into(),
        ));
    }
    if failure.is_none()
        && !suspended
        && let (Some(ads), Some(start)) = (spec.active_deadline_seconds, st.start_time.as_ref())
    {
        let elapsed = now.as_second() - start.0.as_second();
        if elapsed >= ads {
            failure = Some((
                "DeadlineExceeded".into(),
                "Job was active longer than specified deadline".into(),
            ));
        } else {
            requeue = Some(Duration::from_secs(
                u64::try_from(ads - elapsed).unwrap_or(1).max(1),
            ));
        }
    }
    let success = failure.is_none()
        && (true_cond(Some(&old), "SuccessCriteriaMet").is_some()
            || match completions {
                Some(c) => succeeded >= c,
                None => succeeded > 0 && active.is_empty(),
            });

    // 5. Act on the pods.
    let mut manage_err: Option<ControllerError> = None;
    if let Some((reason, message)) = &failure {
        set_cond(
            &mut conds,
            new_cond("FailureTarget", "True", reason, message, now),
        );
        for p in &active {
            delete_pod(&rec, &job, &pods_api, p, false).await?;
        }
    } else if success {
        set_cond(
            &mut conds,
            new_cond(
                "SuccessCriteriaMet",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
                now,
            ),
        );
        for p in &active {
            delete_pod(&rec, &job, &pods_api, p, true).await?;
        }
    } else if suspended {
        for p in &active {
            delete_pod(&rec, &job, &pods_api, p, true).await?;
        }
    } else {
        let pending_adds = {
            let m = lock(&mem);
            m.get(&k).is_some_and(|e| {
                !e.adds.is_empty() && e.at.is_some_and(|t| t.elapsed() < Duration::from_secs(30))
            })
        };
        let backoff_left = {
            let m = lock(&mem);
            m.get(&k).and_then(|e| {
                let last = e.last_failure?;
                let exp = u32::try_from((failed - 1).clamp(0, 20)).unwrap_or(0);
                let delay = ctx
                    .config
                    .job_pod_failure_backoff
                    .saturating_mul(2u32.saturating_pow(exp))
                    .min(MAX_BACKOFF);
                delay.checked_sub(last.elapsed()).filter(|d| !d.is_zero())
            })
        };
        if !pending_adds {
            let plan = plan(
                &job,
                &active,
                &completed,
                succeeded,
                completions,
                parallelism,
                indexed,
            );
            for p in &plan.delete {
                delete_pod(&rec, &job, &pods_api, p, true).await?;
            }
            if !plan.create.is_empty() {
                if let Some(wait) = backoff_left {
                    requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
                } else {
                    let owner = util::owner_ref("batch/v1", "Job", &job.metadata);
                    let (created, err) = create_pods(&pods_api, &job, &owner, &plan.create).await;
                    for pname in &created {
                        rec.event(
                            &*job,
                            NORMAL,
                            "SuccessfulCreate",
                            format!("Created pod: {pname}"),
                        );
                    }
                    if let Some(e) = &err {
                        rec.event(
                            &*job,
                            WARNING,
                            "FailedCreate",
                            format!("Error creating: {}", api_message(e)),
                        );
                    }
                    let mut m = lock(&mem);
                    let e = m.entry(k.clone()).or_default();
                    e.adds = created.into_iter().collect();
                    e.at = Some(Instant::now());
                    manage_err = err;
                }
            }
        }
    }

    // 6. Finish once no pod is left running or uncounted.
    let settled = active.is_empty() && terminating == 0 && unc_s.is_empty() && unc_f.is_empty();
    if settled && let Some((reason, message)) = &failure {
        if true_cond(Some(&old), "Failed").is_none() {
            rec.event(&*job, WARNING, event_reason(reason), message.clone());
        }
        set_cond(&mut conds, new_cond("Failed", "True", reason, message, now));
    } else if settled && success {
        if true_cond(Some(&old), "Complete").is_none() {
            rec.event(&*job, NORMAL, "Completed", "Job completed");
        }
        set_cond(
            &mut conds,
            new_cond(
                "Complete",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
                now,
            ),
        );
        st.completion_time = Some(Time(now));
    }

    let ready = active.iter().filter(|p| util::is_ready(p)).count();
    st.active = Some(i32::try_from(active.len()).unwrap_or(i32::MAX));
    st.ready = Some(i32::try_from(ready).unwrap_or(i32::MAX));
    st.terminating = Some(i32::try_from(terminating).unwrap_or(i32::MAX));
    st.succeeded = Some(succeeded);
    st.failed = Some(failed);
    st.completed_indexes = indexed.then(|| format_indexes(&completed));
    st.conditions = (!conds.is_empty()).then_some(conds);
    st.uncounted_terminated_pods = Some(UncountedTerminatedPods {
        succeeded: Some(unc_s.into_iter().collect()),
        failed: Some(unc_f.into_iter().collect()),
    });
    if st != old {
        let mut v =
            serde_json::to_value(&st).map_err(|e| ControllerError::Invalid(e.to_string()))?;
        // A merge patch drops fields set to null: say explicitly what went away.
        if st.completed_indexes.is_none() {
            v["completedIndexes"] = serde_json::Value::Null;
        }
        let rv = patch_status(&jobs_api, name, v).await?;
        lock(&mem).entry(k.clone()).or_default().written_rv = rv;
        tracing::debug!(job = %k, active = active.len(), succeeded, failed, "job status");
    }
    if let Some(e) = manage_err {
        return Err(e);
    }
    Ok(requeue)
}

struct Plan<'a> {
    /// Indexes to create (NonIndexed: one `None` per pod).
    create: Vec<Option<i32>>,
    delete: Vec<&'a Arc<Pod>>,
}

fn plan<'a>(
    job: &Job,
    active: &[&'a Arc<Pod>],
    completed: &BTreeSet<i32>,
    succeeded: i32,
    completions: Option<i32>,
    parallelism: i32,
    indexed: bool,
) -> Plan<'a> {
    let _ = job;
    let mut out = Plan {
        create: Vec::new(),
        delete: Vec::new(),
    };
    let want = match completions {
        Some(c) => (c - succeeded).clamp(0, parallelism),
        None if succeeded > 0 => 0,
        None => parallelism,
    };
    let want = usize::try_from(want).unwrap_or(0);
    if indexed {
        let total = completions.unwrap_or(0);
        // Keep one pod per index still to do; the rest go.
        let mut seen: BTreeSet<i32> = BTreeSet::new();
        let mut keep: Vec<&Arc<Pod>> = Vec::new();
        for p in active {
            match pod_index(p) {
                Some(i) if i >= 0 && i < total && !completed.contains(&i) && seen.insert(i) => {
                    keep.push(p);
                }
                _ => out.delete.push(p),
            }
        }
        if keep.len() > want {
            keep.sort_by_key(|p| std::cmp::Reverse(pod_index(p)));
            let extra = keep.len() - want;
            out.delete.extend(keep.drain(..extra));
        } else {
            let room = (want - keep.len()).min(BURST);
            out.create = (0..total)
                .filter(|i| !completed.contains(i) && !seen.contains(i))
                .take(room)
                .map(Some)
                .collect();
        }
    } else if active.len() > want {
        let mut victims: Vec<&Arc<Pod>> = active.to_vec();
        victims.sort_by_key(|p| {
            (
                u8::from(util::is_ready(p)),
                std::cmp::Reverse(created_at(p)),
            )
        });
        victims.truncate(active.len() - want);
        out.delete = victims;
    } else {
        out.create = vec![None; (want - active.len()).min(BURST)];
    }
    out
}

fn created_at(p: &Pod) -> i64 {
    p.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(0)
}

/// The pod of `job` for `index` (Indexed mode) from the template.
pub fn pod_for(job: &Job, owner: &OwnerReference, index: Option<i32>) -> Pod {
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    let mut labels = tmeta.labels.unwrap_or_default();
    let mut annotations = tmeta.annotations.unwrap_or_default();
    let mut finalizers = tmeta.finalizers.unwrap_or_default();
    finalizers.push(TRACKING_FINALIZER.into());
    let mut spec = template.spec.unwrap_or_default();
    let generate_name = match index {
        Some(i) => {
            annotations.insert(COMPLETION_INDEX.into(), i.to_string());
            labels.insert(COMPLETION_INDEX.into(), i.to_string());
            spec.hostname = Some(format!("{job_name}-{i}"));
            let env = EnvVar {
                name: "JOB_COMPLETION_INDEX".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        api_version: Some("v1".into()),
                        field_path: format!("metadata.annotations['{COMPLETION_INDEX}']"),
                    }),
                    ..Default::default()
                }),
            };
            for c in spec
                .containers
                .iter_mut()
                .chain(spec.init_containers.iter_mut().flatten())
            {
                let envs = c.env.get_or_insert_with(Vec::new);
                if !envs.iter().any(|e| e.name == env.name) {
                    envs.push(env.clone());
                }
            }
            format!("{job_name}-{i}-")
        }
        None => format!("{job_name}-"),
    };
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(generate_name),
            namespace: job.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            finalizers: Some(finalizers),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

async fn create_pods(
    api: &Api<Pod>,
    job: &Job,
    owner: &OwnerReference,
    which: &[Option<i32>],
) -> (Vec<String>, Option<ControllerError>) {
    let pp = &PostParams::default();
    let mut created = Vec::new();
    let mut batch = 1;
    let mut rest = which;
    while !rest.is_empty() {
        let (now, later) = rest.split_at(batch.min(rest.len()));
        let results = futures::future::join_all(
            now.iter()
                .map(|i| pod_for(job, owner, *i))
                .map(|p| async move { api.create(pp, &p).await }),
        )
        .await;
        for r in results {
            match r {
                Ok(p) => created.push(p.metadata.name.unwrap_or_default()),
                Err(e) => return (created, Some(e.into())),
            }
        }
        rest = later;
        batch *= 2;
    }
    (created, None)
}

async fn remove_finalizer(api: &Api<Pod>, p: &Pod) -> Result<(), ControllerError> {
    let rest: Vec<&String> = p
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != TRACKING_FINALIZER)
        .collect();
    let patch =
        json!({"metadata": {"finalizers": rest, "resourceVersion": p.metadata.resource_version}});
    let name = p.metadata.name.as_deref().unwrap_or("");
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a pod; `uncounted` first removes the tracking finalizer so that the deletion is
/// not counted as a failure (excess pods, suspension, success), as upstream does.
async fn delete_pod(
    rec: &Recorder,
    job: &Job,
    api: &Api<Pod>,
    p: &Pod,
    uncounted: bool,
) -> Result<(), ControllerError> {
    if deleting(&p.metadata) {
        return Ok(());
    }
    if uncounted && has_finalizer(p) {
        remove_finalizer(api, p).await?;
    }
    let name = p.metadata.name.as_deref().unwrap_or("");
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            rec.event(
                job,
                NORMAL,
                "SuccessfulDelete",
                format!("Deleted pod: {name}"),
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Patches the Job's status; returns the resourceVersion written.
async fn patch_status(
    api: &Api<Job>,
    name: &str,
    status: serde_json::Value,
) -> Result<Option<u64>, ControllerError> {
    match api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
    {
        Ok(j) => Ok(j
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_ranges_round_trip() {
        let s = parse_indexes("0-2,5,7-8");
        assert_eq!(
            s.iter().copied().collect::<Vec<_>>(),
            vec![0, 1, 2, 5, 7, 8]
        );
        assert_eq!(format_indexes(&s), "0-2,5,7-8");
        assert_eq!(format_indexes(&BTreeSet::new()), "");
    }

    #[test]
    fn failure_policy_exit_codes() {
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "j"},
            "spec": {"template": {}, "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [3]}},
                {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}},
                {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget"}]}
            ]}}
        }))
        .unwrap_or_default();
        let pod = |code: i32| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "ns"},
                "status": {"phase": "Failed", "containerStatuses": [{"name": "main", "image": "x",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": code}}}]}
            }))
            .unwrap_or_default()
        };
        assert_eq!(failure_policy(&job, &pod(3)), PolicyAction::Ignore);
        assert!(
            matches!(failure_policy(&job, &pod(42)), PolicyAction::FailJob(m) if m.contains("exit code 42"))
        );
        assert_eq!(failure_policy(&job, &pod(1)), PolicyAction::Count);
    }
}
