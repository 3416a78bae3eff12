//! The CRI client against Debian's real containerd (its CRI plugin), started per test in a temp
//! dir with its own socket (`crate::containerd`). Pod networks come from Debian's CNI `ptp`
//! plugin (a veth and a host route per pod, no bridge) with host-local IPAM kept in the temp
//! dir; CNI DEL removes them.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::containerd::{BUSYBOX, Containerd};
use skiff_runtime::{
    ContainerConfig, ContainerState, CriRuntime, Runtime, SandboxConfig, StreamRequest,
};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_image_gc_sees_every_client_pins_the_sandbox_image_and_reports_the_image_fs() {
    const UNUSED: &str = "skiff.local/cri-unused:test";
    let ctd = Containerd::start();
    ctd.import(UNUSED, &["true"]);
    let cri = CriRuntime::connect(&ctd.endpoint()).await.unwrap();
    let id_of = |images: &[skiff_runtime::ImageInfo], name: &str| {
        images
            .iter()
            .find(|i| i.names.iter().any(|n| n == name))
            .unwrap_or_else(|| panic!("{name} not listed: {images:?}"))
            .id
            .clone()
    };
    let images = cri.list_images().await.unwrap();
    let (a, p, b) = (
        id_of(&images, BUSYBOX),
        id_of(&images, crate::containerd::PAUSE),
        id_of(&images, UNUSED),
    );
    assert!(a != p && p != b && a != b, "three distinct images");

    // containerd 1.6 does not set CRI's `pinned`; its configured sandbox image is pinned all
    // the same in the list (what image GC reads).
    let pinned: Vec<&str> = images
        .iter()
        .filter(|i| i.pinned)
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(pinned, [p.as_str()], "{images:?}");

    // The image filesystem is containerd's, under its root.
    let fs = cri
        .image_fs()
        .await
        .unwrap()
        .expect("containerd reports ImageFsInfo");
    assert!(
        fs.mountpoint.starts_with(ctd.dir.path()),
        "{}",
        fs.mountpoint.display()
    );
    assert!(fs.mountpoint.exists(), "{}", fs.mountpoint.display());

    // Nothing runs: nothing is in use.
    assert!(cri.images_in_use().await.unwrap().is_empty());

    // Someone else runs a container from A in a sandbox of their own.
    let (sandbox, container) = ctd.run_foreign(BUSYBOX).await;
    // skiff's own listings still do not show it ...
    assert!(cri.list_containers().await.unwrap().is_empty());
    assert!(cri.list_sandboxes().await.unwrap().is_empty());
    // ... but image GC counts it: A by its container, P by the sandbox.
    let in_use = cri.images_in_use().await.unwrap();
    assert!(in_use.contains(&a), "{in_use:?}");
    assert!(in_use.contains(&p), "{in_use:?}");
    assert!(!in_use.contains(&b), "{in_use:?}");

    // What image GC chooses (unpinned, unused by id or name) is B alone; collecting it by id
    // removes it with its name.
    let images = cri.list_images().await.unwrap();
    let chosen: Vec<_> = images
        .iter()
        .filter(|i| {
            !i.pinned && !in_use.contains(&i.id) && !i.names.iter().any(|n| in_use.contains(n))
        })
        .collect();
    assert_eq!(
        chosen.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        [b.as_str()]
    );
    assert!(cri.collect_image(chosen[0]).await.unwrap());
    assert!(cri.image_status(UNUSED).await.unwrap().is_none());
    assert!(cri.image_status(&b).await.unwrap().is_none());
    let left: Vec<String> = cri
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert!(left.contains(&a) && left.contains(&p), "{left:?}");
    assert!(!left.contains(&b), "{left:?}");

    // Their container still runs.
    let mut client = crate::containerd::cri_client(&ctd.socket()).await.unwrap();
    let st = client
        .container_status(k8s_cri::v1::ContainerStatusRequest {
            container_id: container,
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        st.state,
        k8s_cri::v1::ContainerState::ContainerRunning as i32
    );
    let _ = sandbox;
}
