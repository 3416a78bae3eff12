//! Shared harness of the in-process controller tests: the real apiserver router over a memory
//! store, a kube client on it, and the controller manager running with fast settings.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};
use skiff_apiserver::{ApiState, Config, Identity, router};
use skiff_controllers::ControllerConfig;

pub struct Cluster {
    pub client: kube::Client,
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

pub async fn client() -> kube::Client {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let store = skiff_store::memory();
    let state = ApiState::new(store, Config::default()).await.unwrap();
    let svc = tower::ServiceBuilder::new()
        .map_request(|mut req: http::Request<kube::client::Body>| {
            req.extensions_mut().insert(Identity {
                user: "system:kube-controller-manager".into(),
                groups: vec!["system:masters".into()],
                uid: String::new(),
            });
            req
        })
        .service(router(state));
    kube::Client::new(svc, "default")
}

pub fn fast_config() -> ControllerConfig {
    ControllerConfig {
        node_monitor_grace: Duration::from_secs(3),
        node_monitor_period: Duration::from_millis(200),
        job_pod_failure_backoff: Duration::from_millis(100),
        ..Default::default()
    }
}

pub async fn cluster() -> Cluster {
    cluster_with(fast_config()).await
}

pub async fn cluster_with(cfg: ControllerConfig) -> Cluster {
    let client = client().await;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let c2 = client.clone();
    let task = tokio::spawn(async move {
        skiff_controllers::run(c2, cfg, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Cluster {
        client,
        stop: Some(stop),
        task: Some(task),
    }
}

pub fn ar(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn plural(kind: &str) -> String {
    match kind {
        "Endpoints" => "endpoints".into(),
        k => format!("{}s", k.to_lowercase()),
    }
}

impl Cluster {
    /// A cluster over `client` with no controllers running.
    pub fn from_client(client: kube::Client) -> Cluster {
        Cluster {
            client,
            stop: None,
            task: None,
        }
    }

    pub fn dyn_api(&self, api_version: &str, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
        let r = ar(api_version, kind, &plural(kind));
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &r),
            None => Api::all_with(self.client.clone(), &r),
        }
    }

    /// Creates any object from JSON.
    pub async fn create(&self, obj: Value) -> Value {
        let av = obj["apiVersion"].as_str().unwrap().to_string();
        let kind = obj["kind"].as_str().unwrap().to_string();
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
        let d: DynamicObject = serde_json::from_value(obj).unwrap();
        let api = self.dyn_api(&av, &kind, ns.as_deref());
        serde_json::to_value(api.create(&PostParams::default(), &d).await.unwrap()).unwrap()
    }

    pub async fn get(&self, av: &str, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        self.dyn_api(av, kind, ns)
            .get_opt(name)
            .await
            .unwrap()
            .map(|o| serde_json::to_value(o).unwrap())
    }

    pub async fn list(&self, av: &str, kind: &str, ns: Option<&str>) -> Vec<Value> {
        self.dyn_api(av, kind, ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|o| serde_json::to_value(o).unwrap())
            .collect()
    }

    pub async fn patch(&self, av: &str, kind: &str, ns: Option<&str>, name: &str, p: Value) {
        self.dyn_api(av, kind, ns)
            .patch(name, &PatchParams::default(), &Patch::Merge(p))
            .await
            .unwrap();
    }

    pub async fn pods(&self, ns: &str) -> Vec<Pod> {
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
    }

    /// Marks every pod in `ns` that is not yet Running as Running and Ready (a stand-in kubelet).
    pub async fn mark_ready(&self, ns: &str) {
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        for p in self.pods(ns).await {
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if running || p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let st = json!({"status": {"phase": "Running", "podIP": "10.42.0.9",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}});
            let _ = api
                .patch_status(
                    p.metadata.name.as_deref().unwrap(),
                    &PatchParams::default(),
                    &Patch::Merge(st),
                )
                .await;
        }
    }

    /// Ends pod `name` as a kubelet would: phase `Succeeded` (exit code 0) or `Failed` with
    /// `exit_code` in container `c`.
    pub async fn finish_pod(&self, ns: &str, name: &str, exit_code: i32) {
        let phase = if exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        };
        let st = json!({"status": {"phase": phase, "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "c", "image": "busybox", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": exit_code,
                "reason": if exit_code == 0 { "Completed" } else { "Error" }}}}]}});
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(st))
            .await
            .unwrap();
    }

    /// Waits until `f` returns true (polling), or panics with `what`.
    pub async fn wait<F, Fut>(&self, what: &str, timeout: Duration, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if f().await {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
