//! The scheduler against the real apiserver router and a memory store, in-process: the kube
//! client talks to the router as a tower Service, no socket.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions may unwrap too

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use skiff_apiserver::{ApiState, Config, Identity, router};
use skiff_scheduler::SchedulerConfig;

struct Cluster {
    client: kube::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn client() -> kube::Client {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let store = skiff_store::memory();
    let state = ApiState::new(store, Config::default()).await.unwrap();
    let svc = tower::ServiceBuilder::new()
        .map_request(|mut req: http::Request<kube::client::Body>| {
            req.extensions_mut().insert(Identity {
                user: "system:kube-scheduler".into(),
                groups: vec!["system:masters".into()],
                uid: String::new(),
            });
            req
        })
        .service(router(state));
    kube::Client::new(svc, "default")
}

fn fast_config() -> SchedulerConfig {
    SchedulerConfig {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ..Default::default()
    }
}

async fn cluster() -> Cluster {
    let client = client().await;
    let mut c = Cluster {
        client,
        stop: None,
        task: None,
    };
    c.start_scheduler();
    c
}

impl Cluster {
    fn start_scheduler(&mut self) {
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let client = self.client.clone();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(async move {
            skiff_scheduler::run(client, fast_config(), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        }));
    }

    async fn node(&self, name: &str, cpu: &str, mem: &str, extra: serde_json::Value) {
        let mut n = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {
                "capacity": {"cpu": cpu, "memory": mem, "pods": "110"},
                "allocatable": {"cpu": cpu, "memory": mem, "pods": "110"},
            }
        });
        merge(&mut n, extra);
        let node: Node = serde_json::from_value(n.clone()).unwrap();
        let api = Api::<Node>::all(self.client.clone());
        api.create(&PostParams::default(), &node).await.unwrap();
        // The apiserver drops `status` on create (as for every resource with a status
        // subresource), so capacity is written the way a kubelet updates it.
        let status = json!({"status": n["status"].clone()});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .unwrap();
    }

    async fn pod(&self, name: &str, cpu: &str, extra: serde_json::Value) {
        let mut p = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "busybox",
                "resources": {"requests": {"cpu": cpu}}}]}
        });
        merge(&mut p, extra);
        let pod: Pod = serde_json::from_value(p).unwrap();
        Api::<Pod>::namespaced(self.client.clone(), "default")
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
    }

    async fn wait_node_name(&self, pod: &str, timeout: Duration) -> Option<String> {
        let api = Api::<Pod>::namespaced(self.client.clone(), "default");
        let deadline = Instant::now() + timeout;
        loop {
            let p = api.get(pod).await.unwrap();
            if let Some(n) = p.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()) {
                return Some(n);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn events_for(&self, pod: &str, reason: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), "default")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.involved_object.name.as_deref() == Some(pod)
                    && e.reason.as_deref() == Some(reason)
            })
            .collect()
    }

    async fn wait_event(&self, pod: &str, reason: &str) -> Event {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.events_for(pod, reason).await.pop() {
                return e;
            }
            assert!(Instant::now() < deadline, "no {reason} event for {pod}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lands_on_the_only_fitting_node_with_a_scheduled_event() {
    let c = cluster().await;
    c.node("small", "1", "1Gi", json!({})).await;
    c.node("big", "8", "16Gi", json!({})).await;
    c.node(
        "tainted",
        "16",
        "32Gi",
        json!({"spec": {"taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]}}),
    )
    .await;
    c.pod("p", "2", json!({})).await;
    let node = c.wait_node_name("p", Duration::from_secs(10)).await;
    assert_eq!(node.as_deref(), Some("big"));
    let ev = c.wait_event("p", "Scheduled").await;
    assert_eq!(
        ev.message.as_deref(),
        Some("Successfully assigned default/p to big")
    );
    assert_eq!(ev.type_.as_deref(), Some("Normal"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_and_tolerations_are_honoured() {
    let c = cluster().await;
    c.node(
        "a",
        "4",
        "8Gi",
        json!({"metadata": {"labels": {"disk": "ssd"}}}),
    )
    .await;
    c.node("b", "4", "8Gi", json!({})).await;
    c.node(
        "gpu",
        "4",
        "8Gi",
        json!({"spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
               "status": {"allocatable": {"nvidia.com/gpu": "2"}, "capacity": {"nvidia.com/gpu": "2"}}}),
    )
    .await;
    c.pod(
        "ssd",
        "100m",
        json!({"spec": {"nodeSelector": {"disk": "ssd"}}}),
    )
    .await;
    c.pod(
        "gpu-pod",
        "100m",
        json!({"spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "c", "image": "busybox",
                "resources": {"requests": {"cpu": "100m"}, "limits": {"nvidia.com/gpu": "1"}}}]}}),
    )
    .await;
    c.pod(
        "not-a",
        "100m",
        json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "disk", "operator": "DoesNotExist"},
                {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["gpu"]}]}]}}}}}),
    )
    .await;
    let t = Duration::from_secs(10);
    assert_eq!(c.wait_node_name("ssd", t).await.as_deref(), Some("a"));
    assert_eq!(c.wait_node_name("gpu-pod", t).await.as_deref(), Some("gpu"));
    assert_eq!(c.wait_node_name("not-a", t).await.as_deref(), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_reports_why_then_lands_when_a_node_fits() {
    let c = cluster().await;
    c.node("n1", "1", "1Gi", json!({})).await;
    c.node(
        "n2",
        "8",
        "8Gi",
        json!({"spec": {"taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]}}),
    )
    .await;
    c.node(
        "n3",
        "8",
        "8Gi",
        json!({"spec": {"taints": [{"key": "k", "value": "v", "effect": "NoExecute"}]}}),
    )
    .await;
    c.pod("big", "2", json!({})).await;
    let ev = c.wait_event("big", "FailedScheduling").await;
    assert_eq!(
        ev.message.as_deref(),
        Some(
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {k: v}. \
             preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
        )
    );
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    // The PodScheduled=False condition.
    let api = Api::<Pod>::namespaced(c.client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = api.get("big").await.unwrap();
        let cond = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled");
        if let Some(cond) = cond {
            assert_eq!(cond.status, "False");
            assert_eq!(cond.reason.as_deref(), Some("Unschedulable"));
            assert!(cond.message.unwrap().starts_with("0/3 nodes are available"));
            break;
        }
        assert!(Instant::now() < deadline, "no PodScheduled condition");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        c.wait_node_name("big", Duration::from_millis(300))
            .await
            .is_none()
    );
    // A fitting node appears: the pod is retried and lands there.
    c.node("n4", "4", "4Gi", json!({})).await;
    assert_eq!(
        c.wait_node_name("big", Duration::from_secs(10))
            .await
            .as_deref(),
        Some("n4")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_are_accounted_across_pods_and_freed_on_delete() {
    let c = cluster().await;
    c.node("n1", "1", "1Gi", json!({})).await;
    c.pod("first", "600m", json!({})).await;
    assert_eq!(
        c.wait_node_name("first", Duration::from_secs(10))
            .await
            .as_deref(),
        Some("n1")
    );
    c.pod("second", "600m", json!({})).await;
    let ev = c.wait_event("second", "FailedScheduling").await;
    assert!(
        ev.message
            .as_deref()
            .unwrap()
            .starts_with("0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."),
        "{:?}",
        ev.message
    );
    Api::<Pod>::namespaced(c.client.clone(), "default")
        .delete(
            "first",
            &kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        c.wait_node_name("second", Duration::from_secs(10))
            .await
            .as_deref(),
        Some("n1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_schedulers_pods_and_host_port_conflicts() {
    let c = cluster().await;
    c.node("n1", "4", "4Gi", json!({})).await;
    c.pod("mine", "100m", json!({"spec": {"schedulerName": "other"}}))
        .await;
    let port = json!({"spec": {"containers": [{"name": "c", "image": "busybox",
        "ports": [{"containerPort": 80, "hostPort": 8080}]}]}});
    c.pod("web1", "", port.clone()).await;
    assert_eq!(
        c.wait_node_name("web1", Duration::from_secs(10))
            .await
            .as_deref(),
        Some("n1")
    );
    c.pod("web2", "", port).await;
    let ev = c.wait_event("web2", "FailedScheduling").await;
    assert!(ev.message.unwrap().starts_with(
        "0/1 nodes are available: 1 node(s) didn't have free ports for the requested pod ports."
    ));
    assert!(
        c.wait_node_name("mine", Duration::from_millis(200))
            .await
            .is_none()
    );
    assert!(c.events_for("mine", "FailedScheduling").await.is_empty());
}

/// Throughput: 1,000 pending pods on 100 nodes, from scheduler start to all bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_1000_pods_100_nodes() {
    let mut c = Cluster {
        client: client().await,
        stop: None,
        task: None,
    };
    for i in 0..100 {
        c.node(&format!("node-{i:03}"), "32", "64Gi", json!({}))
            .await;
    }
    let api = Api::<Pod>::namespaced(c.client.clone(), "default");
    let mut creates = Vec::new();
    for i in 0..1000 {
        let api = api.clone();
        creates.push(tokio::spawn(async move {
            let pod: Pod = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p-{i:04}"), "namespace": "default"},
                "spec": {"containers": [{"name": "c", "image": "busybox",
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
            }))
            .unwrap();
            api.create(&PostParams::default(), &pod).await.unwrap();
        }));
    }
    for t in creates {
        t.await.unwrap();
    }
    let started = Instant::now();
    c.start_scheduler();
    let deadline = started + Duration::from_secs(120);
    let per_node: BTreeMap<String, usize> = loop {
        let pods = api.list(&ListParams::default()).await.unwrap().items;
        let bound: Vec<String> = pods
            .iter()
            .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect();
        if bound.len() == 1000 {
            let mut m = BTreeMap::new();
            for n in bound {
                *m.entry(n).or_default() += 1;
            }
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 1000 bound",
            bound.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "scheduler throughput: 1000 pods on 100 nodes in {secs:.3} s = {:.0} pods/s",
        1000.0 / secs
    );
    // least-allocated spreads identical pods (scores are integers 0..100, ties random, as in
    // kube-scheduler, so the spread is even up to a few pods)
    assert_eq!(per_node.len(), 100);
    assert!(
        per_node.values().all(|n| (5..=15).contains(n)),
        "{per_node:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_pod_anti_affinity_spreads_replicas() {
    let c = cluster().await;
    for n in ["n1", "n2"] {
        c.node(n, "4", "4Gi", json!({})).await;
    }
    let anti = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"app": "web"}},
            "topologyKey": "kubernetes.io/hostname"}]}}}});
    c.pod("web-0", "100m", anti.clone()).await;
    let first = c
        .wait_node_name("web-0", Duration::from_secs(10))
        .await
        .unwrap();
    c.pod("web-1", "100m", anti.clone()).await;
    let second = c
        .wait_node_name("web-1", Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(first, second);
    c.pod("web-2", "100m", anti).await;
    let ev = c.wait_event("web-2", "FailedScheduling").await;
    assert!(
        ev.message.as_deref().unwrap().starts_with(
            "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules."
        ),
        "{:?}",
        ev.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_topology_spread_balances_zones() {
    let c = cluster().await;
    c.node(
        "a1",
        "8",
        "8Gi",
        json!({"metadata": {"labels": {"zone": "a"}}}),
    )
    .await;
    c.node(
        "a2",
        "8",
        "8Gi",
        json!({"metadata": {"labels": {"zone": "a"}}}),
    )
    .await;
    c.node(
        "b1",
        "1",
        "1Gi",
        json!({"metadata": {"labels": {"zone": "b"}}}),
    )
    .await;
    let spread = json!({"metadata": {"labels": {"app": "s"}}, "spec": {"topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": "s"}}}]}});
    let mut zones = BTreeMap::<String, usize>::new();
    for i in 0..4 {
        let name = format!("s-{i}");
        c.pod(&name, "100m", spread.clone()).await;
        let node = c
            .wait_node_name(&name, Duration::from_secs(10))
            .await
            .unwrap();
        *zones.entry(node[..1].to_string()).or_default() += 1;
    }
    // Least-allocated alone would put most pods in zone a (bigger nodes); the constraint keeps 2/2.
    assert_eq!(
        zones,
        BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 2)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_pod_preempts_a_lower_one() {
    let c = cluster().await;
    c.node("n1", "1", "1Gi", json!({})).await;
    c.pod("low-a", "400m", json!({"spec": {"priority": 1}}))
        .await;
    c.pod("low-b", "400m", json!({"spec": {"priority": 2}}))
        .await;
    let t = Duration::from_secs(10);
    assert!(c.wait_node_name("low-a", t).await.is_some());
    assert!(c.wait_node_name("low-b", t).await.is_some());
    c.pod("high", "500m", json!({"spec": {"priority": 1000}}))
        .await;
    // The lowest-priority pod that frees enough is evicted (graceful: it gets a deletionTimestamp).
    let ev = c.wait_event("low-a", "Preempted").await;
    assert!(ev.message.unwrap().ends_with("on node n1"));
    let api = Api::<Pod>::namespaced(c.client.clone(), "default");
    let deadline = Instant::now() + t;
    loop {
        let p = api.get("high").await.unwrap();
        if p.status.and_then(|s| s.nominated_node_name).as_deref() == Some("n1") {
            break;
        }
        assert!(Instant::now() < deadline, "no nominatedNodeName");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let low_a = api.get("low-a").await.unwrap();
    assert!(low_a.metadata.deletion_timestamp.is_some());
    assert!(
        api.get("low-b")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );
    // The kubelet would finish the deletion; do it here. Then the pod lands.
    api.delete(
        "low-a",
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(c.wait_node_name("high", t).await.as_deref(), Some("n1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_topology_spread_prefers_the_emptier_zone() {
    let c = cluster().await;
    c.node(
        "a1",
        "64",
        "64Gi",
        json!({"metadata": {"labels": {"zone": "a"}}}),
    )
    .await;
    c.node(
        "b1",
        "2",
        "2Gi",
        json!({"metadata": {"labels": {"zone": "b"}}}),
    )
    .await;
    c.pod(
        "seed",
        "100m",
        json!({"metadata": {"labels": {"app": "soft"}}, "spec": {"nodeName": "a1"}}),
    )
    .await;
    c.pod(
        "soft",
        "100m",
        json!({"metadata": {"labels": {"app": "soft"}}, "spec": {"topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"app": "soft"}}}]}}),
    )
    .await;
    // a1 is far emptier (least-allocated prefers it) but zone a already has a matching pod.
    assert_eq!(
        c.wait_node_name("soft", Duration::from_secs(10))
            .await
            .as_deref(),
        Some("b1")
    );
}
