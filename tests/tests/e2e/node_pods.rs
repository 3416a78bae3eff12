//! Pods on a real node: `skiff server` with its kubelet, driven by real kubectl 1.27 and 1.33.
//! Pods name the node directly (spec.nodeName). Every test here is named `node_*`: they share
//! the host's `cni0` bridge and run one at a time (.config/nextest.toml).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_e2e::{Kubectl, Server, skiff_binary};

fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "node tests need root (containers, bridge, cgroups): run them as root, as CI does"
    );
}

fn busybox_tar() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/images/busybox.tar");
    assert!(
        p.exists(),
        "{} is missing: run `make images` first (make test does)",
        p.display()
    );
    p
}

/// A server with the node half, the busybox image imported into its data dir.
fn node_server() -> Server {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("skiff-node-e2e-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let st = Command::new(skiff_binary())
        .args(["images", "--data-dir"])
        .arg(dir.path())
        .arg("import")
        .arg(busybox_tar())
        .status()
        .expect("skiff images import");
    assert!(st.success(), "skiff images import failed");
    Server::start_with_agent(dir, &[])
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn jp(k: &Kubectl, pod: &str, path: &str) -> String {
    let out = k.run(&["get", "pod", pod, "-o", &format!("jsonpath={path}")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const POD: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {greeting: hello}
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  nodeName: skiff-e2e
  terminationGracePeriodSeconds: 20
  initContainers:
  - name: init
    image: skiff.local/busybox:stable
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo init > /host/order"]
    volumeMounts: [{name: host, mountPath: /host}]
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sh", "-c", "echo main >> /host/order; touch /tmp/ready; while true; do cat /cfg/greeting > /host/greeting; sleep 1; done"]
    readinessProbe:
      exec: {command: ["test", "-f", "/tmp/ready"]}
      periodSeconds: 1
      failureThreshold: 1
    lifecycle:
      preStop:
        exec: {command: ["sh", "-c", "sleep 3; echo done > /host/prestop"]}
    volumeMounts:
    - {name: host, mountPath: /host}
    - {name: cfg, mountPath: /cfg}
  volumes:
  - name: host
    hostPath: {path: HOSTDIR, type: DirectoryOrCreate}
  - name: cfg
    configMap: {name: cfg}
"#;

#[test]
fn node_pods_run_restart_probe_update_oom_and_stop_gracefully() {
    let server = node_server();
    let k = Kubectl::new(Some("1.33"), &server);
    let k27 = Kubectl::new(Some("1.27"), &server);
    let host = server.dir.path().join("hostvol");

    // The node registered itself.
    wait_until("node skiff-e2e Ready", 60, || {
        k.run(&[
            "get",
            "node",
            "skiff-e2e",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .stdout
            == b"True"
    });
    let rt = k.ok(&[
        "get",
        "node",
        "skiff-e2e",
        "-o",
        "jsonpath={.status.nodeInfo.containerRuntimeVersion}",
    ]);
    assert!(rt.starts_with("skiff://"), "{rt}");
    let roles = k27.ok(&["get", "nodes"]);
    assert!(roles.contains("control-plane"), "{roles}");

    // Init then app containers; Running with a pod IP; Ready by its readiness probe.
    let manifest = POD.replace("HOSTDIR", &host.display().to_string());
    k.ok_stdin(&["apply", "-f", "-"], &manifest);
    k.ok(&["wait", "--for=condition=Ready", "pod/web", "--timeout=120s"]);
    let ip = jp(&k, "web", "{.status.podIP}");
    assert!(ip.starts_with("10.42.0."), "pod IP {ip:?}");
    let order = std::fs::read_to_string(host.join("order")).unwrap();
    assert!(
        order.starts_with("init\nmain\n"),
        "the init container must run before the app container: {order:?}"
    );
    let row = k27.ok(&["get", "pod", "web"]);
    assert!(row.contains("1/1") && row.contains("Running"), "{row}");
    assert_eq!(jp(&k, "web", "{.status.qosClass}"), "BestEffort");

    // The configMap volume follows an apply.
    k.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {greeting: changed}\n",
    );
    wait_until("configmap volume updated in the pod", 60, || {
        std::fs::read_to_string(host.join("greeting")).is_ok_and(|s| s == "changed")
    });

    // A crashing container: CrashLoopBackOff with a growing restart count.
    k.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"crash"},"spec":{"nodeName":"skiff-e2e",
            "containers":[{"name":"c","image":"skiff.local/busybox:stable","imagePullPolicy":"Never",
            "command":["sh","-c","exit 2"]}]}}"#,
    );
    wait_until("crash in CrashLoopBackOff with restarts >= 2", 120, || {
        let row = String::from_utf8_lossy(&k.run(&["get", "pod", "crash", "--no-headers"]).stdout)
            .into_owned();
        let restarts: i32 = jp(&k, "crash", "{.status.containerStatuses[0].restartCount}")
            .parse()
            .unwrap_or(0);
        row.contains("CrashLoopBackOff") && restarts >= 2
    });
    assert_eq!(
        jp(
            &k,
            "crash",
            "{.status.containerStatuses[0].lastState.terminated.exitCode}"
        ),
        "2"
    );

    // A liveness probe that starts failing restarts the container.
    k.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"live"},"spec":{"nodeName":"skiff-e2e",
            "containers":[{"name":"c","image":"skiff.local/busybox:stable","imagePullPolicy":"Never",
            "command":["sh","-c","touch /tmp/ok; sleep 4; rm /tmp/ok; sleep 3600"],
            "livenessProbe":{"exec":{"command":["test","-f","/tmp/ok"]},"periodSeconds":1,"failureThreshold":2}}]}}"#,
    );
    wait_until("liveness restart", 90, || {
        jp(&k, "live", "{.status.containerStatuses[0].restartCount}")
            .parse::<i32>()
            .is_ok_and(|n| n >= 1)
    });

    // Over its memory limit: OOMKilled.
    k.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"oom"},"spec":{"nodeName":"skiff-e2e",
            "restartPolicy":"Never","containers":[{"name":"c","image":"skiff.local/busybox:stable",
            "imagePullPolicy":"Never","command":["dd","if=/dev/zero","of=/dev/null","bs=64M","count=1"],
            "resources":{"limits":{"memory":"16Mi"}}}]}}"#,
    );
    wait_until("oom pod OOMKilled", 90, || {
        jp(
            &k,
            "oom",
            "{.status.containerStatuses[0].state.terminated.reason}",
        ) == "OOMKilled"
    });
    let row = k27.ok(&["get", "pod", "oom"]);
    assert!(row.contains("OOMKilled"), "{row}");

    // Delete waits for the preStop hook, then the object is gone.
    let started = Instant::now();
    k.ok(&["delete", "pod", "web", "--timeout=60s"]);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "delete returned after {:?}, before the 3 s preStop hook",
        started.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(host.join("prestop")).unwrap_or_default(),
        "done\n",
        "the preStop hook must have run"
    );
    k.ok(&["delete", "pod", "crash", "live", "oom", "--timeout=60s"]);
    assert_eq!(k.ok(&["get", "pods", "-o", "name"]), "");
}

#[test]
fn node_server_restart_keeps_pods_running() {
    let mut server = node_server();
    let k = Kubectl::new(None, &server);
    k.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"keep"},"spec":{"nodeName":"skiff-e2e",
            "containers":[{"name":"c","image":"skiff.local/busybox:stable","imagePullPolicy":"Never",
            "command":["sleep","3600"]}]}}"#,
    );
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/keep",
        "--timeout=120s",
    ]);
    let id = jp(&k, "keep", "{.status.containerStatuses[0].containerID}");
    assert!(id.starts_with("skiff://"), "{id}");
    assert_eq!(
        server.stop().code(),
        Some(0),
        "SIGTERM must stop the server cleanly"
    );
    let dir = server.into_dir();
    let server = Server::start_with_agent(dir, &[]);
    let k = Kubectl::new(Some("1.27"), &server);
    // Give the new kubelet a few syncs, then the same container is still there.
    std::thread::sleep(Duration::from_secs(5));
    k.ok(&["wait", "--for=condition=Ready", "pod/keep", "--timeout=60s"]);
    assert_eq!(
        jp(&k, "keep", "{.status.containerStatuses[0].containerID}"),
        id
    );
    assert_eq!(
        jp(&k, "keep", "{.status.containerStatuses[0].restartCount}"),
        "0"
    );
    assert_eq!(jp(&k, "keep", "{.status.phase}"), "Running");
}
