//! Pull tests against Debian's docker-registry on 127.0.0.1 (image pushed with skopeo): by
//! registry address, and by the unqualified name `busybox` through a docker.io mirror.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use skiff_runtime::pull::{Credentials, PullProgress, RegistriesConfig, pull};
use skiff_runtime::{ContainerConfig, ContainerState};

/// A docker-registry process on a free loopback port; killed on drop.
struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, "")
    }

    /// A registry that requires HTTP basic auth for `user`/`password` (htpasswd with bcrypt).
    fn start_with_auth(dir: &Path, user: &str, password: &str) -> Self {
        let hash = bcrypt::hash_with_result(password, 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY);
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
        Self::start_with(
            dir,
            &format!(
                "auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
                htpasswd.display()
            ),
        )
    }

    fn start_with(dir: &Path, extra: &str) -> Self {
        assert!(
            Path::new("/usr/bin/docker-registry").exists(),
            "Debian package docker-registry must be installed"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                dir.join("registry-data").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    fn push(&self, archive: &Path, repo: &str) {
        self.push_as(archive, repo, None)
    }

    fn push_as(&self, archive: &Path, repo: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--insecure-policy",
        ]);
        if let Some(c) = creds {
            cmd.arg("--dest-creds").arg(c);
        }
        let out = cmd
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://127.0.0.1:{}/{repo}", self.port))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_local_registry_directly_and_through_a_docker_io_mirror() {
    let t = TestRuntime::new();
    let reg = Registry::start(t.dir.path());
    let archive = t.dir.path().join("push.tar");
    let layers = [Blob {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        data: gzip(&busybox_layer()),
    }];
    std::fs::write(&archive, oci_layout("busybox:latest", &layers)).unwrap();
    reg.push(&archive, "library/busybox:latest");

    // By registry address (loopback registries default to plain http).
    let store = skiff_runtime::ImageStore::open(t.dir.path().join("pull-store")).unwrap();
    let events = Mutex::new(Vec::<PullProgress>::new());
    let record = |p: PullProgress| events.lock().unwrap().push(p);
    let direct = format!("127.0.0.1:{}/library/busybox:latest", reg.port);
    let name = pull(
        &store,
        &direct,
        &RegistriesConfig::default(),
        &Credentials::Anonymous,
        &record,
    )
    .await
    .unwrap();
    assert_eq!(name, direct);
    let ev = events.lock().unwrap().clone();
    let done: Vec<&PullProgress> = ev.iter().filter(|e| e.complete).collect();
    assert_eq!(done.len(), 2, "config + one layer: {ev:?}");
    assert!(
        done.iter()
            .all(|e| !e.cached && e.bytes > 0 && e.done == e.bytes)
    );
    // The layer's bytes are reported as they arrive: a start at 0, steps in between, in order.
    let layer = done.iter().max_by_key(|e| e.bytes).unwrap();
    let steps: Vec<u64> = ev
        .iter()
        .filter(|e| e.digest == layer.digest)
        .map(|e| e.done)
        .collect();
    assert_eq!(steps.first(), Some(&0), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    if layer.bytes > 2 * 256 * 1024 {
        assert!(
            steps.iter().any(|d| *d > 0 && *d < layer.bytes),
            "intermediate progress for a {} byte layer: {steps:?}",
            layer.bytes
        );
    }

    // By the unqualified name through a docker.io mirror in registries.yaml.
    let yaml = format!(
        "mirrors:\n  docker.io:\n    endpoint:\n      - \"http://127.0.0.1:{}\"\n",
        reg.port
    );
    let regs = RegistriesConfig::from_yaml(&yaml, Path::new("registries.yaml")).unwrap();
    events.lock().unwrap().clear();
    let name = pull(&store, "busybox", &regs, &Credentials::Anonymous, &record)
        .await
        .unwrap();
    assert_eq!(name, "docker.io/library/busybox:latest");
    assert!(
        events.lock().unwrap().iter().all(|e| e.cached),
        "blobs are shared with the first pull"
    );
    assert_eq!(
        store.resolve("busybox").unwrap().manifest_digest,
        store.resolve(&direct).unwrap().manifest_digest
    );
    // Into the runtime's own store, then run it by the unqualified name.
    pull(
        t.rt.images(),
        "busybox",
        &regs,
        &Credentials::Anonymous,
        &record,
    )
    .await
    .unwrap();

    // And it runs.
    let log = t.log("pulled");
    let cfg = ContainerConfig {
        name: "pulled".into(),
        image: "busybox".into(),
        command: vec!["echo".into(), "hello".into()],
        ..Default::default()
    };
    let id = t.rt.create(None, cfg, log.clone()).await.unwrap();
    t.rt.start(&id).await.unwrap();
    let st = t.rt.wait(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!((st.state, st.exit_code), (ContainerState::Exited, Some(0)));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains(" stdout F hello")
    );

    // Concurrent pulls of one name share the download: one fetches, the other finds it cached.
    let fresh = skiff_runtime::ImageStore::open(t.dir.path().join("pull-store-2")).unwrap();
    events.lock().unwrap().clear();
    let none = RegistriesConfig::default();
    let (a, b) = tokio::join!(
        pull(&fresh, &direct, &none, &Credentials::Anonymous, &record),
        pull(&fresh, &direct, &none, &Credentials::Anonymous, &record)
    );
    assert_eq!(a.unwrap(), b.unwrap());
    let ev = events.lock().unwrap().clone();
    assert_eq!(
        ev.iter().filter(|e| e.complete && !e.cached).count(),
        2,
        "each blob downloaded once: {ev:?}"
    );
    assert_eq!(ev.iter().filter(|e| e.cached).count(), 2, "{ev:?}");

    // A missing image fails with every endpoint named.
    let e = pull(
        &store,
        &format!("127.0.0.1:{}/nope:latest", reg.port),
        &RegistriesConfig::default(),
        &Credentials::Anonymous,
        &record,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("every endpoint failed") && e.contains(&reg.port.to_string()),
        "{e}"
    );
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_registry_that_requires_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start_with_auth(dir.path(), "puller", "s3cret-pw");
    let archive = dir.path().join("img.tar");
    let layers = [Blob {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        data: gzip(&busybox_layer()),
    }];
    std::fs::write(&archive, oci_layout("private:v1", &layers)).unwrap();
    reg.push_as(&archive, "team/private:v1", Some("puller:s3cret-pw"));

    let store = skiff_runtime::ImageStore::open(dir.path().join("store")).unwrap();
    let none = RegistriesConfig::default();
    let name = format!("127.0.0.1:{}/team/private:v1", reg.port);
    let quiet = |_: PullProgress| {};

    // Without credentials, and with a wrong password, the registry says no.
    for creds in [
        Credentials::Anonymous,
        Credentials::Basic {
            username: "puller".into(),
            password: "wrong".into(),
        },
    ] {
        let e = pull(&store, &name, &none, &creds, &quiet)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.to_lowercase().contains("unauthorized") || e.contains("401"),
            "{e}"
        );
        assert!(
            !e.contains("s3cret-pw"),
            "the password must never appear in errors: {e}"
        );
    }
    assert!(
        store.resolve(&name).is_err(),
        "nothing stored after a refused pull"
    );

    // With the right user and password (as an imagePullSecret would give them) it pulls.
    let creds = Credentials::Basic {
        username: "puller".into(),
        password: "s3cret-pw".into(),
    };
    assert_eq!(
        pull(&store, &name, &none, &creds, &quiet).await.unwrap(),
        name
    );
    assert!(store.resolve(&name).is_ok());

    // Credentials from registries.yaml `configs` are used when the caller has none.
    let store2 = skiff_runtime::ImageStore::open(dir.path().join("store2")).unwrap();
    let yaml = format!(
        "configs:\n  \"127.0.0.1:{}\":\n    auth:\n      username: puller\n      password: s3cret-pw\n",
        reg.port
    );
    let regs = RegistriesConfig::from_yaml(&yaml, Path::new("registries.yaml")).unwrap();
    assert_eq!(
        pull(&store2, &name, &regs, &Credentials::Anonymous, &quiet)
            .await
            .unwrap(),
        name
    );
}
