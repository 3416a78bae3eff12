//! Deployment controller (with the ReplicaSet controller) against the real apiserver router.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn deploy(name: &str, replicas: i64, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": image}]}}}
    })
}

/// A stand-in kubelet: keeps marking pods Running and Ready.
fn kubelet(c: &Arc<common::Cluster>) -> tokio::task::JoinHandle<()> {
    let c = c.clone();
    tokio::spawn(async move {
        loop {
            c.mark_ready("default").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn dep(c: &common::Cluster, name: &str) -> Value {
    c.get("apps/v1", "Deployment", Some("default"), name)
        .await
        .unwrap()
}

fn cond_reason(d: &Value, t: &str) -> String {
    d["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == t)
        .map(|c| c["reason"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

async fn rollout_done(c: &common::Cluster, name: &str, n: i64) -> bool {
    let d = dep(c, name).await;
    d["status"]["observedGeneration"] == d["metadata"]["generation"]
        && d["status"]["updatedReplicas"] == n
        && d["status"]["replicas"] == n
        && d["status"]["availableReplicas"] == n
        && cond_reason(&d, "Progressing") == "NewReplicaSetAvailable"
        && cond_reason(&d, "Available") == "MinimumReplicasAvailable"
}

async fn image_of_pods(c: &common::Cluster) -> Vec<String> {
    c.pods("default")
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.spec.unwrap().containers[0].image.clone().unwrap())
        .collect()
}

#[tokio::test]
async fn rolls_out_updates_and_rolls_back() {
    let c = Arc::new(common::cluster().await);
    let k = kubelet(&c);
    c.create(deploy("web", 3, "busybox:1")).await;
    c.wait("first rollout", T, || rollout_done(&c, "web", 3))
        .await;
    let d = dep(&c, "web").await;
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    let rss = c.list("apps/v1", "ReplicaSet", Some("default")).await;
    assert_eq!(rss.len(), 1);
    let hash = rss[0]["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(rss[0]["metadata"]["name"], format!("web-{hash}"));
    assert_eq!(
        rss[0]["spec"]["selector"]["matchLabels"]["pod-template-hash"],
        hash
    );
    assert_eq!(
        rss[0]["metadata"]["ownerReferences"][0]["kind"],
        "Deployment"
    );
    for p in c.pods("default").await {
        assert_eq!(p.metadata.labels.unwrap()["pod-template-hash"], hash);
    }

    // Update the image: a second ReplicaSet, revision 2, the old one at 0.
    c.patch("apps/v1", "Deployment", Some("default"), "web",
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}}}))
        .await;
    c.wait("second rollout", T, || async {
        rollout_done(&c, "web", 3).await && image_of_pods(&c).await.iter().all(|i| i == "busybox:2")
    })
    .await;
    assert_eq!(
        dep(&c, "web").await["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "2"
    );
    let rss = c.list("apps/v1", "ReplicaSet", Some("default")).await;
    assert_eq!(rss.len(), 2);
    let old = rss
        .iter()
        .find(|r| r["metadata"]["labels"]["pod-template-hash"] == hash.as_str())
        .unwrap();
    assert_eq!(old["spec"]["replicas"], 0);

    // Roll back the way kubectl >= 1.27 does: copy the old template without the hash label.
    let mut tpl = old["spec"]["template"].clone();
    tpl["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("pod-template-hash");
    c.patch(
        "apps/v1",
        "Deployment",
        Some("default"),
        "web",
        json!({"spec": {"template": tpl}}),
    )
    .await;
    c.wait("rollback", T, || async {
        rollout_done(&c, "web", 3).await && image_of_pods(&c).await.iter().all(|i| i == "busybox:1")
    })
    .await;
    assert_eq!(
        c.list("apps/v1", "ReplicaSet", Some("default")).await.len(),
        2
    );
    let back = c
        .get(
            "apps/v1",
            "ReplicaSet",
            Some("default"),
            old["metadata"]["name"].as_str().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        back["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    assert_eq!(
        dep(&c, "web").await["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );

    // Scale to 0 and 5.
    c.patch(
        "apps/v1",
        "Deployment",
        Some("default"),
        "web",
        json!({"spec": {"replicas": 0}}),
    )
    .await;
    c.wait("scaled to 0", T, || async {
        image_of_pods(&c).await.is_empty() && rollout_done(&c, "web", 0).await
    })
    .await;
    c.patch(
        "apps/v1",
        "Deployment",
        Some("default"),
        "web",
        json!({"spec": {"replicas": 5}}),
    )
    .await;
    c.wait("scaled to 5", T, || rollout_done(&c, "web", 5))
        .await;
    k.abort();
}

#[tokio::test]
async fn recreate_and_history_limit() {
    let c = Arc::new(common::cluster().await);
    let k = kubelet(&c);
    let mut d = deploy("rc", 2, "img:0");
    d["spec"]["strategy"] = json!({"type": "Recreate"});
    d["spec"]["revisionHistoryLimit"] = json!(1);
    c.create(d).await;
    c.wait("first rollout", T, || rollout_done(&c, "rc", 2))
        .await;
    for i in 1..=3 {
        let img = format!("img:{i}");
        c.patch(
            "apps/v1",
            "Deployment",
            Some("default"),
            "rc",
            json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": img}]}}}}),
        )
        .await;
        c.wait("recreate rollout", T, || async {
            rollout_done(&c, "rc", 2).await && image_of_pods(&c).await.iter().all(|x| *x == img)
        })
        .await;
    }
    c.wait("history pruned to 1 old", T, || async {
        c.list("apps/v1", "ReplicaSet", Some("default")).await.len() == 2
    })
    .await;
    k.abort();
}

#[tokio::test]
async fn pause_and_progress_deadline() {
    let c = common::cluster().await;
    let mut d = deploy("stuck", 1, "img");
    d["spec"]["progressDeadlineSeconds"] = json!(2);
    c.create(d).await;
    // No kubelet: the pod never becomes ready.
    c.wait("ProgressDeadlineExceeded", T, || async {
        let d = dep(&c, "stuck").await;
        cond_reason(&d, "Progressing") == "ProgressDeadlineExceeded"
            && d["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["type"] == "Progressing" && x["status"] == "False")
    })
    .await;
    c.patch(
        "apps/v1",
        "Deployment",
        Some("default"),
        "stuck",
        json!({"spec": {"paused": true}}),
    )
    .await;
    c.wait("paused", T, || async {
        cond_reason(&dep(&c, "stuck").await, "Progressing") == "DeploymentPaused"
    })
    .await;
    c.patch(
        "apps/v1",
        "Deployment",
        Some("default"),
        "stuck",
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "img2"}]}}}}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        c.list("apps/v1", "ReplicaSet", Some("default")).await.len(),
        1,
        "a paused deployment must not roll"
    );
    c.patch(
        "apps/v1",
        "Deployment",
        Some("default"),
        "stuck",
        json!({"spec": {"paused": false}}),
    )
    .await;
    c.wait("resumed rollout starts", T, || async {
        c.list("apps/v1", "ReplicaSet", Some("default")).await.len() == 2
    })
    .await;
}
