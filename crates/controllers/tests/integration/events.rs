//! Controller Events (wording, source, de-duplication) and the Event TTL collector, against the
//! real apiserver router and a memory store.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use skiff_controllers::ControllerConfig;
use skiff_controllers::events::{NORMAL, Recorder, WARNING};

const T: Duration = Duration::from_secs(20);

async fn events(c: &common::Cluster, ns: &str) -> Vec<Event> {
    Api::<Event>::namespaced(c.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

fn about<'a>(evs: &'a [Event], kind: &str, name: &str, reason: &str) -> Vec<&'a Event> {
    evs.iter()
        .filter(|e| {
            e.involved_object.kind.as_deref() == Some(kind)
                && e.involved_object.name.as_deref() == Some(name)
                && e.reason.as_deref() == Some(reason)
        })
        .collect()
}

#[tokio::test]
async fn deployment_and_replicaset_events() {
    let c = common::cluster().await;
    c.create(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .await;
    c.wait("2 pods", T, || async { c.pods("default").await.len() == 2 })
        .await;
    let rs = c.list("apps/v1", "ReplicaSet", Some("default")).await;
    assert_eq!(rs.len(), 1);
    let rs_name = rs[0]["metadata"]["name"].as_str().unwrap().to_string();
    let pods: Vec<String> = c
        .pods("default")
        .await
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    c.wait("events", T, || async {
        let evs = events(&c, "default").await;
        about(&evs, "ReplicaSet", &rs_name, "SuccessfulCreate").len() == 2
            && about(&evs, "Deployment", "web", "ScalingReplicaSet").len() == 1
    })
    .await;
    let evs = events(&c, "default").await;
    let scaled = about(&evs, "Deployment", "web", "ScalingReplicaSet")[0];
    assert_eq!(
        scaled.message.as_deref(),
        Some(format!("Scaled up replica set {rs_name} from 0 to 2").as_str())
    );
    assert_eq!(scaled.type_.as_deref(), Some("Normal"));
    assert_eq!(
        scaled.source.as_ref().unwrap().component.as_deref(),
        Some("deployment-controller")
    );
    let mut created: Vec<String> = about(&evs, "ReplicaSet", &rs_name, "SuccessfulCreate")
        .iter()
        .map(|e| e.message.clone().unwrap())
        .collect();
    created.sort();
    let mut want: Vec<String> = pods.iter().map(|p| format!("Created pod: {p}")).collect();
    want.sort();
    assert_eq!(created, want);
    for e in about(&evs, "ReplicaSet", &rs_name, "SuccessfulCreate") {
        assert_eq!(
            e.source.as_ref().unwrap().component.as_deref(),
            Some("replicaset-controller")
        );
        assert_eq!(e.count, Some(1));
        assert!(e.first_timestamp.is_some() && e.last_timestamp.is_some());
    }

    // Scaling down: the Deployment says so and the ReplicaSet names the pod it deleted.
    c.patch(
        "apps/v1",
        "Deployment",
        Some("default"),
        "web",
        json!({"spec": {"replicas": 1}}),
    )
    .await;
    c.wait("scale-down events", T, || async {
        let evs = events(&c, "default").await;
        about(&evs, "Deployment", "web", "ScalingReplicaSet")
            .iter()
            .any(|e| {
                e.message.as_deref()
                    == Some(&format!("Scaled down replica set {rs_name} from 2 to 1"))
            })
            && about(&evs, "ReplicaSet", &rs_name, "SuccessfulDelete")
                .iter()
                .any(|e| {
                    pods.iter()
                        .any(|p| e.message.as_deref() == Some(&format!("Deleted pod: {p}")))
                })
    })
    .await;
}

#[tokio::test]
async fn job_events() {
    let c = common::cluster().await;
    c.create(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "once", "namespace": "default"},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .await;
    c.wait("job pod", T, || async {
        c.pods("default").await.len() == 1
    })
    .await;
    let pod = c.pods("default").await[0].metadata.name.clone().unwrap();
    c.finish_pod("default", &pod, 0).await;
    c.wait("job events", T, || async {
        let evs = events(&c, "default").await;
        let created = about(&evs, "Job", "once", "SuccessfulCreate");
        let done = about(&evs, "Job", "once", "Completed");
        created.len() == 1
            && created[0].message.as_deref() == Some(&format!("Created pod: {pod}"))
            && done.len() == 1
            && done[0].message.as_deref() == Some("Job completed")
            && done[0].source.as_ref().unwrap().component.as_deref() == Some("job-controller")
    })
    .await;
}

#[tokio::test]
async fn repeated_events_are_folded_into_one() {
    let c = common::cluster().await;
    let cms = Api::<ConfigMap>::namespaced(c.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "cfg"}})).unwrap();
    let cm = cms.create(&PostParams::default(), &cm).await.unwrap();
    let rec = Recorder::new(c.client.clone(), "test-controller");
    rec.event(&cm, WARNING, "FailedCreate", "Error creating: quota");
    rec.event(&cm, WARNING, "FailedCreate", "Error creating: quota");
    rec.event(&cm, NORMAL, "SuccessfulCreate", "Created pod: x");
    c.wait("folded event", T, || async {
        let evs = events(&c, "default").await;
        let failed = about(&evs, "ConfigMap", "cfg", "FailedCreate");
        failed.len() == 1
            && failed[0].count == Some(2)
            && about(&evs, "ConfigMap", "cfg", "SuccessfulCreate").len() == 1
    })
    .await;
    let evs = events(&c, "default").await;
    let failed = about(&evs, "ConfigMap", "cfg", "FailedCreate")[0];
    assert!(
        failed.last_timestamp.as_ref().unwrap().0 >= failed.first_timestamp.as_ref().unwrap().0
    );
    assert_eq!(failed.type_.as_deref(), Some("Warning"));
    assert_eq!(
        failed.source.as_ref().unwrap().component.as_deref(),
        Some("test-controller")
    );
    assert_eq!(failed.involved_object.uid, cm.metadata.uid);
}

#[tokio::test]
async fn expired_events_are_deleted() {
    let c = common::cluster_with(ControllerConfig {
        event_ttl: Duration::from_secs(4),
        event_ttl_period: Duration::from_millis(200),
        ..common::fast_config()
    })
    .await;
    let api = Api::<Event>::namespaced(c.client.clone(), "default");
    let now = || k8s_openapi::jiff::Timestamp::now().to_string();
    for name in ["quiet", "busy"] {
        let t = now();
        let ev: Event = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
            "reason": "Test", "message": name, "type": "Normal", "count": 1,
            "firstTimestamp": t, "lastTimestamp": t,
        }))
        .unwrap();
        api.create(&PostParams::default(), &ev).await.unwrap();
    }
    // "busy" happens again 2 s later (count 2, a newer lastTimestamp): it lives on after
    // "quiet" has expired.
    tokio::time::sleep(Duration::from_secs(2)).await;
    api.patch(
        "busy",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"count": 2, "lastTimestamp": now()})),
    )
    .await
    .unwrap();
    assert!(
        api.get_opt("quiet").await.unwrap().is_some(),
        "expired too early"
    );
    c.wait("quiet event expires", T, || async {
        api.get_opt("quiet").await.unwrap().is_none()
    })
    .await;
    assert!(
        api.get_opt("busy").await.unwrap().is_some(),
        "an event seen again was deleted with the first one"
    );
    c.wait("busy event expires after the TTL", T, || async {
        api.get_opt("busy").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn job_failure_and_statefulset_events() {
    let c = common::cluster().await;
    c.create(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "fails", "namespace": "default"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .await;
    c.wait("job pod", T, || async {
        c.pods("default").await.len() == 1
    })
    .await;
    let pod = c.pods("default").await[0].metadata.name.clone().unwrap();
    c.finish_pod("default", &pod, 1).await;
    c.wait("BackoffLimitExceeded event", T, || async {
        let evs = events(&c, "default").await;
        let failed = about(&evs, "Job", "fails", "BackoffLimitExceeded");
        failed.len() == 1
            && failed[0].type_.as_deref() == Some("Warning")
            && failed[0].message.as_deref() == Some("Job has reached the specified backoff limit")
    })
    .await;

    c.create(json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}))
        .await;
    c.wait("StatefulSet create event", T, || async {
        let evs = events(&c, "default").await;
        about(&evs, "StatefulSet", "db", "SuccessfulCreate")
            .iter()
            .any(|e| {
                e.message.as_deref() == Some("create Pod db-0 in StatefulSet db successful")
                    && e.source.as_ref().unwrap().component.as_deref()
                        == Some("statefulset-controller")
            })
    })
    .await;
    c.patch(
        "apps/v1",
        "StatefulSet",
        Some("default"),
        "db",
        json!({"spec": {"replicas": 0}}),
    )
    .await;
    c.wait("StatefulSet delete event", T, || async {
        let evs = events(&c, "default").await;
        about(&evs, "StatefulSet", "db", "SuccessfulDelete")
            .iter()
            .any(|e| e.message.as_deref() == Some("delete Pod db-0 in StatefulSet db successful"))
    })
    .await;
}
