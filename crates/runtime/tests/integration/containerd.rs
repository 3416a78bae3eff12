//! Debian's real containerd for tests, started per test in a temp dir with its own root, state,
//! socket and CNI config (Debian's `ptp` plugin, host-local IPAM in the temp dir), with a
//! busybox image and a sandbox (pause) image imported; everything it made is removed on drop.
//! Other crates' tests include this file (`#[path]`) next to `common/layers.rs` as `common`.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

use crate::common::{E, busybox_layer, layer_tar, require_root, sha};

/// A raw CRI runtime-service client on `socket`: for what skiff's client does not do (act as
/// another client of the runtime, clean up everything).
pub async fn cri_client(
    socket: &Path,
) -> Result<RuntimeServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(RuntimeServiceClient::new(channel))
}

pub const BUSYBOX: &str = "skiff.local/cri-busybox:test";
pub const PAUSE: &str = "skiff.local/cri-pause:test";

/// An OCI-layout tarball with one uncompressed layer whose config names the correct diff id
/// (containerd checks it) and runs `cmd`.
pub fn image_tar(name: &str, layer: &[u8], cmd: &[&str]) -> Vec<u8> {
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
pub struct Containerd {
    pub dir: tempfile::TempDir,
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
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn start() -> Containerd {
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
        c.import(BUSYBOX, &["sh"]);
        c.import(PAUSE, &["sleep", "2147483647"]);
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

    /// Imports a busybox image named `name` that runs `cmd` (a different `cmd` makes a
    /// different image).
    pub fn import(&self, name: &str, cmd: &[&str]) {
        let tar = self
            .dir
            .path()
            .join(format!("{}.tar", &sha(name.as_bytes())[7..15]));
        std::fs::write(&tar, image_tar(name, &busybox_layer(), cmd)).unwrap();
        self.ctr(&["images", "import", "--no-unpack=false"], Some(&tar));
    }

    /// Another client of the same containerd (a sandbox outside skiff's CRI namespace, host
    /// network) with one running container from `image`; returns the sandbox and container ids.
    pub async fn run_foreign(&self, image: &str) -> (String, String) {
        let ctd = self;
        let logs = ctd.dir.path().join("other-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let mut client = cri_client(&ctd.socket()).await.unwrap();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "other".into(),
                uid: "other-uid".into(),
                namespace: "someone-else".into(),
                attempt: 0,
            }),
            log_directory: logs.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox = client
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("foreign sandbox: {e}; containerd log:\n{}", ctd.log()))
            .into_inner()
            .pod_sandbox_id;
        let container = client
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "theirs".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    command: vec!["sleep".into(), "600".into()],
                    log_path: "theirs.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(config),
            })
            .await
            .unwrap_or_else(|e| panic!("foreign container: {e}; containerd log:\n{}", ctd.log()))
            .into_inner()
            .container_id;
        client
            .start_container(cri::StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .unwrap();
        (sandbox, container)
    }

    pub fn ctr(&self, args: &[&str], file: Option<&Path>) {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Remove every sandbox and container through CRI (skiff's and those tests made as
        // another client), so containerd deletes their tasks, cgroups and mounts itself.
        let socket = self.socket();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(mut cri) = cri_client(&socket).await else {
                    return;
                };
                let containers = cri
                    .list_containers(cri::ListContainersRequest { filter: None })
                    .await
                    .map(|r| r.into_inner().containers)
                    .unwrap_or_default();
                for c in containers {
                    let _ = cri
                        .stop_container(cri::StopContainerRequest {
                            container_id: c.id.clone(),
                            timeout: 0,
                        })
                        .await;
                    let _ = cri
                        .remove_container(cri::RemoveContainerRequest { container_id: c.id })
                        .await;
                }
                let sandboxes = cri
                    .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                    .await
                    .map(|r| r.into_inner().items)
                    .unwrap_or_default();
                for s in sandboxes {
                    let _ = cri
                        .stop_pod_sandbox(cri::StopPodSandboxRequest {
                            pod_sandbox_id: s.id.clone(),
                        })
                        .await;
                    let _ = cri
                        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                            pod_sandbox_id: s.id,
                        })
                        .await;
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
