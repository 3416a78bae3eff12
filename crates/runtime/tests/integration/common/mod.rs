//! Test helpers: images built from the host's static busybox, and a runtime in a temp dir that
//! cleans up everything (shims, mounts, cgroups, netns files) also when a test fails.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_runtime::{BuiltinRuntime, ImageStore, RuntimeConfig};

mod layers;
pub use layers::*;

/// Writes a raw tar entry with an arbitrary (possibly unsafe) path, bypassing the tar crate's
/// own path checks.
pub fn raw_tar_entry(path: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    {
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
    }
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(512 + data.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).unwrap()
}

/// The second layer: deletes /data/del, makes /opq opaque with a new file.
pub fn whiteout_layer() -> Vec<u8> {
    layer_tar(&[
        E::Dir("data/", 0o755),
        E::File("data/.wh.del".into(), vec![], 0o644),
        E::Dir("opq/", 0o755),
        E::File("opq/.wh..wh..opq".into(), vec![], 0o644),
        E::File("opq/new".into(), b"new\n".to_vec(), 0o644),
    ])
}

pub struct Blob {
    pub media_type: &'static str,
    pub data: Vec<u8>,
}

fn config_json(n_layers: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": skiff_runtime::store::host_arch().0,
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "Cmd": ["sh", "-c", "echo from-image-cmd"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": vec!["sha256:00"; n_layers]},
    }))
    .unwrap()
}

/// An OCI-layout tarball holding one image named `name` with `layers`.
pub fn oci_layout(name: &str, layers: &[Blob]) -> Vec<u8> {
    let cfg = config_json(layers.len());
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&cfg), "size": cfg.len()},
        "layers": layers.iter().map(|l| serde_json::json!({"mediaType": l.media_type, "digest": sha(&l.data), "size": l.data.len()})).collect::<Vec<_>>(),
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": name}}],
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
    for b in std::iter::once(&cfg)
        .chain(std::iter::once(&manifest))
        .chain(layers.iter().map(|l| &l.data))
    {
        es.push(E::File(
            format!("blobs/sha256/{}", &sha(b)[7..]),
            b.clone(),
            0o644,
        ));
    }
    layer_tar(&es)
}

/// A `docker save` tarball with uncompressed layers.
pub fn docker_save(tag: &str, layers: &[Vec<u8>]) -> Vec<u8> {
    let cfg = config_json(layers.len());
    let cfg_name = format!("{}.json", &sha(&cfg)[7..]);
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("l{i}/layer.tar"))
        .collect();
    let manifest = serde_json::to_vec(
        &serde_json::json!([{"Config": cfg_name, "RepoTags": [tag], "Layers": names}]),
    )
    .unwrap();
    let mut es = vec![
        E::File("manifest.json".into(), manifest, 0o644),
        E::File(cfg_name, cfg, 0o644),
    ];
    for (i, l) in layers.iter().enumerate() {
        es.push(E::File(format!("l{i}/layer.tar"), l.clone(), 0o644));
    }
    layer_tar(&es)
}

pub const TEST_IMAGE: &str = "skiff.local/busybox:stable";

/// A store with the two-layer busybox test image (gzip base layer, zstd whiteout layer).
pub fn store_with_busybox(root: &Path) -> ImageStore {
    let store = ImageStore::open(root).unwrap();
    let tarball = oci_layout(
        TEST_IMAGE,
        &[
            Blob {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
                data: gzip(&busybox_layer()),
            },
            Blob {
                media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
                data: zstd(&whiteout_layer()),
            },
        ],
    );
    let p = root.join("busybox-oci.tar");
    std::fs::write(&p, tarball).unwrap();
    assert_eq!(
        store.import(&p, None).unwrap(),
        vec![TEST_IMAGE.to_string()]
    );
    store
}

/// A runtime in a temp dir with a unique cgroup parent; cleans up on drop.
pub struct TestRuntime {
    pub rt: BuiltinRuntime,
    pub dir: tempfile::TempDir,
    pub cgroup_parent: String,
}

pub fn unique(prefix: &str) -> String {
    let mut b = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    format!("{prefix}-{}", hex::encode(b))
}

/// The shim: this crate's test binary, or `SKIFF_TEST_SHIM` ("/path/to/skiff shim", for logs).
pub fn shim_command() -> Vec<std::ffi::OsString> {
    if let Ok(s) = std::env::var("SKIFF_TEST_SHIM") {
        return s.split_whitespace().map(Into::into).collect();
    }
    vec![env!("CARGO_BIN_EXE_skiff-test-shim").into()]
}

impl TestRuntime {
    pub fn new() -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("skiff-rt-")
            .tempdir_in("/tmp")
            .unwrap();
        let store = store_with_busybox(&dir.path().join("images"));
        let cgroup_parent = unique("skiff-test");
        let rt = BuiltinRuntime::new(RuntimeConfig {
            state_dir: dir.path().join("rt"),
            images: store,
            shim_command: shim_command(),
            cgroup_parent: cgroup_parent.clone(),
        })
        .unwrap();
        Self {
            rt,
            dir,
            cgroup_parent,
        }
    }

    /// A second runtime instance on the same state (as after a restart).
    pub fn reopen(&self) -> BuiltinRuntime {
        BuiltinRuntime::new(RuntimeConfig {
            state_dir: self.dir.path().join("rt"),
            images: ImageStore::open(self.dir.path().join("images")).unwrap(),
            shim_command: shim_command(),
            cgroup_parent: self.cgroup_parent.clone(),
        })
        .unwrap()
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    /// Removes everything and asserts nothing is left behind.
    pub async fn teardown(&self) {
        for sb in self.rt.list_sandboxes().unwrap() {
            self.rt.remove_sandbox(&sb.id).await.unwrap();
        }
        for c in self.rt.list().await.unwrap() {
            self.rt.remove(&c.id).await.unwrap();
        }
        self.rt.remove_cgroup_parent().unwrap();
        self.rt.release_pins_mount();
        let left = leftovers(self.dir.path(), &self.cgroup_parent);
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

/// Mounts under `dir`, cgroup dirs of `parent`, and live shim processes started from `dir`.
pub fn leftovers(dir: &Path, parent: &str) -> Vec<String> {
    let mut out = skiff_runtime::sandbox::mounts_under(dir);
    for e in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let p = e.path().join(parent);
        if p.exists() {
            out.push(p.display().to_string());
        }
    }
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(" create --id ") && cmd.contains(&needle) {
                out.push(format!(
                    "process {}: {cmd}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    if dir.join("rt/sandboxes").exists() {
        for e in std::fs::read_dir(dir.join("rt/sandboxes"))
            .unwrap()
            .flatten()
        {
            out.push(e.path().display().to_string());
        }
    }
    out
}

impl Drop for TestRuntime {
    fn drop(&mut self) {
        // Best effort, synchronous: kill shims and containers, unmount, remove cgroups.
        let needle = self.dir.path().display().to_string();
        let cdir = self.dir.path().join("rt/containers");
        if let Ok(rd) = std::fs::read_dir(&cdir) {
            for e in rd.flatten() {
                if let Ok(st) = skiff_runtime::shim::read_state(&e.path())
                    && let Some(pid) = st.pid
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(" create --id ")
                    && cmd.contains(&needle)
                    && let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>()
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let mut mounts = skiff_runtime::sandbox::mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        let cg = skiff_runtime::cgroup::Cgroups::host();
        let _ = cg.remove(&self.cgroup_parent);
    }
}
