//! Job controller against the real apiserver router and a memory store; the test plays the
//! kubelet by writing pod status.
#![allow(clippy::unwrap_used)]

use crate::common::{self, Cluster};

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);
const NS: &str = "default";

fn job(name: &str, spec: Value) -> Value {
    let mut s = json!({"template": {"spec": {"restartPolicy": "Never",
        "containers": [{"name": "c", "image": "busybox"}]}}});
    for (k, v) in spec.as_object().unwrap() {
        s[k] = v.clone();
    }
    json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": NS}, "spec": s})
}

async fn get_job(c: &Cluster, name: &str) -> Value {
    c.get("batch/v1", "Job", Some(NS), name).await.unwrap()
}

fn cond(j: &Value, t: &str) -> Option<Value> {
    j["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t && c["status"] == "True")
        .cloned()
}

fn running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

async fn active_pods(c: &Cluster, job: &str) -> Vec<Pod> {
    c.pods(NS)
        .await
        .into_iter()
        .filter(|p| {
            p.metadata.labels.as_ref().and_then(|l| l.get("job-name")) == Some(&job.to_string())
                && running(p)
        })
        .collect()
}

fn pname(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap()
}

#[tokio::test]
async fn completes_after_completions_succeed() {
    let c = common::cluster().await;
    let created = c
        .create(job("pi", json!({"completions": 3, "parallelism": 2})))
        .await;
    let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(
        created["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
        uid
    );
    c.wait("2 pods", T, || async {
        active_pods(&c, "pi").await.len() == 2
    })
    .await;
    for p in active_pods(&c, "pi").await {
        let l = p.metadata.labels.as_ref().unwrap();
        assert_eq!(l["batch.kubernetes.io/job-name"], "pi");
        assert_eq!(l["batch.kubernetes.io/controller-uid"], uid);
        assert_eq!(l["controller-uid"], uid);
        let r = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (r.kind.as_str(), r.controller, r.block_owner_deletion),
            ("Job", Some(true), Some(true))
        );
        assert!(
            p.metadata
                .finalizers
                .as_ref()
                .unwrap()
                .contains(&"batch.kubernetes.io/job-tracking".to_string())
        );
        assert!(pname(&p).starts_with("pi-"));
    }
    c.mark_ready(NS).await;
    c.wait("active 2 ready 2 startTime", T, || async {
        let j = get_job(&c, "pi").await;
        j["status"]["active"] == 2
            && j["status"]["ready"] == 2
            && j["status"]["startTime"].is_string()
    })
    .await;
    // Each success is replaced until three have succeeded.
    for done in 1..=3 {
        let p = active_pods(&c, "pi").await.into_iter().next().unwrap();
        c.finish_pod(NS, pname(&p), 0).await;
        c.wait("success counted", T, || async {
            get_job(&c, "pi").await["status"]["succeeded"] == done
        })
        .await;
    }
    c.wait("Complete", T, || async {
        let j = get_job(&c, "pi").await;
        cond(&j, "Complete").is_some()
            && cond(&j, "SuccessCriteriaMet").is_some()
            && j["status"]["completionTime"].is_string()
            && j["status"]["active"] == 0
    })
    .await;
    let j = get_job(&c, "pi").await;
    assert_eq!(j["status"]["succeeded"], 3);
    assert_eq!(j["status"]["failed"], 0);
    assert_eq!(
        cond(&j, "Complete").unwrap()["reason"],
        "CompletionsReached"
    );
    assert_eq!(
        j["status"]["uncountedTerminatedPods"]["succeeded"],
        json!([])
    );
    // Counted pods lose the tracking finalizer; no pod is left running.
    c.wait("finalizers removed", T, || async {
        c.pods(NS).await.iter().all(|p| {
            p.metadata
                .finalizers
                .as_ref()
                .is_none_or(|f| !f.contains(&"batch.kubernetes.io/job-tracking".to_string()))
        })
    })
    .await;
    assert!(active_pods(&c, "pi").await.is_empty());
    assert_eq!(
        c.pods(NS)
            .await
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
            .count(),
        3
    );
}

#[tokio::test]
async fn indexed_job_gives_each_pod_its_index() {
    let c = common::cluster().await;
    let mut j = job(
        "idx",
        json!({"completions": 3, "parallelism": 3, "completionMode": "Indexed"}),
    );
    j["spec"]["template"]["spec"]["subdomain"] = json!("workers");
    c.create(j).await;
    c.wait("3 pods", T, || async {
        active_pods(&c, "idx").await.len() == 3
    })
    .await;
    let mut seen = Vec::new();
    for p in active_pods(&c, "idx").await {
        let idx =
            p.metadata.annotations.as_ref().unwrap()["batch.kubernetes.io/job-completion-index"]
                .clone();
        assert_eq!(
            p.metadata.labels.as_ref().unwrap()["batch.kubernetes.io/job-completion-index"],
            idx
        );
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(
            spec.hostname.as_deref(),
            Some(format!("idx-{idx}").as_str())
        );
        assert_eq!(spec.subdomain.as_deref(), Some("workers"));
        assert!(pname(&p).starts_with(&format!("idx-{idx}-")));
        let env = spec.containers[0].env.as_ref().unwrap();
        let e = env
            .iter()
            .find(|e| e.name == "JOB_COMPLETION_INDEX")
            .unwrap();
        assert_eq!(
            e.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        );
        seen.push(idx);
    }
    seen.sort();
    assert_eq!(seen, vec!["0", "1", "2"]);
    // Index 1 fails: it is re-created with the same index.
    let p1 = active_pods(&c, "idx")
        .await
        .into_iter()
        .find(|p| pname(p).starts_with("idx-1-"))
        .unwrap();
    c.finish_pod(NS, pname(&p1), 1).await;
    c.wait("index 1 replaced", T, || async {
        active_pods(&c, "idx")
            .await
            .iter()
            .any(|p| pname(p).starts_with("idx-1-") && pname(p) != pname(&p1))
    })
    .await;
    for p in active_pods(&c, "idx").await {
        c.finish_pod(NS, pname(&p), 0).await;
    }
    c.wait("Complete with indexes 0-2", T, || async {
        let j = get_job(&c, "idx").await;
        cond(&j, "Complete").is_some()
            && j["status"]["completedIndexes"] == "0-2"
            && j["status"]["succeeded"] == 3
            && j["status"]["failed"] == 1
    })
    .await;
}

#[tokio::test]
async fn backoff_limit_fails_the_job() {
    let c = common::cluster().await;
    c.create(job("flaky", json!({"backoffLimit": 1, "parallelism": 1})))
        .await;
    for round in 1..=2 {
        c.wait("a running pod", T, || async {
            active_pods(&c, "flaky").await.len() == 1
        })
        .await;
        let p = active_pods(&c, "flaky").await.remove(0);
        c.finish_pod(NS, pname(&p), 1).await;
        c.wait("failure counted", T, || async {
            get_job(&c, "flaky").await["status"]["failed"] == round
        })
        .await;
    }
    c.wait("Failed BackoffLimitExceeded", T, || async {
        let j = get_job(&c, "flaky").await;
        cond(&j, "Failed").is_some_and(|c| c["reason"] == "BackoffLimitExceeded")
            && cond(&j, "FailureTarget").is_some()
    })
    .await;
    let j = get_job(&c, "flaky").await;
    assert!(cond(&j, "Complete").is_none());
    assert!(j["status"]["completionTime"].is_null());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(active_pods(&c, "flaky").await.is_empty());
}

#[tokio::test]
async fn active_deadline_fails_and_deletes_pods() {
    let c = common::cluster().await;
    c.create(job(
        "slow",
        json!({"activeDeadlineSeconds": 2, "parallelism": 2, "completions": 4}),
    ))
    .await;
    c.wait("2 pods", T, || async {
        active_pods(&c, "slow").await.len() == 2
    })
    .await;
    c.wait("Failed DeadlineExceeded", T, || async {
        let j = get_job(&c, "slow").await;
        cond(&j, "Failed").is_some_and(|c| c["reason"] == "DeadlineExceeded")
    })
    .await;
    // The running pods were deleted (and are gone once their finalizer is removed).
    c.wait("pods gone", T, || async { c.pods(NS).await.is_empty() })
        .await;
    let j = get_job(&c, "slow").await;
    assert_eq!(j["status"]["active"], 0);
    assert_eq!(j["status"]["failed"], 2);
}

#[tokio::test]
async fn suspend_and_resume() {
    let c = common::cluster().await;
    c.create(job(
        "paused",
        json!({"suspend": true, "parallelism": 2, "completions": 2}),
    ))
    .await;
    c.wait("Suspended", T, || async {
        let j = get_job(&c, "paused").await;
        cond(&j, "Suspended").is_some_and(|c| c["reason"] == "JobSuspended")
    })
    .await;
    assert!(c.pods(NS).await.is_empty());
    assert!(get_job(&c, "paused").await["status"]["startTime"].is_null());
    let patch = |s: bool| json!({"spec": {"suspend": s}});
    c.patch("batch/v1", "Job", Some(NS), "paused", patch(false))
        .await;
    c.wait("2 pods and resumed", T, || async {
        let j = get_job(&c, "paused").await;
        active_pods(&c, "paused").await.len() == 2
            && j["status"]["startTime"].is_string()
            && j["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| {
                    c["type"] == "Suspended"
                        && c["status"] == "False"
                        && c["reason"] == "JobResumed"
                })
    })
    .await;
    c.patch("batch/v1", "Job", Some(NS), "paused", patch(true))
        .await;
    c.wait("pods deleted on suspend", T, || async {
        c.pods(NS).await.is_empty() && get_job(&c, "paused").await["status"]["active"] == 0
    })
    .await;
    // Deleting pods for suspension is not a failure.
    assert_eq!(get_job(&c, "paused").await["status"]["failed"], 0);
}

#[tokio::test]
async fn pod_failure_policy_exit_codes() {
    let c = common::cluster().await;
    c.create(job(
        "policy",
        json!({"backoffLimit": 6, "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [3]}},
            {"action": "FailJob", "onExitCodes": {"containerName": "c", "operator": "In", "values": [42]}}
        ]}}),
    ))
    .await;
    c.wait("a pod", T, || async {
        active_pods(&c, "policy").await.len() == 1
    })
    .await;
    let first = active_pods(&c, "policy").await.remove(0);
    c.finish_pod(NS, pname(&first), 3).await;
    // Ignored: replaced, not counted.
    c.wait("replacement", T, || async {
        active_pods(&c, "policy")
            .await
            .iter()
            .any(|p| pname(p) != pname(&first))
    })
    .await;
    assert_eq!(get_job(&c, "policy").await["status"]["failed"], 0);
    let second = active_pods(&c, "policy").await.remove(0);
    c.finish_pod(NS, pname(&second), 42).await;
    c.wait("Failed PodFailurePolicy", T, || async {
        let j = get_job(&c, "policy").await;
        cond(&j, "Failed").is_some_and(|c| {
            c["reason"] == "PodFailurePolicy"
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("exit code 42"))
        })
    })
    .await;
    assert_eq!(get_job(&c, "policy").await["status"]["failed"], 1);
}

#[tokio::test]
async fn ttl_after_finished_deletes_job_and_pods() {
    let c = common::cluster().await;
    // completionTime is stored in whole seconds, so a 1 s TTL can expire within milliseconds of
    // the Complete condition; 3 s leaves at least 2 s to observe the finished Job.
    c.create(job("short", json!({"ttlSecondsAfterFinished": 3})))
        .await;
    c.wait("a pod", T, || async {
        active_pods(&c, "short").await.len() == 1
    })
    .await;
    let p = active_pods(&c, "short").await.remove(0);
    c.finish_pod(NS, pname(&p), 0).await;
    c.wait("Complete", T, || async {
        cond(&get_job(&c, "short").await, "Complete").is_some()
    })
    .await;
    // Still there right after it finished, gone a few seconds later, pods with it.
    assert!(c.get("batch/v1", "Job", Some(NS), "short").await.is_some());
    c.wait("job deleted", T, || async {
        c.get("batch/v1", "Job", Some(NS), "short").await.is_none()
    })
    .await;
    c.wait("pods collected", T, || async {
        c.pods(NS).await.is_empty()
    })
    .await;
}
