//! `skiff server --container-runtime-endpoint` against Debian's real containerd, driven with
//! real kubectl: containerd (its own root, state and socket in a temp dir; its CRI CNI
//! `conf_dir` is skiff's `<data-dir>/agent/etc/cni/net.d`, `bin_dir` Debian's /usr/lib/cni)
//! runs the pods, calls CNI with the conflist skiff writes, and serves exec/attach/port-forward
//! from its streaming server, to which skiff's kubelet forwards kubectl's upgrade requests.
//! Named `node_*`: it uses the host's `cni0` bridge and runs alone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skiff_e2e::{Kubectl, Server};
use skiff_runtime::{CriRuntime, Runtime};

/// The sandbox ("pause") image: busybox whose command sleeps forever, built by the test.
const PAUSE: &str = "skiff.local/pause:e2e";

fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "node tests need root (containerd, bridge, cgroups): run them as root, as CI does"
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

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_file(p: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(p));
    out.split_whitespace().next().unwrap().to_string()
}

/// An OCI-layout tarball of the busybox image under the name [`PAUSE`], whose command sleeps
/// forever (containerd runs the sandbox image's command as the pod's pause process).
fn pause_tar(work: &Path) -> PathBuf {
    let d = work.join("pause-oci");
    std::fs::create_dir_all(&d).unwrap();
    sh(Command::new("tar")
        .arg("-xf")
        .arg(busybox_tar())
        .arg("-C")
        .arg(&d));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| d.join("blobs/sha256").join(&digest[7..]);
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&mdigest)).unwrap()).unwrap();
    let cdigest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&cdigest)).unwrap()).unwrap();
    config["config"]["Cmd"] = serde_json::json!(["sleep", "2147483647"]);
    let write_blob = |bytes: Vec<u8>| -> (String, usize) {
        let tmp = d.join("blob.tmp");
        std::fs::write(&tmp, &bytes).unwrap();
        let h = sha256_file(&tmp);
        std::fs::rename(&tmp, d.join("blobs/sha256").join(&h)).unwrap();
        (format!("sha256:{h}"), bytes.len())
    };
    let (cd, cs) = write_blob(serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    let (md, ms) = write_blob(serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": PAUSE, "io.containerd.image.name": PAUSE},
        }],
    });
    std::fs::write(d.join("index.json"), index.to_string()).unwrap();
    let tar = work.join("pause.tar");
    sh(Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&d)
        .arg("."));
    tar
}

/// Every process whose command line mentions `needle` (containerd's shims name its socket).
fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) && pid != std::process::id() as i32 {
            out.push(pid);
        }
    }
    out
}

/// Mount points under `prefix`, deepest first.
fn mounts_under(prefix: &Path) -> Vec<String> {
    let prefix = format!("{}/", prefix.display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut ours: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
    ours
}

/// containerd's `k8s.io` cgroup parents.
fn k8s_io_cgroups() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("/sys/fs/cgroup/k8s.io")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            out.push(e.path().join("k8s.io"));
        }
    }
    out.into_iter().filter(|p| p.is_dir()).collect()
}

/// Debian's containerd with its own root, state and socket in a temp dir, its CRI CNI config
/// dir pointed at skiff's; on drop it removes every sandbox through CRI, stops, and removes
/// its shims, mounts and new cgroup parents.
struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    before_cgroups: Vec<PathBuf>,
    /// Whether the host had an `ip nat` table before: the CNI bridge plugin's ipMasq (through
    /// iptables) makes one and CNI DEL leaves it behind, empty.
    had_ip_nat: bool,
}

/// The host's `ip nat` table as `nft` lists it (None: there is none).
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

impl Containerd {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn start(cni_conf_dir: &Path) -> Containerd {
        assert!(
            Path::new("/usr/bin/containerd").exists() && Path::new("/usr/lib/cni/bridge").exists(),
            "Debian's containerd and containernetworking-plugins must be installed (make deps)"
        );
        let before_cgroups = k8s_io_cgroups();
        let dir = tempfile::Builder::new()
            .prefix("skiff-ctd-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        std::fs::create_dir_all(cni_conf_dir).unwrap();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".cni]
  conf_dir = "{cni}"
  bin_dir = "/usr/lib/cni"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            cni = cni_conf_dir.display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            dir,
            child: Some(child),
            before_cgroups,
            had_ip_nat: ip_nat_table().is_some(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not create its socket; log:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The images go in before any sandbox exists, so containerd never tries to pull.
        c.ctr(&["images", "import"], Some(&busybox_tar()));
        let pause = pause_tar(c.dir.path());
        c.ctr(&["images", "import"], Some(&pause));
        c
    }

    fn ctr(&self, args: &[&str], file: Option<&Path>) -> String {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg("k8s.io")
            .args(args);
        if let Some(f) = file {
            cmd.arg(f);
        }
        sh(&mut cmd)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Every sandbox containerd runs (skiff's or not), through CRI.
    fn remove_all_sandboxes(endpoint: String) {
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(cri) = CriRuntime::connect(&endpoint).await {
                    for s in cri.list_sandboxes().await.unwrap_or_default() {
                        let _ = cri.stop_sandbox(&s.id, Duration::ZERO).await;
                        let _ = cri.remove_sandbox(&s.id).await;
                    }
                }
            });
        })
        .join();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        Self::remove_all_sandboxes(self.endpoint());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in pids_mentioning(&self.socket().display().to_string()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        for m in mounts_under(self.dir.path()) {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        for cg in k8s_io_cgroups() {
            if !self.before_cgroups.contains(&cg) {
                let _ = std::fs::remove_dir(&cg);
            }
        }
        // Only an `ip nat` table this test made and that holds nothing but empty chains.
        if !self.had_ip_nat
            && let Some(t) = ip_nat_table()
            && t.lines().all(|l| {
                let l = l.trim();
                l.is_empty()
                    || l.starts_with("table")
                    || l.starts_with("chain")
                    || l.starts_with("type")
                    || l == "}"
            })
        {
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", "nat"])
                .status();
        }
    }
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

const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"crib"},"spec":{"nodeName":"skiff-e2e",
  "terminationGracePeriodSeconds":2,
  "containers":[{"name":"c","image":"skiff.local/busybox:stable","imagePullPolicy":"Never",
  "command":["sh","-c","mkdir -p /www && echo hello-cri > /www/index.html && httpd -p 8080 -h /www && echo started && i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]}]}}"#;

/// `kubectl port-forward pod/crib :8080` and one HTTP GET through it; returns the response.
fn http_through_port_forward(k: &Kubectl) -> String {
    use std::io::{Read, Write};
    let (_pf, lines) = k.spawn_lines(&["port-forward", "pod/crib", ":8080"]);
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("kubectl port-forward printed no 'Forwarding from' line");
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

fn host_has_cni0() -> bool {
    Command::new("ip")
        .args(["link", "show", "cni0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn host_has_skiff_table() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", "skiff"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn node_cri_server_runs_pods_through_containerd() {
    require_root();
    let t0 = Instant::now();
    let data = tempfile::Builder::new()
        .prefix("skiff-cri-e2e-")
        .tempdir_in("/tmp")
        .unwrap();
    let data_path = data.path().to_path_buf();
    let conf_dir = data_path.join("agent/etc/cni/net.d");
    // Declared first, dropped last: the server's killall still reaches containerd.
    let ctd = Containerd::start(&conf_dir);
    let had_ip_nat = ctd.had_ip_nat;
    eprintln!("node_cri: containerd up after {:?}", t0.elapsed());
    let ctd_dir = ctd.dir.path().to_path_buf();
    let ctd_sock = ctd.socket().display().to_string();
    let endpoint = ctd.endpoint();
    let server = Server::start_with_agent(data, &["--container-runtime-endpoint", &endpoint]);
    let k33 = Kubectl::new(Some("1.33"), &server);
    let k27 = Kubectl::new(Some("1.27"), &server);
    eprintln!("node_cri: containerd and skiff up after {:?}", t0.elapsed());

    // The node reports containerd as its runtime.
    wait_until("node skiff-e2e Ready", 60, || {
        k33.run(&[
            "get",
            "node",
            "skiff-e2e",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .stdout
            == b"True"
    });
    let rt = k33.ok(&[
        "get",
        "node",
        "skiff-e2e",
        "-o",
        "jsonpath={.status.nodeInfo.containerRuntimeVersion}",
    ]);
    assert!(rt.starts_with("containerd://1."), "{rt}");
    let wide = k27.ok(&["get", "node", "-o", "wide"]);
    assert!(wide.contains("containerd://"), "{wide}");

    // skiff wrote the conflist containerd reads.
    let conflist = std::fs::read_to_string(conf_dir.join("10-skiff.conflist")).unwrap();
    assert!(
        conflist.contains("\"10.42.0.0/24\"") && conflist.contains("\"cni0\""),
        "{conflist}"
    );

    // A pod runs in containerd with an address of the node's pod CIDR (from containerd's CNI).
    k33.ok_stdin(&["apply", "-f", "-"], POD);
    let ready = k33.run(&[
        "wait",
        "--for=condition=Ready",
        "pod/crib",
        "--timeout=120s",
    ]);
    assert!(
        ready.status.success(),
        "pod not Ready: {}\n{}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&ready.stderr),
        k33.ok(&["describe", "pod", "crib"]),
        ctd.log()
    );
    let ip = k33.ok(&["get", "pod", "crib", "-o", "jsonpath={.status.podIP}"]);
    assert!(
        ip.starts_with("10.42.0.") && ip != "10.42.0.1",
        "pod IP {ip:?}"
    );
    let sandboxes = ctd.ctr(&["containers", "ls", "-q"], None);
    assert!(
        sandboxes.lines().count() >= 2,
        "containerd runs the sandbox and the container: {sandboxes:?}"
    );
    // The pod is reachable from the host over cni0 (once its httpd started).
    let url = format!("http://{ip}:8080/index.html");
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "-m", "5"])
            .arg(&url)
            .output()
            .unwrap();
        if o.stdout == b"hello-cri\n" {
            break;
        }
        last = format!(
            "{}: {:?} {:?}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            Instant::now() < deadline,
            "the pod's httpd at {url} does not answer over cni0: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = last;
    eprintln!("node_cri: pod running after {:?}", t0.elapsed());

    for (v, k) in [("1.27", &k27), ("1.33", &k33)] {
        // logs from containerd's CRI log file.
        wait_until("the pod logged its first tick", 30, || {
            String::from_utf8_lossy(&k.run(&["logs", "crib"]).stdout).contains("tick 1")
        });
        let all = k.ok(&["logs", "crib"]);
        assert!(
            all.starts_with("started\ntick 0\n"),
            "kubectl {v} logs: {all:?}"
        );

        // exec through containerd's streaming server.
        let out = k.run(&["exec", "crib", "--", "cat", "/etc/hostname"]);
        assert!(
            out.status.success(),
            "kubectl {v} exec: {}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            ctd.log()
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "crib\n",
            "kubectl {v} exec"
        );
        assert_eq!(
            k.ok_stdin(&["exec", "-i", "crib", "--", "cat"], "from stdin\n"),
            "from stdin\n",
            "kubectl {v} exec -i"
        );
        let out = k.run(&["exec", "crib", "--", "sh", "-c", "echo oops >&2; exit 3"]);
        assert_eq!(out.status.code(), Some(3), "kubectl {v} exec exit code");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("oops"),
            "kubectl {v} exec stderr"
        );

        // port-forward to the pod's httpd through containerd.
        let resp = http_through_port_forward(k);
        assert!(
            resp.starts_with("HTTP/1.") && resp.contains("hello-cri"),
            "kubectl {v} port-forward response: {resp:?}"
        );
    }

    eprintln!("node_cri: streams checked after {:?}", t0.elapsed());

    // Deleting the pod removes its containerd sandbox.
    k33.ok(&["delete", "pod", "crib", "--timeout=60s"]);
    wait_until("containerd has no containers left", 30, || {
        ctd.ctr(&["containers", "ls", "-q"], None).trim().is_empty()
    });

    // Afterwards nothing is left on the host.
    drop(server);
    drop(ctd);
    assert!(
        pids_mentioning(&ctd_sock).is_empty(),
        "containerd or its shims still run"
    );
    assert!(
        pids_mentioning(&data_path.display().to_string()).is_empty(),
        "skiff still runs"
    );
    assert!(!host_has_cni0(), "cni0 is left");
    assert!(!host_has_skiff_table(), "the inet skiff table is left");
    if !had_ip_nat {
        assert!(
            ip_nat_table().is_none(),
            "the CNI plugins' ip nat table is left"
        );
    }
    assert!(mounts_under(&data_path).is_empty(), "mounts left");
    assert!(mounts_under(&ctd_dir).is_empty(), "mounts left");
}

#[test]
fn node_cri_unreachable_runtime_exits_2_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(skiff_e2e::skiff_binary())
        .args([
            "server",
            "--https-listen-port",
            "0",
            "--bind-address",
            "127.0.0.1",
            "--kubelet-port",
            "0",
            "--node-name",
            "skiff-e2e",
            "--pod-cidr",
            "10.42.0.0/24",
            "--container-runtime-endpoint",
        ])
        .arg(format!("unix://{}/none.sock", dir.path().display()))
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .env("SKIFF_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("skiff server kept running with an unreachable runtime");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--container-runtime-endpoint") && err.contains("start the runtime"),
        "{err}"
    );
}
