//! The CRI client against Debian's real containerd (its CRI plugin), started per test in a temp
//! dir with its own socket. Pod networks come from Debian's CNI `ptp` plugin (a veth and a host
//! route per pod, no bridge) with host-local IPAM kept in the temp dir; CNI DEL removes them.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{E, busybox_layer, layer_tar, require_root, sha};
use skiff_runtime::{
    ContainerConfig, ContainerState, CriRuntime, Runtime, SandboxConfig, StreamRequest,
};

const BUSYBOX: &str = "skiff.local/cri-busybox:test";
const PAUSE: &str = "skiff.local/cri-pause:test";

/// An OCI-layout tarball with one uncompressed layer whose config names the correct diff id
/// (containerd checks it) and runs `cmd`.
fn image_tar(name: &str, layer: &[u8], cmd: &[&str]) -> Vec<u8> {
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": skiff_runtime::store::host_arch().0,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha(layer)]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&cfg), "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer), "size": layer.len()}],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": name, "io.containerd.image.name": name}}],
    }))
    .unwrap();
    let mut es = vec![
        E::File(
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            0o644,
        ),
        E::File("index.json".into(), index, 0o644),
        E::Dir("blobs/", 0o755),
        E::Dir("blobs/sha256/", 0o755),
    ];
    for b in [&cfg, &manifest, &layer.to_vec()] {
        es.push(E::File(
            format!("blobs/sha256/{}", &sha(b)[7..]),
            b.clone(),
            0o644,
        ));
    }
    layer_tar(&es)
}

/// A containerd with its own root, state and socket; everything it made is removed on drop.
struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `k8s.io` cgroup directories (containerd's namespace parent) that did not exist before.
    new_cgroups: Vec<PathBuf>,
}

/// containerd puts its containers under a `k8s.io` cgroup in every hierarchy (or the unified
/// one) and leaves that parent behind when they are gone.
fn k8s_io_cgroups() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("/sys/fs/cgroup/k8s.io")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            out.push(e.path().join("k8s.io"));
        }
    }
    out.into_iter().filter(|p| p.is_dir()).collect()
}

impl Containerd {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn start() -> Containerd {
        require_root();
        assert!(
            Path::new("/usr/bin/containerd").exists(),
            "Debian's containerd must be installed (make deps)"
        );
        let before = k8s_io_cgroups();
        let dir = tempfile::Builder::new().prefix("skcri").tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("cni")).unwrap();
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
  # This machine's root lacks CAP_SYS_RESOURCE, so the pause container's oom_score_adj of
  # -998 would be refused; clamp it to containerd's own value.
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".cni]
  conf_dir = "{cni}"
  bin_dir = "/usr/lib/cni"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            cni = d.join("cni").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        assert!(
            Path::new("/usr/lib/cni/ptp").exists(),
            "Debian's containernetworking-plugins must be installed (make deps)"
        );
        // A random /24 in 10.250.0.0/16 so parallel runs do not collide.
        let third = std::process::id() % 250 + 1;
        let net = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": format!("skcri{third}"),
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": format!("10.250.{third}.0/24"),
                    "dataDir": d.join("ipam").display().to_string(),
                },
            }],
        });
        std::fs::write(d.join("cni").join("10-test.conflist"), net.to_string()).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut c = Containerd {
            dir,
            child: Some(child),
            new_cgroups: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not create its socket; log:\n{}",
                std::fs::read_to_string(c.dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Import the test images before any sandbox exists, so containerd never tries to pull
        // the sandbox image from the network.
        let layer = busybox_layer();
        for (name, cmd) in [(BUSYBOX, vec!["sh"]), (PAUSE, vec!["sleep", "2147483647"])] {
            let tar = c
                .dir
                .path()
                .join(format!("{}.tar", &sha(name.as_bytes())[7..15]));
            std::fs::write(&tar, image_tar(name, &layer, &cmd)).unwrap();
            c.ctr(&["images", "import", "--no-unpack=false"], Some(&tar));
        }
        // Whatever k8s.io cgroup appears later is this containerd's.
        c.new_cgroups = [
            "blkio",
            "cpu",
            "cpuacct",
            "cpuset",
            "devices",
            "freezer",
            "hugetlb",
            "memory",
            "net_cls",
            "net_prio",
            "perf_event",
            "pids",
            "rdma",
            "misc",
            "systemd",
            "unified",
        ]
        .iter()
        .map(|h| PathBuf::from("/sys/fs/cgroup").join(h).join("k8s.io"))
        .chain(std::iter::once(PathBuf::from("/sys/fs/cgroup/k8s.io")))
        .filter(|p| !before.contains(p))
        .collect();
        c
    }

    fn ctr(&self, args: &[&str], file: Option<&Path>) {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg("k8s.io")
            .args(args);
        if let Some(f) = file {
            cmd.arg(f);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Remove every sandbox and container through CRI, so containerd deletes their tasks,
        // cgroups and mounts itself.
        let endpoint = self.endpoint();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(cri) = CriRuntime::connect(&endpoint).await {
                    for c in cri.list_containers().await.unwrap_or_default() {
                        let _ = cri.stop_container(&c.id, Duration::ZERO).await;
                        let _ = cri.remove_container(&c.id).await;
                    }
                    for s in cri.list_sandboxes().await.unwrap_or_default() {
                        let _ = cri.stop_sandbox(&s.id, Duration::ZERO).await;
                        let _ = cri.remove_sandbox(&s.id).await;
                    }
                }
            });
        })
        .join();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims of this containerd name its socket on their command line.
        let sock = self.socket().display().to_string();
        let _ = Command::new("pkill")
            .arg("-9")
            .arg("-f")
            .arg(&sock)
            .status();
        // Unmount whatever is left under the temp dir (deepest first).
        let prefix = self.dir.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        // Empty parents only: rmdir refuses a cgroup that still has children or tasks.
        for cg in &self.new_cgroups {
            let _ = std::fs::remove_dir(cg);
        }
    }
}

async fn wait_exited(cri: &CriRuntime, id: &str) -> skiff_runtime::ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = cri.container_status(id).await.unwrap();
        if st.state == ContainerState::Exited {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not exit: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn busybox(name: &str, cmd: &[&str]) -> ContainerConfig {
    ContainerConfig {
        name: name.into(),
        image: BUSYBOX.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_client_runs_pods_through_real_containerd() {
    let ctd = Containerd::start();
    let cri = CriRuntime::connect(&ctd.endpoint()).await.unwrap();
    assert_eq!(cri.name(), "containerd");

    // Images are visible through the image service.
    let img = cri.image_status(BUSYBOX).await.unwrap();
    assert!(img.is_some(), "imported image missing; log:\n{}", ctd.log());
    assert!(
        cri.image_status("skiff.local/absent:v1")
            .await
            .unwrap()
            .is_none()
    );
    let names: Vec<String> = cri
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|i| i.names)
        .collect();
    assert!(names.iter().any(|n| n == BUSYBOX), "{names:?}");

    // A sandbox with its own network namespace (set up by containerd's CNI).
    let sid = cri
        .run_sandbox(SandboxConfig {
            name: "cri-test".into(),
            hostname: "cri-test".into(),
            host_network: false,
            host_ipc: false,
        })
        .await
        .unwrap_or_else(|e| panic!("run sandbox: {e}; containerd log:\n{}", ctd.log()));
    let st = cri.sandbox_status(&sid).await.unwrap();
    assert_eq!(st.state, skiff_runtime::SandboxState::Ready);
    assert_eq!(st.name, "cri-test");
    let netns = st
        .netns
        .clone()
        .expect("a pod-network sandbox reports its netns path");
    assert!(netns.exists(), "{}", netns.display());
    // The pod IP containerd's CNI call gave it (the ptp network's 10.250.x.0/24).
    let ip = st.ip.expect("containerd reports the sandbox's IP");
    assert!(ip.to_string().starts_with("10.250."), "{ip}");
    assert!(
        cri.list_sandboxes()
            .await
            .unwrap()
            .iter()
            .any(|s| s.id == sid)
    );

    // A container that prints and exits: its CRI log has the line, exit code 0.
    let log = ctd.dir.path().join("logs").join("hello.log");
    let hello = cri
        .create_container(
            Some(&sid),
            busybox("hello", &["sh", "-c", "echo hello from cri; exit 3"]),
            log.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("create: {e}; containerd log:\n{}", ctd.log()));
    cri.start_container(&hello).await.unwrap();
    let done = wait_exited(&cri, &hello).await;
    assert_eq!(done.exit_code, Some(3));
    assert_eq!(done.name, "hello");
    assert!(done.finished_at.is_some());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.ends_with(" stdout F hello from cri")),
        "log: {text:?}"
    );

    // A long-running container: exec, stats, graceful stop.
    let sleeper = cri
        .create_container(
            Some(&sid),
            busybox("sleeper", &["sleep", "600"]),
            ctd.dir.path().join("logs").join("sleeper.log"),
        )
        .await
        .unwrap();
    cri.start_container(&sleeper).await.unwrap();
    let st = cri.container_status(&sleeper).await.unwrap();
    assert_eq!(st.state, ContainerState::Running);
    assert!(st.pid.is_some(), "{st:?}");
    let out = cri
        .exec_sync(
            &sleeper,
            vec![
                "sh".into(),
                "-c".into(),
                "hostname; echo err >&2; exit 4".into(),
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 4);
    assert_eq!(out.stdout, b"cri-test\n");
    assert_eq!(out.stderr, b"err\n");
    let stats = cri.container_stats(&sleeper).await.unwrap();
    assert!(
        stats.memory_working_set_bytes > 0 || stats.memory_usage_bytes > 0,
        "{stats:?}"
    );
    // containerd reports the writable layer's use (its snapshot's size)
    assert!(
        cri.writable_layer_bytes(&sleeper).await.unwrap().is_some(),
        "containerd reported no writable layer"
    );
    let listed = cri.list_containers().await.unwrap();
    let l = listed.iter().find(|c| c.id == sleeper).unwrap();
    assert_eq!(l.sandbox_id.as_deref(), Some(sid.as_str()));

    // Streams go through containerd's streaming server: CRI hands out its URL.
    assert!(cri.manages_pod_network());
    let url = cri
        .streaming_url(StreamRequest::Exec {
            id: sleeper.clone(),
            argv: vec!["hostname".into()],
            tty: false,
            stdin: false,
            stdout: true,
            stderr: true,
        })
        .await
        .unwrap()
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(url.contains("/exec/"), "{url}");
    let url = cri
        .streaming_url(StreamRequest::PortForward {
            sandbox_id: sid.clone(),
            ports: vec![80],
        })
        .await
        .unwrap()
        .unwrap();
    assert!(url.contains("/portforward/"), "{url}");
    assert!(cri.version().is_some_and(|v| v.starts_with("1.")));

    // What CRI cannot do here is refused with a message naming it.
    let e = cri
        .exec(&sleeper, vec!["sh".into()], false)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("streaming exec"), "{e}");
    let e = cri.import_image(PathBuf::from("/x.tar")).await.unwrap_err();
    assert!(e.to_string().contains("ctr -n k8s.io images import"), "{e}");

    let stopped = cri
        .stop_container(&sleeper, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(stopped.state, ContainerState::Exited);

    // Teardown through CRI leaves nothing listed.
    cri.remove_container(&hello).await.unwrap();
    cri.remove_container(&sleeper).await.unwrap();
    cri.stop_sandbox(&sid, Duration::from_secs(1))
        .await
        .unwrap();
    cri.remove_sandbox(&sid).await.unwrap();
    assert!(cri.list_containers().await.unwrap().is_empty());
    assert!(cri.list_sandboxes().await.unwrap().is_empty());
    assert!(cri.remove_image(BUSYBOX).await.unwrap());
    assert!(!cri.remove_image(BUSYBOX).await.unwrap());
}

#[tokio::test]
async fn cri_connect_to_a_missing_socket_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let e = CriRuntime::connect(&format!("unix://{}/none.sock", dir.path().display()))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("is it running"), "{e}");
}
