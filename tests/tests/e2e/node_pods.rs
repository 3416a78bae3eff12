//! Pods on a real node: `skiff server` with its kubelet, driven by real kubectl 1.27 and 1.33.
//! Pods name the node directly (spec.nodeName). Every test here is named `node_*`: they share
//! the host's `cni0` bridge and run one at a time (.config/nextest.toml).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_e2e::{Kubectl, Server, skiff_binary};

pub(crate) fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "node tests need root (containers, bridge, cgroups): run them as root, as CI does"
    );
}

pub(crate) fn busybox_tar() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/images/busybox.tar");
    assert!(
        p.exists(),
        "{} is missing: run `make images` first (make test does)",
        p.display()
    );
    p
}

/// A server with the node half, the busybox image imported into its data dir.
pub(crate) fn node_server() -> Server {
    node_server_with(&[])
}

/// [`node_server`] with `extra` server flags.
pub(crate) fn node_server_with(extra: &[&str]) -> Server {
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
    Server::start_with_agent(dir, extra)
}

pub(crate) fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
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
    // Ready means the node can run pods: its pod network (the bridge) is set up by then, as a
    // kubelet is NotReady until its CNI network is.
    let bridge = Command::new("ip")
        .args(["link", "show", "cni0"])
        .output()
        .expect("ip link");
    assert!(
        bridge.status.success(),
        "node Ready before its pod network: {}",
        String::from_utf8_lossy(&bridge.stderr)
    );
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

const STREAM_POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"stream"},"spec":{"nodeName":"skiff-e2e",
  "containers":[{"name":"c","image":"skiff.local/busybox:stable","imagePullPolicy":"Never",
  "command":["sh","-c","mkdir -p /www && echo hello-pf > /www/index.html && httpd -p 8080 -h /www && echo started && i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]}]}}"#;

const ATTACH_POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"NAME"},"spec":{"nodeName":"skiff-e2e",
  "restartPolicy":"Never","containers":[{"name":"c","image":"skiff.local/busybox:stable","imagePullPolicy":"Never",
  "stdin":true,"stdinOnce":true,"command":["sh","-c","read line; echo got:$line"]}]}}"#;

/// `kubectl port-forward pod/stream :8080` and one HTTP GET through it; returns the response.
fn http_through_port_forward(k: &Kubectl) -> String {
    use std::io::{Read, Write};
    let (_pf, lines) = k.spawn_lines(&["port-forward", "pod/stream", ":8080"]);
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("kubectl port-forward printed no 'Forwarding from' line");
    // "Forwarding from 127.0.0.1:41234 -> 8080"
    let port: u16 = line
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected port-forward line {line:?}"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp
}

/// logs, exec (stdout, stdin, exit codes), attach, cp and port-forward through the API server
/// to the kubelet, with kubectl 1.27 (SPDY) and 1.33 (WebSocket, the default since 1.31).
#[test]
fn node_kubectl_logs_exec_attach_cp_port_forward() {
    let server = node_server();
    let k33 = Kubectl::new(Some("1.33"), &server);
    let k27 = Kubectl::new(Some("1.27"), &server);
    k33.ok_stdin(&["apply", "-f", "-"], STREAM_POD);
    k33.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/stream",
        "--timeout=120s",
    ]);

    for (v, k) in [("1.27", &k27), ("1.33", &k33)] {
        // logs, --tail, and -f streaming new lines.
        wait_until("the pod logged its first tick", 30, || {
            String::from_utf8_lossy(&k.run(&["logs", "stream"]).stdout).contains("tick 1")
        });
        let all = k.ok(&["logs", "stream"]);
        assert!(
            all.starts_with("started\ntick 0\n"),
            "kubectl {v} logs: {all:?}"
        );
        let tail = k.ok(&["logs", "stream", "--tail=1"]);
        assert_eq!(
            tail.lines().count(),
            1,
            "kubectl {v} logs --tail=1: {tail:?}"
        );
        let (_f, lines) = k.spawn_lines(&["logs", "-f", "--tail=0", "stream"]);
        let next = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("kubectl {v} logs -f streamed nothing in 10 s"));
        assert!(next.starts_with("tick "), "kubectl {v} logs -f: {next:?}");

        // exec: stdout, stdin, and the command's exit code.
        assert_eq!(
            k.ok(&["exec", "stream", "--", "cat", "/www/index.html"]),
            "hello-pf\n",
            "kubectl {v} exec"
        );
        assert_eq!(
            k.ok_stdin(&["exec", "-i", "stream", "--", "cat"], "from stdin\n"),
            "from stdin\n",
            "kubectl {v} exec -i"
        );
        let out = k.run(&["exec", "stream", "--", "sh", "-c", "echo oops >&2; exit 3"]);
        assert_eq!(out.status.code(), Some(3), "kubectl {v} exec exit code");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("oops"), "kubectl {v} exec stderr: {err}");
        let missing = k.fails(&["exec", "stream", "-c", "nope", "--", "true"]);
        assert!(
            missing.contains("nope"),
            "kubectl {v} exec -c nope: {missing}"
        );

        // cp both ways (kubectl cp runs tar in the container).
        let local = server.dir.path().join(format!("cp-in-{v}"));
        std::fs::write(&local, format!("copied by {v}\n")).unwrap();
        k.ok(&[
            "cp",
            &local.display().to_string(),
            &format!("stream:/tmp/cp-{v}"),
        ]);
        assert_eq!(
            k.ok(&["exec", "stream", "--", "cat", &format!("/tmp/cp-{v}")]),
            format!("copied by {v}\n"),
            "kubectl {v} cp into the pod"
        );
        let back = server.dir.path().join(format!("cp-out-{v}"));
        k.ok(&["cp", "stream:/www/index.html", &back.display().to_string()]);
        assert_eq!(std::fs::read_to_string(&back).unwrap(), "hello-pf\n");

        // port-forward to the pod's httpd.
        let resp = http_through_port_forward(k);
        assert!(
            resp.starts_with("HTTP/1.") && resp.contains("hello-pf"),
            "kubectl {v} port-forward response: {resp:?}"
        );

        // attach -i to a container that waits for one line on stdin.
        let name = format!("attach-{}", v.replace('.', "-"));
        k.ok_stdin(&["apply", "-f", "-"], &ATTACH_POD.replace("NAME", &name));
        k.ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=120s",
        ]);
        let out = k.run_stdin(&["attach", "-i", &name], Some("hi\n"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("got:hi"),
            "kubectl {v} attach -i: status {} stdout {stdout:?} stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    k33.ok(&["delete", "pod", "--all", "--timeout=60s"]);
}
