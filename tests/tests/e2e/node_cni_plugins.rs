//! External CNI plugins end to end: `skiff server --cni-conf-dir --cni-bin-dir` with a conflist
//! using Debian's `bridge` (on skiff's `cni0`, ipMasq off) and `host-local` over the node's pod
//! CIDR. Real kubectl: pods get their IPs from host-local, pod to pod and a busybox pod to an
//! nginx Service by name work, a restarted server re-adopts the pods (CHECK) with the same
//! addresses, deleting a pod releases its lease, and after stop + killall (which DELs the pods still
//! running) nothing of skiff's is left on the host. Named `node_*`: shares `cni0` and `inet skiff`, runs one at a time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use skiff_e2e::{Kubectl, Server, skiff_binary};

use crate::node_pods::{require_root, wait_until};

const BIN_DIR: &str = "/usr/lib/cni";
const NET: &str = "skiff-e2e-cni";

fn require_plugins() {
    for p in ["bridge", "host-local", "loopback"] {
        assert!(
            Path::new(BIN_DIR).join(p).exists(),
            "{BIN_DIR}/{p} missing: apt-get install containernetworking-plugins (make test does)"
        );
    }
}

fn cmd_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn veths() -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "type", "veth"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

fn ip_nat_table() -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "ip", "nat"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// host-local's leases (file names that are addresses) in its data dir.
fn leases(ipam: &Path) -> BTreeSet<String> {
    std::fs::read_dir(ipam.join(NET))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

fn write_conflist(conf_dir: &Path, ipam: &Path) {
    std::fs::create_dir_all(conf_dir).unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NET,
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.42.0.0/24", "gateway": "10.42.0.1"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam.display().to_string(),
            }
        }]
    });
    std::fs::write(conf_dir.join("10-e2e.conflist"), conf.to_string()).unwrap();
}

fn start(dir: tempfile::TempDir, cni: &Path) -> Server {
    let resolv = cni.join("empty-resolv.conf");
    std::fs::write(&resolv, "").unwrap();
    let conf_dir = cni.join("net.d");
    Server::start_with_agent(
        dir,
        &[
            "--resolv-conf",
            resolv.to_str().unwrap(),
            "--cni-conf-dir",
            conf_dir.to_str().unwrap(),
            "--cni-bin-dir",
            BIN_DIR,
        ],
    )
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: nginx
    image: skiff.local/nginx:stable
    imagePullPolicy: Never
    ports: [{containerPort: 80}]
    readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sleep", "3600"]
"#;

/// `wget` from the client pod: (success, output).
fn wget(k: &Kubectl, url: &str) -> (bool, String) {
    let out = k.run(&[
        "exec", "client", "--", "timeout", "5", "wget", "-q", "-O", "-", url,
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

fn wait_nginx(k: &Kubectl, url: &str) {
    let mut last = String::new();
    wait_until(&format!("wget {url} from the client pod"), 40, || {
        let (ok, text) = wget(k, url);
        last = text;
        ok && last.contains("Welcome to nginx")
    });
}

fn pod_ip(k: &Kubectl, pod: &str) -> String {
    k.ok(&["get", "pod", pod, "-o", "jsonpath={.status.podIP}"])
}

#[test]
fn node_cni_plugins_bridge_host_local_pods_services_restart_and_cleanup() {
    require_root();
    require_plugins();
    assert!(
        !cmd_ok("ip", &["link", "show", "cni0"]),
        "cni0 exists before the test (left by another run?)"
    );
    let veths_before = veths();
    let nat_before = ip_nat_table();

    let cni = tempfile::Builder::new()
        .prefix("skiff-cni-e2e-")
        .tempdir_in("/tmp")
        .unwrap();
    let ipam = cni.path().join("ipam");
    write_conflist(&cni.path().join("net.d"), &ipam);
    let dir = tempfile::Builder::new()
        .prefix("skiff-cni-node-")
        .tempdir_in("/tmp")
        .unwrap();
    for image in ["busybox", "nginx"] {
        let tar =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../build/images/{image}.tar"));
        assert!(tar.exists(), "{} missing: run `make images`", tar.display());
        let st = Command::new(skiff_binary())
            .args(["images", "--data-dir"])
            .arg(dir.path())
            .arg("import")
            .arg(&tar)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "skiff images import {image}");
    }
    let server = start(dir, cni.path());
    let k = Kubectl::new(Some("1.33"), &server);
    k.ok_stdin(&["apply", "-f", "-"], PODS);
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/web",
        "pod/client",
        "--timeout=180s",
    ]);

    // Both pods got their addresses from host-local (its leases, in the conflist's dataDir).
    let (web_ip, client_ip) = (pod_ip(&k, "web"), pod_ip(&k, "client"));
    assert_ne!(web_ip, client_ip);
    for ip in [&web_ip, &client_ip] {
        assert!(
            ip.starts_with("10.42.0."),
            "pod IP {ip} not in the pod CIDR"
        );
    }
    let want: BTreeSet<String> = [web_ip.clone(), client_ip.clone()].into();
    assert_eq!(leases(&ipam), want, "host-local leases vs pod IPs");
    // The built-in IPAM allocated nothing.
    let builtin = server.dir.path().join("agent/net");
    let builtin_files: Vec<_> = std::fs::read_dir(&builtin)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !builtin_files
            .iter()
            .any(|n| n.to_string_lossy().contains(&web_ip)),
        "{builtin_files:?}"
    );

    // Pod to pod, and to the nginx Service by name (through the cluster DNS on 10.42.0.1).
    wait_nginx(&k, &format!("http://{web_ip}/"));
    wait_nginx(&k, "http://web");
    wait_nginx(&k, "http://web.default.svc.cluster.local");

    // Restart: the pods are re-adopted (CHECK) and keep their addresses; nothing new leased.
    let dir = server.into_dir();
    let server = start(dir, cni.path());
    let k = Kubectl::new(Some("1.33"), &server);
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/web",
        "pod/client",
        "--timeout=120s",
    ]);
    assert_eq!(pod_ip(&k, "web"), web_ip);
    assert_eq!(pod_ip(&k, "client"), client_ip);
    assert_eq!(leases(&ipam), want, "leases after the restart");
    wait_nginx(&k, "http://web");

    // Deleting a pod runs DEL: its host-local lease goes.
    k.ok(&["delete", "pod", "web", "--wait=true", "--timeout=60s"]);
    let client_only: BTreeSet<String> = [client_ip.clone()].into();
    wait_until("web's host-local lease released", 30, || {
        leases(&ipam) == client_only
    });
    let cache = server.dir.path().join("agent/cni/results");
    let cached = || -> Vec<String> {
        std::fs::read_dir(&cache)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(cached().len(), 1, "CNI result cache: {:?}", cached());

    // Stop (the client pod keeps running) + killall, which DELs it: no lease, no cache, no
    // cni0, no veth of ours, no inet skiff, no ip nat table of the plugins.
    let mut server = server;
    let st = server.stop();
    assert!(st.success(), "skiff server exited with {st}");
    assert_eq!(leases(&ipam), client_only, "the running pod lost its lease");
    let st = Command::new(skiff_binary())
        .arg("killall")
        .arg("--data-dir")
        .arg(server.dir.path())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        leases(&ipam).is_empty(),
        "leases left after killall: {:?}",
        leases(&ipam)
    );
    assert!(cached().is_empty(), "CNI result cache left: {:?}", cached());
    assert!(!cmd_ok("ip", &["link", "show", "cni0"]), "cni0 left");
    let new_veths: Vec<String> = veths().difference(&veths_before).cloned().collect();
    assert!(new_veths.is_empty(), "veths left: {new_veths:?}");
    assert!(
        !cmd_ok("nft", &["list", "table", "inet", "skiff"]),
        "inet skiff left"
    );
    assert_eq!(
        ip_nat_table().is_some(),
        nat_before.is_some(),
        "the plugins left an ip nat table: {:?}",
        ip_nat_table()
    );
}

/// A conf dir with no network, or a plugin that is not there: exit 2 naming the problem.
#[test]
fn node_cni_plugins_bad_config_exits_2() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("net.d");
    std::fs::create_dir_all(&conf).unwrap();
    // (exit code, stderr). stderr goes to a file and the wait is bounded: a server that did
    // not refuse the flags would run on.
    let run = |data: &str, bin: &str| -> (Option<i32>, String) {
        let data = tmp.path().join(data);
        let log = tmp
            .path()
            .join(format!("{}.log", data.display().to_string().len()));
        let mut child = Command::new(skiff_binary())
            .args([
                "server",
                "--https-listen-port",
                "0",
                "--bind-address",
                "127.0.0.1",
                "--kubelet-port",
                "0",
                "--pod-cidr",
                "10.42.0.0/24",
                "--cni-conf-dir",
            ])
            .arg(&conf)
            .args(["--cni-bin-dir", bin, "--data-dir"])
            .arg(&data)
            .env("SKIFF_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        (
            status.code(),
            std::fs::read_to_string(&log).unwrap_or_default(),
        )
    };
    let (code, err) = run("d1", BIN_DIR);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--cni-conf-dir") && err.contains("no *.conf"),
        "{err}"
    );

    std::fs::write(
        conf.join("10-x.conflist"),
        r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    let empty_bin = tmp.path().join("bin");
    std::fs::create_dir_all(&empty_bin).unwrap();
    let (code, err) = run("d2", empty_bin.to_str().unwrap());
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("\"bridge\" not found") && err.contains(empty_bin.to_str().unwrap()),
        "{err}"
    );
}
