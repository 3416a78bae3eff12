//! The kubelet against the in-process API server (memory store) and the real built-in runtime
//! (root): node registration and lease, pods with init containers, volumes, env, probes,
//! restarts with back-off, graceful deletion, and re-adoption by a new kubelet.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions may unwrap too

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use skiff_apiserver::{ApiState, Config, Identity, router};
use skiff_kubelet::server::ServerConfig;
use skiff_kubelet::{KubeletConfig, run};
use skiff_runtime::{BuiltinRuntime, ImageStore, Runtime, RuntimeConfig};

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (namespaces, cgroups, bridge, overlay mounts): run it as root, as CI does"
    );
}

fn rand_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn busybox_tar() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/images/busybox.tar");
    assert!(
        p.exists(),
        "{} is missing: run `make images` first (make test does)",
        p.display()
    );
    p
}

async fn api_client() -> kube::Client {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let state = ApiState::new(skiff_store::memory(), Config::default())
        .await
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .map_request(|mut req: http::Request<kube::client::Body>| {
            req.extensions_mut().insert(Identity {
                user: "system:node:test".into(),
                groups: vec!["system:masters".into()],
                uid: String::new(),
            });
            req
        })
        .service(router(state));
    kube::Client::new(svc, "default")
}

/// A node under test: dirs, a unique bridge and pod CIDR, cleaned on drop.
struct TestNode {
    dir: tempfile::TempDir,
    bridge: String,
    cidr: String,
    cgroup: String,
    name: String,
}

impl TestNode {
    fn new() -> TestNode {
        require_root();
        let r = rand_hex(3);
        let dir = tempfile::Builder::new()
            .prefix("skiff-kubelet-")
            .tempdir_in("/tmp")
            .unwrap();
        let b = u8::from_str_radix(&r[0..2], 16).unwrap();
        TestNode {
            dir,
            bridge: format!("skt{r}"),
            cidr: format!("10.{}.{}.0/24", 200 + b % 50, b),
            cgroup: format!("skiff-kt-{r}"),
            name: format!("node-{r}"),
        }
    }

    fn runtime(&self) -> Arc<dyn Runtime> {
        let images = ImageStore::open(self.dir.path().join("images")).unwrap();
        let rt = BuiltinRuntime::new(RuntimeConfig {
            state_dir: self.dir.path().join("rt"),
            images,
            shim_command: vec![env!("CARGO_BIN_EXE_skiff-kubelet-test-shim").into()],
            cgroup_parent: self.cgroup.clone(),
        })
        .unwrap();
        Arc::new(rt)
    }

    fn config(&self) -> KubeletConfig {
        let mut cfg = KubeletConfig::new(self.name.clone(), self.dir.path().join("kubelet"));
        cfg.bridge_name = self.bridge.clone();
        cfg.pod_cidr_override = Some(self.cidr.clone());
        cfg.node_ip = Some("127.0.0.1".parse().unwrap());
        cfg.control_plane = true;
        cfg.initial_backoff = Duration::from_secs(1);
        cfg.max_backoff = Duration::from_secs(4);
        cfg.sync_interval = Duration::from_millis(300);
        // The build machine's disk is over the image GC threshold: keep the test images.
        cfg.eviction.image_gc_high = 100;
        // Nor should a build machine with little free disk evict the tests' pods.
        cfg.eviction.hard =
            skiff_kubelet::eviction::parse_thresholds("nodefs.available<1%,imagefs.available<1%")
                .unwrap();
        cfg
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let rtdir = self.dir.path().join("rt");
        let images = self.dir.path().join("images");
        let cgroup = self.cgroup.clone();
        let shim = env!("CARGO_BIN_EXE_skiff-kubelet-test-shim");
        let _ = std::thread::spawn(move || {
            let t = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            t.block_on(async move {
                let Ok(store) = ImageStore::open(&images) else {
                    return;
                };
                let Ok(rt) = BuiltinRuntime::new(RuntimeConfig {
                    state_dir: rtdir,
                    images: store,
                    shim_command: vec![shim.into()],
                    cgroup_parent: cgroup,
                }) else {
                    return;
                };
                for sb in rt.list_sandboxes().unwrap_or_default() {
                    let _ = BuiltinRuntime::remove_sandbox(&rt, &sb.id).await;
                }
                for c in rt.list().await.unwrap_or_default() {
                    let _ = rt.remove(&c.id).await;
                }
                let _ = rt.remove_cgroup_parent();
                rt.release_pins_mount();
            });
        })
        .join();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        // Unmount anything left under the dir (tmpfs volumes) before the temp dir goes.
        if let Ok(t) = std::fs::read_to_string("/proc/self/mountinfo") {
            let prefix = self.dir.path().display().to_string();
            for m in t.lines().filter_map(|l| l.split_whitespace().nth(4)) {
                if m.starts_with(&prefix) {
                    let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
    }
}

struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), skiff_kubelet::KubeletError>>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn start(client: &kube::Client, rt: Arc<dyn Runtime>, cfg: KubeletConfig) -> Running {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let pki = skiff_pki::ensure_server_pki(&cfg.root_dir.join("tls"), &[]).unwrap();
    let server = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        serving_cert_pem: pki.kubelet_serving_cert_pem.clone(),
        serving_key_pem: pki.kubelet_serving_key_pem.clone(),
        client_ca_pem: pki.ca_cert_pem.clone(),
    };
    let task = tokio::spawn(run(
        client.clone(),
        rt,
        cfg,
        server,
        async move {
            let _ = rx.await;
        },
        |_| {},
    ));
    Running {
        stop: Some(tx),
        task: Some(task),
    }
}

async fn wait_for<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn pod_where(
    pods: &Api<Pod>,
    name: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&Pod) -> bool,
) -> Pod {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let p = pods.get_opt(name).await.unwrap();
        if let Some(p) = p {
            if pred(&p) {
                return p;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for pod {name}: {what}; status: {:?}",
                    p.status
                );
            }
        } else if Instant::now() > deadline {
            panic!("timed out waiting for pod {name}: {what}; the pod does not exist");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn status_of<'a>(p: &'a Pod, c: &str) -> Option<&'a k8s_openapi::api::core::v1::ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == c)
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn exec(rt: &Arc<dyn Runtime>, p: &Pod, c: &str, cmd: &str) -> String {
    let id = status_of(p, c)
        .and_then(|s| s.container_id.clone())
        .unwrap()
        .trim_start_matches("skiff://")
        .to_string();
    let out = rt
        .exec_sync(
            &id,
            vec!["sh".into(), "-c".into(), cmd.into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_registration_pods_probes_restarts_and_deletion() {
    let node = TestNode::new();
    let client = api_client().await;
    let rt = node.runtime();
    rt.import_image(busybox_tar()).await.unwrap();
    let k = start(&client, rt.clone(), node.config());

    // Node and lease.
    let nodes: Api<Node> = Api::all(client.clone());
    let n = wait_for("node registered", 30, async || {
        nodes.get_opt(&node.name).await.unwrap()
    })
    .await;
    let labels = n.metadata.labels.clone().unwrap();
    assert_eq!(labels["node-role.kubernetes.io/control-plane"], "true");
    assert_eq!(labels["kubernetes.io/hostname"], node.name);
    let st = n.status.clone().unwrap();
    let info = st.node_info.unwrap();
    assert!(
        info.container_runtime_version.starts_with("skiff://"),
        "{info:?}"
    );
    assert!(st.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port > 0);
    assert_eq!(st.capacity.unwrap()["pods"].0, "110");
    // Registered with a Ready condition: True once the pod network is set up, until then False
    // with the kubelet's reason.
    let node_ready = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready").cloned())
    };
    let first = node_ready(&n).expect("a Ready condition at registration");
    assert!(
        first.status == "True"
            || (first.status == "False" && first.reason.as_deref() == Some("KubeletNotReady")),
        "{first:?}"
    );
    wait_for("node Ready", 30, async || {
        let n = nodes.get_opt(&node.name).await.unwrap()?;
        (node_ready(&n)?.status == "True").then_some(())
    })
    .await;
    // The kubelet creates its Lease right after registering the Node: wait for it too.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let l = wait_for("node lease", 30, async || {
        leases.get_opt(&node.name).await.unwrap()
    })
    .await;
    assert!(l.spec.unwrap().renew_time.is_some());

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "cfg"}, "data": {"greeting": "hello", "color": "blue"}
        }))
        .unwrap(),
    )
    .await
    .unwrap();

    // A pod with an init container, emptyDir, configMap volume, env, readiness probe, preStop.
    let web: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "nodeName": node.name,
            "terminationGracePeriodSeconds": 10,
            "initContainers": [{
                "name": "init", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo from-init > /work/init.txt"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}]
            }],
            "containers": [{
                "name": "main", "image": "skiff.local/busybox:stable", "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "touch /tmp/ready; trap 'exit 0' TERM; while true; do sleep 1; done"],
                "env": [
                    {"name": "A", "value": "x"},
                    {"name": "B", "value": "$(A)-y"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "color"}}}
                ],
                "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1},
                "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo bye > /work/prestop; sleep 2"]}}},
                "volumeMounts": [
                    {"name": "work", "mountPath": "/work"},
                    {"name": "cfg", "mountPath": "/cfg"},
                    {"name": "mem", "mountPath": "/mem"}
                ]
            }],
            "volumes": [
                {"name": "work", "emptyDir": {}},
                {"name": "cfg", "configMap": {"name": "cfg"}},
                {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}}
            ]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &web).await.unwrap();
    let p = pod_where(&pods, "web", 60, "Running and Ready", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    let s = p.status.clone().unwrap();
    let ip: std::net::Ipv4Addr = s.pod_ip.clone().unwrap().parse().unwrap();
    let cidr: skiff_net::Ipv4Cidr = node.cidr.parse().unwrap();
    assert!(cidr.contains(ip), "pod IP {ip} not in {cidr}");
    assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));
    assert!(s.start_time.is_some());
    let init = &s.init_container_statuses.clone().unwrap()[0];
    assert_eq!(
        init.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .reason
            .as_deref(),
        Some("Completed")
    );
    let main = status_of(&p, "main").unwrap();
    assert!(main.ready && main.started == Some(true));
    assert!(main.container_id.as_ref().unwrap().starts_with("skiff://"));
    assert_eq!(
        exec(&rt, &p, "main", "cat /work/init.txt").await,
        "from-init\n"
    );
    assert_eq!(
        exec(&rt, &p, "main", "echo $B $POD $COLOR").await,
        "x-y web blue\n"
    );
    assert_eq!(exec(&rt, &p, "main", "cat /cfg/greeting").await, "hello");
    let resolv = exec(&rt, &p, "main", "cat /etc/resolv.conf").await;
    assert!(
        resolv.contains("nameserver 10.43.0.10")
            && resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local")
            && resolv.contains("ndots:5"),
        "{resolv}"
    );
    let hosts = exec(&rt, &p, "main", "cat /etc/hosts").await;
    assert!(hosts.contains(&format!("{ip}\tweb")), "{hosts}");
    let mounts = exec(&rt, &p, "main", "grep ' /mem ' /proc/mounts").await;
    assert!(mounts.contains("tmpfs"), "{mounts}");

    // The configMap volume follows the object.
    cms.patch(
        "cfg",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"greeting": "changed"}})),
    )
    .await
    .unwrap();
    wait_for("configmap volume update", 30, async || {
        (exec(&rt, &p, "main", "cat /cfg/greeting").await == "changed").then_some(())
    })
    .await;

    // Readiness gates Ready.
    exec(&rt, &p, "main", "rm /tmp/ready").await;
    pod_where(&pods, "web", 20, "not ready", |p| !ready(p)).await;
    exec(&rt, &p, "main", "touch /tmp/ready").await;
    pod_where(&pods, "web", 20, "ready again", ready).await;

    // Crash loop with growing restartCount and CrashLoopBackOff.
    let crash: Pod = serde_json::from_value(json!({
        "metadata": {"name": "crash"},
        "spec": {
            "nodeName": node.name,
            "containers": [{
                "name": "c", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo dying > /dev/termination-log; exit 3"]
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &crash).await.unwrap();
    let p = pod_where(&pods, "crash", 60, "CrashLoopBackOff", |p| {
        status_of(p, "c").is_some_and(|s| {
            s.restart_count >= 2
                && s.state
                    .as_ref()
                    .and_then(|st| st.waiting.as_ref())
                    .and_then(|w| w.reason.as_deref())
                    == Some("CrashLoopBackOff")
        })
    })
    .await;
    let last = status_of(&p, "c").unwrap().last_state.clone().unwrap();
    let t = last.terminated.unwrap();
    assert_eq!(t.exit_code, 3);
    assert_eq!(t.reason.as_deref(), Some("Error"));
    assert_eq!(t.message.as_deref(), Some("dying\n"));

    // Liveness failure restarts.
    let live: Pod = serde_json::from_value(json!({
        "metadata": {"name": "live"},
        "spec": {
            "nodeName": node.name,
            "containers": [{
                "name": "c", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                "command": ["sh", "-c", "touch /tmp/ok; sleep 3600"],
                "livenessProbe": {"exec": {"command": ["test", "-f", "/tmp/ok"]}, "periodSeconds": 1, "failureThreshold": 1}
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &live).await.unwrap();
    let p = pod_where(&pods, "live", 60, "running", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    exec(&rt, &p, "c", "rm /tmp/ok").await;
    pod_where(&pods, "live", 60, "restarted by liveness", |p| {
        status_of(p, "c").is_some_and(|s| s.restart_count >= 1)
    })
    .await;

    // OOMKilled.
    let oom: Pod = serde_json::from_value(json!({
        "metadata": {"name": "oom"},
        "spec": {
            "nodeName": node.name, "restartPolicy": "Never",
            "containers": [{
                "name": "c", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                "command": ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
                "resources": {"limits": {"memory": "16Mi"}}
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &oom).await.unwrap();
    let p = pod_where(&pods, "oom", 60, "Failed", |p| phase(p) == "Failed").await;
    let t = status_of(&p, "c")
        .unwrap()
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(t.reason.as_deref(), Some("OOMKilled"), "{t:?}");

    // activeDeadlineSeconds: the pod is stopped and Failed with reason DeadlineExceeded.
    let slow: Pod = serde_json::from_value(json!({
        "metadata": {"name": "deadline"},
        "spec": {
            "nodeName": node.name, "activeDeadlineSeconds": 3, "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                "command": ["sleep", "3600"]
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &slow).await.unwrap();
    let p = pod_where(&pods, "deadline", 60, "Failed (DeadlineExceeded)", |p| {
        phase(p) == "Failed"
    })
    .await;
    let st = p.status.clone().unwrap();
    assert_eq!(st.reason.as_deref(), Some("DeadlineExceeded"), "{st:?}");
    assert!(!ready(&p));
    wait_for("deadline pod's container stopped", 30, async || {
        let p = pods.get("deadline").await.unwrap();
        status_of(&p, "c")
            .and_then(|s| s.state.clone())
            .and_then(|s| s.terminated)
    })
    .await;

    // Graceful delete with preStop: the object stays until the hook ran.
    let started = Instant::now();
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for("web deleted", 30, async || {
        pods.get_opt("web").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "deleted after {:?}, before the 2 s preStop hook could finish",
        started.elapsed()
    );
    for name in ["crash", "live", "oom", "deadline"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_for("all pods gone and sandboxes removed", 60, async || {
        let left = pods.list(&Default::default()).await.unwrap().items.len();
        let sbs = rt.list_sandboxes().await.unwrap().len();
        (left == 0 && sbs == 0).then_some(())
    })
    .await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_restart_readopts_and_cleans_pods_deleted_while_down() {
    let node = TestNode::new();
    let client = api_client().await;
    let rt = node.runtime();
    rt.import_image(busybox_tar()).await.unwrap();
    let k = start(&client, rt.clone(), node.config());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for name in ["keep", "gone"] {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": node.name,
                "containers": [{
                    "name": "c", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"]
                }]
            }
        }))
        .unwrap();
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let before = pod_where(&pods, "keep", 60, "running", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    pod_where(&pods, "gone", 60, "running", |p| phase(p) == "Running").await;
    let id_before = status_of(&before, "c").unwrap().container_id.clone();
    k.stop().await;

    // While the kubelet is down, "gone" is removed from the API (force delete).
    pods.delete(
        "gone",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rt.list_sandboxes().await.unwrap().len(), 2);

    // A new kubelet with a new runtime instance on the same state.
    let rt2 = node.runtime();
    let k2 = start(&client, rt2.clone(), node.config());
    wait_for("orphan sandbox removed", 30, async || {
        (rt2.list_sandboxes().await.unwrap().len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = pods.get("keep").await.unwrap();
    let s = status_of(&after, "c").unwrap();
    assert_eq!(
        s.container_id, id_before,
        "the container was re-adopted, not replaced"
    );
    assert_eq!(s.restart_count, 0);
    assert!(s.ready);
    assert_eq!(phase(&after), "Running");
    pods.delete(
        "keep",
        &DeleteParams {
            grace_period_seconds: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    wait_for("keep deleted", 30, async || {
        pods.get_opt("keep").await.unwrap().is_none().then_some(())
    })
    .await;
    wait_for("sandboxes removed", 30, async || {
        rt2.list_sandboxes().await.unwrap().is_empty().then_some(())
    })
    .await;
    k2.stop().await;
}

/// Debian's docker-registry on a free loopback port with htpasswd basic auth; killed on drop.
struct AuthRegistry {
    child: std::process::Child,
    port: u16,
}

impl AuthRegistry {
    fn start(dir: &Path, user: &str, password: &str) -> AuthRegistry {
        assert!(
            Path::new("/usr/bin/docker-registry").exists(),
            "Debian package docker-registry must be installed (make deps)"
        );
        let hash = bcrypt::hash_with_result(password, 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY);
        std::fs::write(dir.join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
                dir.join("data").display(),
                dir.join("htpasswd").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        AuthRegistry { child, port }
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_image_pull_secrets_authenticate_pulls() {
    let node = TestNode::new();
    let regdir = tempfile::tempdir().unwrap();
    let reg = AuthRegistry::start(regdir.path(), "puller", "s3cret-pw");
    let out = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--insecure-policy",
        ])
        .arg("--dest-creds=puller:s3cret-pw")
        .arg(format!("oci-archive:{}", busybox_tar().display()))
        .arg(format!("docker://127.0.0.1:{}/team/busybox:1", reg.port))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = api_client().await;
    let k = start(&client, node.runtime(), node.config());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "default");
    let dockercfg = json!({"auths": {format!("127.0.0.1:{}", reg.port): {
        "username": "puller", "password": "s3cret-pw"}}});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "regcred"},
                "type": "kubernetes.io/dockerconfigjson",
                "stringData": {".dockerconfigjson": dockercfg.to_string()}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let image = format!("127.0.0.1:{}/team/busybox:1", reg.port);
    let pod = |name: &str, secret: Option<&str>| -> Pod {
        let mut spec = json!({
            "nodeName": node.name, "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": image, "command": ["sleep", "3600"]}]
        });
        if let Some(s) = secret {
            spec["imagePullSecrets"] = json!([{"name": "missing"}, {"name": s}]);
        }
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("anon", None))
        .await
        .unwrap();
    // Without credentials first (once pulled, IfNotPresent would use the local image).
    let p = pod_where(&pods, "anon", 60, "ErrImagePull without credentials", |p| {
        status_of(p, "c")
            .and_then(|s| s.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            .is_some_and(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
    })
    .await;
    assert_eq!(phase(&p), "Pending");
    pods.create(&PostParams::default(), &pod("authed", Some("regcred")))
        .await
        .unwrap();
    pod_where(
        &pods,
        "authed",
        90,
        "Running with the secret's credentials",
        |p| phase(p) == "Running",
    )
    .await;
    // The missing secret is reported, and the password never appears in events.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    let evs = events.list(&Default::default()).await.unwrap().items;
    assert!(
        evs.iter()
            .any(|e| e.reason.as_deref() == Some("FailedToRetrieveImagePullSecret")),
        "{evs:?}"
    );
    assert!(
        !evs.iter()
            .any(|e| e.message.as_deref().unwrap_or("").contains("s3cret-pw"))
    );
    for n in ["anon", "authed"] {
        pods.delete(n, &DeleteParams::default()).await.unwrap();
    }
    wait_for("pods gone", 60, async || {
        pods.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    k.stop().await;
}

fn init_status<'a>(p: &'a Pod, c: &str) -> Option<&'a k8s_openapi::api::core::v1::ContainerStatus> {
    p.status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_sidecar_containers_run_beside_the_app_and_stop_after_it() {
    let node = TestNode::new();
    let client = api_client().await;
    let rt = node.runtime();
    rt.import_image(busybox_tar()).await.unwrap();
    let k = start(&client, rt.clone(), node.config());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // restartPolicy Never, as a Job's pod: the sidecar starts first (the next init container
    // sees its file), is restarted when it exits, and is stopped once the app has finished.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "with-sidecar"},
        "spec": {
            "nodeName": node.name, "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
            "initContainers": [
                {"name": "side", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                 "restartPolicy": "Always",
                 "command": ["sh", "-c", "date >> /work/side; trap 'exit 0' TERM; while true; do sleep 1; done"],
                 "readinessProbe": {"exec": {"command": ["test", "-f", "/work/side"]}, "periodSeconds": 1},
                 "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
                {"name": "check", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                 "command": ["test", "-f", "/work/side"],
                 "volumeMounts": [{"name": "work", "mountPath": "/work"}]}
            ],
            "containers": [{
                "name": "app", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                "command": ["sh", "-c", "while [ ! -f /work/done ]; do sleep 0.2; done; wc -l < /work/side > /work/runs"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}]
            }],
            "volumes": [{"name": "work", "emptyDir": {}}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let p = pod_where(&pods, "with-sidecar", 60, "Running and Ready", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    let side = init_status(&p, "side").unwrap();
    assert_eq!(side.started, Some(true), "{side:?}");
    assert!(side.ready, "{side:?}");
    assert!(side.state.as_ref().unwrap().running.is_some(), "{side:?}");
    let check = init_status(&p, "check").unwrap();
    assert_eq!(
        check
            .state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        0
    );
    // The sidecar exits: it is restarted although the pod's policy is Never.
    let sid = side
        .container_id
        .clone()
        .unwrap()
        .trim_start_matches("skiff://")
        .to_string();
    rt.exec_sync(
        &sid,
        vec!["kill".into(), "1".into()],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    pod_where(&pods, "with-sidecar", 60, "sidecar restarted", |p| {
        init_status(p, "side").is_some_and(|s| {
            s.restart_count >= 1 && s.state.as_ref().is_some_and(|st| st.running.is_some())
        })
    })
    .await;
    // Let the app finish: the pod succeeds and the sidecar is stopped.
    let p = pods.get("with-sidecar").await.unwrap();
    let app = status_of(&p, "app")
        .and_then(|s| s.container_id.clone())
        .unwrap()
        .trim_start_matches("skiff://")
        .to_string();
    rt.exec_sync(
        &app,
        vec!["touch".into(), "/work/done".into()],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let p = pod_where(&pods, "with-sidecar", 60, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let side = init_status(&p, "side").unwrap();
    assert!(
        side.state.as_ref().unwrap().terminated.is_some(),
        "the sidecar is stopped after the app: {side:?}"
    );
    pods.delete("with-sidecar", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("pod gone", 60, async || {
        pods.get_opt("with-sidecar")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_fs_group_owns_empty_dir_and_secret_volumes() {
    let node = TestNode::new();
    let client = api_client().await;
    let rt = node.runtime();
    rt.import_image(busybox_tar()).await.unwrap();
    let k = start(&client, rt.clone(), node.config());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "fsg"},
                "stringData": {"key": "s3cret"}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "fsgroup"},
        "spec": {
            "nodeName": node.name, "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
            "containers": [{
                "name": "c", "image": "skiff.local/busybox:stable", "imagePullPolicy": "Never",
                "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                 {"name": "sec", "mountPath": "/sec"}]
            }],
            "volumes": [{"name": "data", "emptyDir": {}},
                        {"name": "sec", "secret": {"secretName": "fsg", "defaultMode": 256}}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let p = pod_where(&pods, "fsgroup", 60, "Running", |p| phase(p) == "Running").await;
    // A user of the pod (uid 1000, not root) writes into the emptyDir; the new file gets the
    // fsGroup (setgid directory) and the secret (mode 0400 asked) is readable through it.
    let out = exec(
        &rt,
        &p,
        "c",
        "touch /data/new && stat -c '%g %a' /data /data/new && stat -L -c '%g %a' /sec/key && cat /sec/key && echo && id -G",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first().copied(), Some("2000 2777"), "emptyDir: {out}");
    assert_eq!(
        lines.get(1).map(|l| l.split(' ').next()),
        Some(Some("2000")),
        "new file: {out}"
    );
    assert_eq!(
        lines.get(2).copied(),
        Some("2000 440"),
        "secret file: {out}"
    );
    assert_eq!(
        lines.get(3).copied(),
        Some("s3cret"),
        "secret readable: {out}"
    );
    assert!(
        lines
            .get(4)
            .is_some_and(|g| g.split(' ').any(|x| x == "2000")),
        "fsGroup among the process' groups: {out}"
    );
    pods.delete("fsgroup", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("pod gone", 60, async || {
        pods.get_opt("fsgroup")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    k.stop().await;
}
