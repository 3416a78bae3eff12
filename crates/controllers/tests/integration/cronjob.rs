//! CronJob controller against the real apiserver router and a memory store. A CronJob whose
//! lastScheduleTime lies minutes back has a missed start time due now, so most tests need not
//! wait for the clock; one waits for a real `* * * * *` tick.
#![allow(clippy::unwrap_used)]

use crate::common::{self, Cluster};

use std::time::Duration;

use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);
const NS: &str = "default";

fn cronjob(name: &str, extra: Value) -> Value {
    let mut spec = json!({"schedule": "* * * * *",
        "jobTemplate": {"metadata": {"labels": {"team": "a"}},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox"}]}}}}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

async fn jobs_of(c: &Cluster, cj: &str) -> Vec<Value> {
    c.list("batch/v1", "Job", Some(NS))
        .await
        .into_iter()
        .filter(|j| {
            j["metadata"]["ownerReferences"][0]["name"] == cj
                && j["metadata"]["deletionTimestamp"].is_null()
        })
        .collect()
}

/// Pretends the last run was `mins` minutes ago, so a start time is due now.
async fn backdate(c: &Cluster, cj: &str, mins: i64) {
    let t = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_mins(mins))
        .unwrap();
    let t = format!("{}", t.strftime("%Y-%m-%dT%H:%M:%SZ"));
    c.dyn_api("batch/v1", "CronJob", Some(NS))
        .patch_status(
            cj,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"lastScheduleTime": t}})),
        )
        .await
        .unwrap();
}

async fn get_cj(c: &Cluster, name: &str) -> Value {
    c.get("batch/v1", "CronJob", Some(NS), name).await.unwrap()
}

/// A Job owned by the CronJob, made by the test (finished ones are left alone by the Job
/// controller).
async fn owned_job(c: &Cluster, cj: &Value, name: &str, outcome: Option<&str>, start: &str) {
    let j = c
        .create(json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": NS, "ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "CronJob", "name": cj["metadata"]["name"],
                "uid": cj["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"suspend": outcome.is_none(), "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox"}]}}}}))
        .await;
    if let Some(kind) = outcome {
        // Let the Job controller write its first status, then finish the Job.
        let jn = j["metadata"]["name"].as_str().unwrap().to_string();
        c.wait("job started", T, || async {
            c.get("batch/v1", "Job", Some(NS), &jn).await.unwrap()["status"]["startTime"]
                .is_string()
        })
        .await;
        let mut st = json!({"startTime": start, "conditions": [
            {"type": kind, "status": "True", "lastTransitionTime": start}]});
        if kind == "Complete" {
            st["completionTime"] = json!(start);
            st["conditions"] = json!([
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": start},
                {"type": kind, "status": "True", "lastTransitionTime": start}]);
        } else {
            st["conditions"] = json!([
                {"type": "FailureTarget", "status": "True", "lastTransitionTime": start},
                {"type": kind, "status": "True", "lastTransitionTime": start}]);
        }
        c.dyn_api("batch/v1", "Job", Some(NS))
            .patch_status(
                j["metadata"]["name"].as_str().unwrap(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"status": st})),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn starts_missed_run_and_tracks_it_to_success() {
    let c = common::cluster().await;
    c.create(cronjob("tick", json!({}))).await;
    backdate(&c, "tick", 5).await;
    c.wait("a job", T, || async {
        jobs_of(&c, "tick").await.len() == 1
    })
    .await;
    let j = jobs_of(&c, "tick").await.remove(0);
    let name = j["metadata"]["name"].as_str().unwrap().to_string();
    let ts = j["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"]
        .as_str()
        .unwrap()
        .parse::<k8s_openapi::jiff::Timestamp>()
        .unwrap();
    // `<cronjob>-<scheduled minutes since epoch>`, for the latest missed minute.
    assert_eq!(name, format!("tick-{}", ts.as_second() / 60));
    assert_eq!(ts.as_second() % 60, 0);
    assert!(k8s_openapi::jiff::Timestamp::now().as_second() - ts.as_second() < 61);
    assert_eq!(j["metadata"]["labels"]["team"], "a");
    let r = &j["metadata"]["ownerReferences"][0];
    assert_eq!(
        (r["kind"].clone(), r["controller"].clone()),
        (json!("CronJob"), json!(true))
    );
    c.wait("status active + lastScheduleTime", T, || async {
        let cj = get_cj(&c, "tick").await;
        cj["status"]["active"][0]["name"] == name.as_str()
            && cj["status"]["lastScheduleTime"].as_str().unwrap_or("")
                == j["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"]
                    .as_str()
                    .unwrap()
    })
    .await;
    // The Job's pod succeeds: the CronJob has no active Job and a lastSuccessfulTime.
    c.wait("the job's pod", T, || async { c.pods(NS).await.len() == 1 })
        .await;
    let pod = c.pods(NS).await.remove(0);
    c.finish_pod(NS, pod.metadata.name.as_deref().unwrap(), 0)
        .await;
    c.wait("lastSuccessfulTime, no active", T, || async {
        let cj = get_cj(&c, "tick").await;
        cj["status"]["active"].is_null() && cj["status"]["lastSuccessfulTime"].is_string()
    })
    .await;
    // No second Job for the same minute.
    assert_eq!(jobs_of(&c, "tick").await.len(), 1);
}

#[tokio::test]
async fn suspended_or_past_deadline_starts_nothing() {
    let c = common::cluster().await;
    c.create(cronjob("off", json!({"suspend": true}))).await;
    backdate(&c, "off", 5).await;
    c.create(cronjob(
        "late",
        json!({"schedule": "0 0 1 1 *", "startingDeadlineSeconds": 10}),
    ))
    .await;
    backdate(&c, "late", 60 * 24 * 400).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(jobs_of(&c, "off").await.is_empty());
    assert!(jobs_of(&c, "late").await.is_empty());
    c.patch(
        "batch/v1",
        "CronJob",
        Some(NS),
        "off",
        json!({"spec": {"suspend": false}}),
    )
    .await;
    c.wait("job after resume", T, || async {
        jobs_of(&c, "off").await.len() == 1
    })
    .await;
}

#[tokio::test]
async fn concurrency_forbid_and_replace() {
    let c = common::cluster().await;
    let forbid = c
        .create(cronjob(
            "forbid",
            json!({"concurrencyPolicy": "Forbid", "suspend": true}),
        ))
        .await;
    let replace = c
        .create(cronjob(
            "replace",
            json!({"concurrencyPolicy": "Replace", "suspend": true}),
        ))
        .await;
    owned_job(&c, &forbid, "forbid-running", None, "").await;
    owned_job(&c, &replace, "replace-running", None, "").await;
    for n in ["forbid", "replace"] {
        backdate(&c, n, 5).await;
        c.patch(
            "batch/v1",
            "CronJob",
            Some(NS),
            n,
            json!({"spec": {"suspend": false}}),
        )
        .await;
    }
    c.wait("replace: old job deleted, new one created", T, || async {
        let js = jobs_of(&c, "replace").await;
        js.len() == 1 && js[0]["metadata"]["name"] != "replace-running"
    })
    .await;
    c.wait("forbid synced after unsuspend", T, || async {
        get_cj(&c, "forbid").await["status"]["active"][0]["name"] == "forbid-running"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let js = jobs_of(&c, "forbid").await;
    assert_eq!(js.len(), 1);
    assert_eq!(js[0]["metadata"]["name"], "forbid-running");
}

#[tokio::test]
async fn history_limits_prune_oldest_finished_jobs() {
    let c = common::cluster().await;
    let cj = c
        .create(cronjob(
            "hist",
            json!({"suspend": true, "successfulJobsHistoryLimit": 2, "failedJobsHistoryLimit": 1}),
        ))
        .await;
    for (i, kind) in ["Complete", "Complete", "Failed", "Complete", "Failed"]
        .iter()
        .enumerate()
    {
        let start = format!("2026-01-01T00:0{i}:00Z");
        owned_job(&c, &cj, &format!("hist-{i}"), Some(kind), &start).await;
    }
    c.wait("oldest pruned", T, || async {
        let mut names: Vec<String> = jobs_of(&c, "hist")
            .await
            .iter()
            .map(|j| j["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names == ["hist-1", "hist-3", "hist-4"]
    })
    .await;
}

#[tokio::test]
async fn every_minute_schedule_creates_a_job_within_70s() {
    let c = common::cluster().await;
    c.create(cronjob("minutely", json!({"schedule": "*/1 * * * *"})))
        .await;
    c.wait("a job within 70 s", Duration::from_secs(70), || async {
        !jobs_of(&c, "minutely").await.is_empty()
    })
    .await;
}
