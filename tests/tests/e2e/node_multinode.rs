//! Two nodes on one machine: `skiff server` in one skiff-lab node and `skiff agent` in another,
//! wired by a lab bridge on the host (each with its own network, mount, UTS and PID namespaces
//! and its own temp data dir). The agent joins with the server's `node-token`; real kubectl on
//! the host (through the server's address on the lab bridge) sees both nodes Ready, runs pods
//! pinned to each, and checks pod -> pod across nodes, pod -> Service whose only backend is on
//! the other node, `kubectl logs` and `exec` of a pod on the agent, once with `--network-backend
//! host-gw` and once with `vxlan`. A wrong token and a wrong CA hash stop the agent with exit 2.
//! Everything is removed afterwards, also on failure: the skiff processes are stopped,
//! `skiff killall` runs inside each node, the nodes and the bridge are deleted, and the host is
//! left without a lab bridge, `cni0`, `inet skiff` table or mounts under the temp dirs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use skiff_e2e::{Kubectl, kubectl_path, skiff_binary};
use skiff_lab::{Bridge, Link, Node};

const SERVER_NODE: &str = "mn-server";
const AGENT_NODE: &str = "mn-agent";

fn require_root() {
    assert!(
        nix_is_root(),
        "node tests need root (namespaces, containers, bridge, nftables): run them as root, as CI does"
    );
}

fn nix_is_root() -> bool {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&uid.stdout).trim() == "0"
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

/// Progress on stderr (shown with --no-capture), to see where time goes.
fn step(what: &str) {
    eprintln!(
        "[node_multinode {:?}] {what}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn host_link_exists(name: &str) -> bool {
    quiet_ok(Command::new("ip").args(["link", "show", name]))
}

fn host_skiff_table_exists() -> bool {
    quiet_ok(Command::new("nft").args(["list", "table", "inet", "skiff"]))
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = format!(
        "{}/",
        std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_path_buf())
            .display()
    );
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// One lab node (a `sleep` as PID 1) with a data dir and, once started, a skiff process in it.
struct LabNode {
    node: Node,
    dir: tempfile::TempDir,
    ip: String,
    proc: Option<Child>,
    lines: Option<mpsc::Receiver<String>>,
}

impl LabNode {
    fn new(name: &str, bridge: &Bridge, ip: &str) -> LabNode {
        step(&format!("creating lab node {name}"));
        let mut sleep = Command::new("sleep");
        sleep.arg("infinity");
        let node = Node::builder(name)
            .link(Link::new(bridge.name(), format!("{ip}/24")))
            .spawn(sleep)
            .expect("spawn a lab node");
        let dir = tempfile::Builder::new()
            .prefix("skiff-mn-e2e-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        // Test images go into the node's image store (air-gapped), and an empty resolv.conf
        // gives the cluster DNS no upstream: nothing leaves the machine.
        for image in ["busybox", "nginx"] {
            let tar =
                Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../build/images/{image}.tar"));
            assert!(
                tar.exists(),
                "{} is missing: run `make images` first (make test does)",
                tar.display()
            );
            let st = Command::new(skiff_binary())
                .args(["images", "--data-dir"])
                .arg(dir.path())
                .arg("import")
                .arg(&tar)
                .stdout(Stdio::null())
                .status()
                .expect("skiff images import");
            assert!(st.success(), "skiff images import {image} failed");
        }
        std::fs::write(dir.path().join("resolv.conf"), "").expect("resolv.conf");
        LabNode {
            node,
            dir,
            ip: ip.to_string(),
            proc: None,
            lines: None,
        }
    }

    fn resolv_conf(&self) -> String {
        self.dir.path().join("resolv.conf").display().to_string()
    }

    /// A command that runs inside the node.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args);
        self.node.exec_in(c).expect("enter the lab node")
    }

    /// Starts `skiff <args>` inside the node; stdout lines are collected.
    fn start_skiff(&mut self, args: &[String]) {
        let mut c = Command::new(skiff_binary());
        c.args(args)
            .arg("--data-dir")
            .arg(self.dir.path())
            .env("SKIFF_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = self
            .node
            .exec_in(c)
            .expect("enter the lab node")
            .spawn()
            .expect("start skiff in the lab node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.proc = Some(child);
        self.lines = Some(rx);
    }

    /// Waits for a stdout line containing `needle`; panics when skiff exits first.
    fn wait_line(&mut self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let rx = self.lines.as_ref().expect("skiff started");
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(st) = self.proc.as_mut().and_then(|p| p.try_wait().ok().flatten()) {
                        panic!(
                            "skiff in node {} exited with {st} before printing {needle:?}",
                            self.node.name()
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "skiff in node {} printed no {needle:?} within {secs} s",
                        self.node.name()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.proc.as_mut().and_then(|p| p.wait().ok());
                    panic!(
                        "skiff in node {} ended ({st:?}) before printing {needle:?}",
                        self.node.name()
                    );
                }
            }
        }
    }

    /// SIGTERM (forwarded by the lab supervisor) and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.proc.take().expect("skiff running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "skiff in node {} did not stop within 30 s of SIGTERM",
            self.node.name()
        );
    }

    /// `skiff killall --data-dir` inside the node; true on success.
    fn killall(&self) -> bool {
        let bin = skiff_binary();
        let dir = self.dir.path().display().to_string();
        let mut c = self.cmd(bin, &["killall", "--data-dir", &dir]);
        quiet_ok(&mut c)
    }

    /// `ip <args>` inside the node: (success, stdout).
    fn ip(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .cmd("ip", args)
            .stderr(Stdio::null())
            .output()
            .expect("ip in the lab node");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.proc.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.killall() {
            eprintln!(
                "skiff killall --data-dir {} in node {} failed",
                self.dir.path().display(),
                self.node.name()
            );
        }
        let _ = self.node.stop(Duration::from_secs(1));
    }
}

/// The whole lab: bridge first in, last out.
struct Cluster {
    agent: Option<LabNode>,
    server: Option<LabNode>,
    bridge: Option<Bridge>,
    kubeconfig: PathBuf,
    token: String,
    url: String,
    _kube_dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.agent.take());
        drop(self.server.take());
        drop(self.bridge.take());
    }
}

/// A /24 for the lab bridge that differs between concurrent runs.
fn lab_prefix() -> String {
    format!("10.231.{}", std::process::id() % 200 + 20)
}

fn start_server(bridge: &Bridge, prefix: &str, backend: &str) -> (LabNode, String, String) {
    let mut server = LabNode::new("mn-server", bridge, &format!("{prefix}.10"));
    let ip = server.ip.clone();
    let resolv = server.resolv_conf();
    let args: Vec<String> = [
        "server",
        "--node-name",
        SERVER_NODE,
        "--node-ip",
        &ip,
        "--tls-san",
        &ip,
        "--https-listen-port",
        "6443",
        "--network-backend",
        backend,
        "--resolv-conf",
        &resolv,
        // The build machine's disk is over the image GC threshold: keep the test images.
        "--kubelet-arg",
        "image-gc-high-threshold=100",
        "--kubelet-arg",
        skiff_e2e::TEST_EVICTION_HARD,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    server.start_skiff(&args);
    server.wait_line("ready", 120);
    let token = std::fs::read_to_string(server.dir.path().join("server/node-token"))
        .expect("the server writes <data-dir>/server/node-token")
        .trim()
        .to_string();
    assert!(
        token.starts_with("K10") && token.contains("::server:"),
        "node-token {token:?}"
    );
    (server, format!("https://{ip}:6443"), token)
}

fn agent_args(url: &str, token: &str, ip: &str, backend: &str, resolv: &str) -> Vec<String> {
    [
        "agent",
        "--server",
        url,
        "--token",
        token,
        "--node-name",
        AGENT_NODE,
        "--node-ip",
        ip,
        "--network-backend",
        backend,
        "--resolv-conf",
        resolv,
        "--kubelet-arg",
        "image-gc-high-threshold=100",
        "--kubelet-arg",
        skiff_e2e::TEST_EVICTION_HARD,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn cluster(backend: &str) -> Cluster {
    require_root();
    let prefix = lab_prefix();
    let bridge = Bridge::create(&skiff_lab::unique_name("skmn"), &format!("{prefix}.1/24"))
        .expect("create the lab bridge");
    let mut c = Cluster {
        agent: None,
        server: None,
        bridge: None,
        kubeconfig: PathBuf::new(),
        token: String::new(),
        url: String::new(),
        _kube_dir: tempfile::tempdir().expect("tempdir"),
    };
    let (server, url, token) = start_server(&bridge, &prefix, backend);
    // The admin kubeconfig names 127.0.0.1 (the server's own loopback); from the host the
    // server is its address on the lab bridge.
    let kc =
        std::fs::read_to_string(server.dir.path().join("kubeconfig.yaml")).expect("kubeconfig");
    let kc = kc.replace("server: https://127.0.0.1:6443", &format!("server: {url}"));
    assert!(
        kc.contains(&url),
        "kubeconfig does not name 127.0.0.1:6443: {kc}"
    );
    c.kubeconfig = c._kube_dir.path().join("kubeconfig.yaml");
    std::fs::write(&c.kubeconfig, kc).expect("write kubeconfig");
    c.server = Some(server);
    c.bridge = Some(bridge);

    let bridge = c.bridge.as_ref().expect("bridge");
    let mut agent = LabNode::new("mn-agent", bridge, &format!("{prefix}.11"));
    let args = agent_args(
        &url,
        &token,
        &agent.ip.clone(),
        backend,
        &agent.resolv_conf(),
    );
    agent.start_skiff(&args);
    agent.wait_line("agent ready", 120);
    c.agent = Some(agent);
    c.token = token;
    c.url = url;
    c
}

fn kubectl(c: &Cluster) -> Kubectl {
    Kubectl {
        bin: kubectl_path(Some("1.33")),
        kubeconfig: c.kubeconfig.clone(),
    }
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-agent, labels: {app: web-agent}}
spec:
  nodeName: mn-agent
  terminationGracePeriodSeconds: 1
  containers:
  - name: nginx
    image: skiff.local/nginx:stable
    imagePullPolicy: Never
    ports: [{containerPort: 80}]
    readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-server, labels: {app: web-server}}
spec:
  nodeSelector: {kubernetes.io/hostname: mn-server}
  terminationGracePeriodSeconds: 1
  containers:
  - name: nginx
    image: skiff.local/nginx:stable
    imagePullPolicy: Never
    ports: [{containerPort: 80}]
    readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: client-server}
spec:
  nodeName: mn-server
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: client-agent}
spec:
  nodeSelector: {kubernetes.io/hostname: mn-agent}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sh", "-c", "echo hello-from-the-agent; exec sleep 3600"]
---
apiVersion: v1
kind: Service
metadata: {name: web-agent}
spec:
  selector: {app: web-agent}
  ports: [{port: 80, targetPort: 80}]
"#;

/// `kubectl exec <pod> -- timeout 5 wget -q -O - <url>`: (success, output).
fn wget(k: &Kubectl, pod: &str, url: &str) -> (bool, String) {
    let out = k.run(&[
        "exec", pod, "--", "timeout", "5", "wget", "-q", "-O", "-", url,
    ]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn wget_ok(c: &Cluster, k: &Kubectl, pod: &str, url: &str, what: &str) {
    let mut last = String::new();
    // Routes are programmed from the node watch as soon as its first list is done: well within
    // 15 s of the pods being Ready (waiting for the overlay's 30 s resync would fail here).
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let (ok, text) = wget(k, pod, url);
        if ok && text.contains("Welcome to nginx") {
            return;
        }
        last = text;
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!(
        "{what}: wget {url} from {pod} failed for 15 s; last output: {last}\n{}",
        c.diagnostics()
    );
}

impl Cluster {
    /// Links, addresses, routes and neighbours of both nodes, for failure messages.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for n in [self.server.as_ref(), self.agent.as_ref()]
            .into_iter()
            .flatten()
        {
            for args in [
                &["-br", "addr"][..],
                &["-4", "route"][..],
                &["-4", "neigh"][..],
                &["-d", "link", "show", "skiff.1"][..],
            ] {
                let (_, text) = n.ip(args);
                out.push_str(&format!(
                    "--- {} ip {}\n{text}",
                    n.node.name(),
                    args.join(" ")
                ));
            }
        }
        out
    }
}

fn pod_ip(k: &Kubectl, pod: &str) -> String {
    k.ok(&["get", "pod", pod, "-o", "jsonpath={.status.podIP}"])
}

fn node_pod_cidr(k: &Kubectl, node: &str) -> String {
    k.ok(&["get", "node", node, "-o", "jsonpath={.spec.podCIDR}"])
}

fn run_backend(backend: &str) {
    let mut c = cluster(backend);
    let k = kubectl(&c);

    // Both nodes Ready; only the server is a control-plane node.
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        &format!("node/{SERVER_NODE}"),
        &format!("node/{AGENT_NODE}"),
        "--timeout=120s",
    ]);
    let nodes = k.ok(&["get", "nodes", "--no-headers"]);
    assert_eq!(nodes.lines().count(), 2, "{nodes}");
    let cp = k.ok(&[
        "get",
        "nodes",
        "-l",
        "node-role.kubernetes.io/control-plane",
        "-o",
        "name",
    ]);
    assert_eq!(cp.trim(), format!("node/{SERVER_NODE}"));
    let agent_ip = k.ok(&[
        "get",
        "node",
        AGENT_NODE,
        "-o",
        "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
    ]);
    assert_eq!(
        agent_ip,
        c.agent.as_ref().map(|a| a.ip.clone()).unwrap_or_default()
    );
    let server_cidr = node_pod_cidr(&k, SERVER_NODE);
    let agent_cidr = node_pod_cidr(&k, AGENT_NODE);
    assert!(!server_cidr.is_empty() && !agent_cidr.is_empty() && server_cidr != agent_cidr);

    // The backend is published the way flannel does it.
    wait_until("the agent publishes its backend annotations", 30, || {
        k.ok(&[
            "get",
            "node",
            AGENT_NODE,
            "-o",
            "jsonpath={.metadata.annotations.flannel\\.alpha\\.coreos\\.com/backend-type}",
        ]) == backend
    });
    if backend == "vxlan" {
        let data = k.ok(&[
            "get",
            "node",
            AGENT_NODE,
            "-o",
            "jsonpath={.metadata.annotations.flannel\\.alpha\\.coreos\\.com/backend-data}",
        ]);
        assert!(data.contains("VtepMAC"), "backend-data {data:?}");
    }

    k.ok_stdin(&["apply", "-f", "-"], PODS);
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/web-agent",
        "pod/web-server",
        "pod/client-server",
        "pod/client-agent",
        "--timeout=180s",
    ]);
    for (pod, node) in [
        ("web-agent", AGENT_NODE),
        ("client-agent", AGENT_NODE),
        ("web-server", SERVER_NODE),
        ("client-server", SERVER_NODE),
    ] {
        let on = k.ok(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"]);
        assert_eq!(on, node, "pod {pod}");
    }

    // Pod -> pod across nodes, both ways (exec into the agent's pod goes through its kubelet).
    let agent_web = pod_ip(&k, "web-agent");
    let server_web = pod_ip(&k, "web-server");
    assert!(
        agent_web.starts_with(agent_cidr.trim_end_matches("0/24")),
        "web-agent {agent_web} not in {agent_cidr}"
    );
    wget_ok(
        &c,
        &k,
        "client-server",
        &format!("http://{agent_web}"),
        "server pod -> agent pod",
    );
    wget_ok(
        &c,
        &k,
        "client-agent",
        &format!("http://{server_web}"),
        "agent pod -> server pod",
    );

    // Pod -> Service whose only backend is on the other node.
    let vip = k.ok(&[
        "get",
        "svc",
        "web-agent",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    wget_ok(
        &c,
        &k,
        "client-server",
        &format!("http://{vip}"),
        "server pod -> ClusterIP (backend on the agent)",
    );

    // Logs of a pod on the agent, through the API server and the agent's kubelet.
    let logs = k.ok(&["logs", "client-agent"]);
    assert!(
        logs.contains("hello-from-the-agent"),
        "kubectl logs: {logs:?}"
    );

    // The agent programmed the route to the server's pod CIDR.
    let agent = c.agent.as_ref().expect("agent");
    let (_, routes) = agent.ip(&["-4", "route", "show", &server_cidr]);
    assert!(
        !routes.trim().is_empty(),
        "no route to {server_cidr} on the agent"
    );
    match backend {
        "host-gw" => {
            let server_ip = c.server.as_ref().map(|s| s.ip.clone()).unwrap_or_default();
            assert!(routes.contains(&format!("via {server_ip}")), "{routes}");
        }
        _ => assert!(routes.contains("skiff.1"), "{routes}"),
    }

    // A clean stop of the agent removes what its overlay created; killall the rest.
    k.ok(&[
        "delete",
        "pod",
        "client-agent",
        "web-agent",
        "--wait=true",
        "--timeout=60s",
    ]);
    let agent = c.agent.as_mut().expect("agent");
    let st = agent.stop();
    assert!(st.success(), "skiff agent exited with {st}");
    let (_, routes) = agent.ip(&["-4", "route", "show", &server_cidr]);
    assert!(
        routes.trim().is_empty(),
        "route left after the agent stopped: {routes}"
    );
    let (exists, _) = agent.ip(&["link", "show", "skiff.1"]);
    assert!(!exists, "skiff.1 left after the agent stopped");
    assert!(agent.killall(), "skiff killall in the agent node failed");
    let (cni0, _) = agent.ip(&["link", "show", "cni0"]);
    assert!(!cni0, "cni0 left in the agent node after killall");

    // The server still routes to the stopped agent's pods (its Node exists); deleting the
    // Node removes the server's entries for it.
    let server_has_route = |c: &Cluster| {
        let (_, r) = c
            .server
            .as_ref()
            .expect("server")
            .ip(&["-4", "route", "show", &agent_cidr]);
        !r.trim().is_empty()
    };
    assert!(
        server_has_route(&c),
        "the server lost its route to {agent_cidr} early"
    );
    k.ok(&["delete", "node", AGENT_NODE, "--wait=true", "--timeout=60s"]);
    wait_until(
        "the server removes its route to the deleted node's pods",
        30,
        || !server_has_route(&c),
    );
    if backend == "vxlan" {
        let (_, neigh) = c
            .server
            .as_ref()
            .expect("server")
            .ip(&["neigh", "show", "dev", "skiff.1"]);
        assert!(
            neigh.trim().is_empty(),
            "vxlan neighbours left on the server: {neigh}"
        );
    }

    // A restart reuses the stored credentials (no second join is needed).
    let agent = c.agent.as_mut().expect("agent");
    let tls = agent.dir.path().join("agent/tls/node.crt");
    let before = std::fs::read(&tls).expect("agent/tls/node.crt");
    let args = agent_args(
        &c.url,
        &c.token,
        &agent.ip.clone(),
        backend,
        &agent.resolv_conf(),
    );
    agent.start_skiff(&args);
    agent.wait_line("agent ready", 120);
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        &format!("node/{AGENT_NODE}"),
        "--timeout=120s",
    ]);
    let agent_cidr = node_pod_cidr(&k, AGENT_NODE);
    wait_until(
        "the server routes to the re-registered node's pods",
        60,
        || {
            server_has_route(&c) || {
                let (_, r) =
                    c.server
                        .as_ref()
                        .expect("server")
                        .ip(&["-4", "route", "show", &agent_cidr]);
                !r.trim().is_empty()
            }
        },
    );
    let agent = c.agent.as_mut().expect("agent");
    assert_eq!(
        before,
        std::fs::read(&tls).expect("node.crt"),
        "credentials were re-issued on restart"
    );
    let st = agent.stop();
    assert!(st.success(), "skiff agent exited with {st}");

    let server = c.server.as_mut().expect("server");
    k.ok(&[
        "delete",
        "pod",
        "client-server",
        "web-server",
        "--wait=true",
        "--timeout=60s",
    ]);
    let st = server.stop();
    assert!(st.success(), "skiff server exited with {st}");

    let dirs: Vec<PathBuf> = [c.server.as_ref(), c.agent.as_ref()]
        .into_iter()
        .flatten()
        .map(|n| n.dir.path().to_path_buf())
        .collect();
    let bridge = c
        .bridge
        .as_ref()
        .map(|b| b.name().to_string())
        .unwrap_or_default();
    drop(c);
    assert!(
        !host_link_exists(&bridge),
        "lab bridge {bridge} left on the host"
    );
    assert!(!host_link_exists("cni0"), "cni0 on the host");
    assert!(!host_link_exists("skiff.1"), "skiff.1 on the host");
    assert!(!host_skiff_table_exists(), "inet skiff on the host");
    for d in dirs {
        let left = mounts_under(&d);
        assert!(
            left.is_empty(),
            "mounts left under {}: {left:?}",
            d.display()
        );
    }
}

#[test]
fn node_multinode_host_gw() {
    run_backend("host-gw");
}

#[test]
fn node_multinode_vxlan() {
    run_backend("vxlan");
}

/// A token with another CA's hash, and a wrong secret, stop the agent with exit 2 and a message
/// that says what to do; a bare secret joins (with a warning).
#[test]
fn node_multinode_join_errors() {
    require_root();
    let prefix = lab_prefix();
    let bridge = Bridge::create(&skiff_lab::unique_name("skmn"), &format!("{prefix}.1/24"))
        .expect("create the lab bridge");
    let (server, url, token) = start_server(&bridge, &prefix, "none");
    let agent = LabNode::new("mn-agent", &bridge, &format!("{prefix}.11"));
    let run_agent = |token: &str| {
        let args = agent_args(&url, token, &agent.ip, "none", &agent.resolv_conf());
        let mut c = Command::new(skiff_binary());
        c.args(&args)
            .arg("--data-dir")
            .arg(agent.dir.path())
            .env("SKIFF_LOG", "error");
        let out = agent
            .node
            .exec_in(c)
            .expect("enter the lab node")
            .output()
            .expect("skiff agent");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let secret = token
        .rsplit("::server:")
        .next()
        .unwrap_or_default()
        .to_string();
    let wrong_ca = format!("K10{}::server:{secret}", "0".repeat(64));
    step("server up");
    let (code, err) = run_agent(&wrong_ca);
    step("wrong CA done");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not match the CA hash"), "{err}");
    let wrong_secret = format!(
        "{}::server:nope",
        token.split("::").next().unwrap_or_default()
    );
    let (code, err) = run_agent(&wrong_secret);
    step("wrong secret done");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("refused the token"), "{err}");
    assert!(
        !err.contains(&secret),
        "the secret leaked into the message: {err}"
    );
    // Unreachable server: a port nobody listens on.
    let args = agent_args(
        &url.replace(":6443", ":6999"),
        &token,
        &agent.ip,
        "none",
        &agent.resolv_conf(),
    );
    let mut c = Command::new(skiff_binary());
    c.args(&args).arg("--data-dir").arg(agent.dir.path());
    let out = agent
        .node
        .exec_in(c)
        .expect("enter")
        .output()
        .expect("skiff agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot reach the server"), "{err}");
    assert!(
        !agent.dir.path().join("agent/tls/node.crt").exists(),
        "credentials stored after a failed join"
    );
    step("unreachable done");
    drop(agent);
    step("agent dropped");
    drop(server);
    step("server dropped");
    drop(bridge);
}
