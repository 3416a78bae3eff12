//! The built-in runtime used only through `Arc<dyn Runtime>`, as the kubelet holds it: sandbox,
//! container lifecycle, exec (sync and streaming), attach, stats and images.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::TestRuntime;
use skiff_runtime::pull::Credentials;
use skiff_runtime::{
    AttachStream, ContainerConfig, ContainerState, Runtime, SandboxConfig, SandboxState,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEST_IMAGE: &str = "skiff.local/busybox:stable";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_runtime_through_the_trait_object() {
    let t = TestRuntime::new();
    let rt: Arc<dyn Runtime> = Arc::new(t.rt.clone());
    assert_eq!(rt.name(), "skiff");

    // images
    let images = rt.list_images().await.unwrap();
    let bb = images
        .iter()
        .find(|i| i.names.iter().any(|n| n == TEST_IMAGE))
        .unwrap_or_else(|| panic!("busybox missing from {images:?}"));
    assert!(bb.id.starts_with("sha256:") && bb.size > 0, "{bb:?}");
    assert_eq!(
        rt.image_status(TEST_IMAGE).await.unwrap().map(|i| i.id),
        Some(bb.id.clone())
    );
    assert_eq!(
        rt.image_status("skiff.local/nothing:here").await.unwrap(),
        None
    );

    // sandbox
    let sb = rt
        .run_sandbox(SandboxConfig {
            name: "trait".into(),
            hostname: "trait-pod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let st = rt.sandbox_status(&sb).await.unwrap();
    assert_eq!(st.state, SandboxState::Ready);
    let netns = st.netns.clone().expect("a pod netns");
    assert!(netns.exists(), "{netns:?}");
    assert_eq!(rt.list_sandboxes().await.unwrap(), vec![st]);

    // container
    let log = t.log("trait");
    let cfg = ContainerConfig {
        name: "trait".into(),
        image: TEST_IMAGE.into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo first; while true; do sleep 0.2; echo tick; done".into(),
        ],
        ..Default::default()
    };
    let id = rt
        .create_container(Some(&sb), cfg, log.clone())
        .await
        .unwrap();
    assert_eq!(
        rt.container_status(&id).await.unwrap().state,
        ContainerState::Created
    );
    rt.start_container(&id).await.unwrap();
    let st = rt.container_status(&id).await.unwrap();
    assert_eq!(st.state, ContainerState::Running);
    assert_eq!(st.sandbox_id.as_deref(), Some(sb.as_str()));
    assert_eq!(rt.log_path(&id).await.unwrap(), log);
    assert_eq!(rt.list_containers().await.unwrap().len(), 1);

    // exec, sync: the pod hostname
    let out = rt
        .exec_sync(&id, vec!["hostname".into()], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "trait-pod");

    // exec, streaming: stdin to stdout through `cat`
    let mut ex = rt.exec(&id, vec!["cat".into()], false).await.unwrap();
    let mut stdin = ex.take_stdin().unwrap();
    let mut stdout = ex.take_stdout().unwrap();
    stdin.write_all(b"through the trait\n").await.unwrap();
    drop(stdin);
    let mut got = String::new();
    stdout.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "through the trait\n");
    assert_eq!(ex.wait().await.unwrap(), 0);

    // attach: the loop's output
    let mut at = rt.attach(&id).await.unwrap();
    let (which, data) = tokio::time::timeout(Duration::from_secs(5), at.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(which, AttachStream::Stdout);
    assert!(String::from_utf8_lossy(&data).contains("tick"), "{data:?}");
    drop(at);

    // stats from the container's cgroup
    let stats = rt.container_stats(&id).await.unwrap();
    assert!(stats.memory_usage_bytes > 0, "{stats:?}");

    // what the container writes into its root filesystem is its writable layer
    let before = rt.writable_layer_bytes(&id).await.unwrap().unwrap();
    let out = rt
        .exec_sync(
            &id,
            vec![
                "sh".into(),
                "-c".into(),
                "dd if=/dev/zero of=/written bs=1024 count=300 2>/dev/null".into(),
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    let after = rt.writable_layer_bytes(&id).await.unwrap().unwrap();
    assert!(
        after >= before + 300 * 1024,
        "writable layer {before} -> {after} bytes after writing 300 KiB"
    );

    // stop the sandbox: its container exits
    rt.stop_sandbox(&sb, Duration::from_secs(2)).await.unwrap();
    let st = rt.container_status(&id).await.unwrap();
    assert_eq!(st.state, ContainerState::Exited, "{st:?}");

    // the image is in use: removal refused until the sandbox is gone
    assert!(rt.remove_image(TEST_IMAGE).await.is_err());
    rt.remove_sandbox(&sb).await.unwrap();
    assert!(rt.list_sandboxes().await.unwrap().is_empty());
    assert!(rt.list_containers().await.unwrap().is_empty());
    assert!(rt.sandbox_status(&sb).await.is_err());

    // a pull from a registry that is not there fails with an error naming it
    let err = rt
        .pull_image(
            "127.0.0.1:1/nothing:latest",
            &Credentials::Anonymous,
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");

    assert!(rt.remove_image(TEST_IMAGE).await.unwrap());
    assert_eq!(rt.image_status(TEST_IMAGE).await.unwrap(), None);
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_shim_fails_create_and_leaves_no_mount() {
    let t = TestRuntime::new();
    let rt: Arc<dyn Runtime> = Arc::new(
        skiff_runtime::BuiltinRuntime::new(skiff_runtime::RuntimeConfig {
            state_dir: t.dir.path().join("rt"),
            images: skiff_runtime::ImageStore::open(t.dir.path().join("images")).unwrap(),
            shim_command: vec!["/nonexistent/skiff-shim".into()],
            cgroup_parent: t.cgroup_parent.clone(),
        })
        .unwrap(),
    );
    let cfg = ContainerConfig {
        name: "noshim".into(),
        image: TEST_IMAGE.into(),
        ..Default::default()
    };
    let err = rt
        .create_container(None, cfg, t.log("noshim"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/skiff-shim"), "{err}");
    assert!(rt.list_containers().await.unwrap().is_empty());
    assert!(
        skiff_runtime::sandbox::mounts_under(t.dir.path()).is_empty(),
        "rootfs mount left behind"
    );
    t.teardown().await;
}
