//! Container tests on the real kernel (root): logs, exit codes, limits, users, capabilities,
//! sandboxes, exec, and re-adoption after the runtime's process dies.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use crate::common;

use std::time::Duration;

use common::*;
use skiff_runtime::{ContainerConfig, ContainerState, Resources, SandboxConfig};

fn sh(name: &str, script: &str) -> ContainerConfig {
    ContainerConfig {
        name: name.into(),
        image: TEST_IMAGE.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn log_lines(path: &std::path::Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            let ts = it.next().unwrap().to_string();
            assert!(
                ts.ends_with('Z') && ts.contains('T'),
                "bad timestamp in {l:?}"
            );
            (
                it.next().unwrap_or("").into(),
                it.next().unwrap_or("").into(),
                it.next().unwrap_or("").into(),
            )
        })
        .collect()
}

async fn run_to_end(
    t: &TestRuntime,
    cfg: ContainerConfig,
) -> (
    skiff_runtime::ContainerStatus,
    Vec<(String, String, String)>,
) {
    let log = t.log(&cfg.name);
    let id = t.rt.create(None, cfg, log.clone()).await.unwrap();
    t.rt.start(&id).await.unwrap();
    let st = t.rt.wait(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(st.state, ContainerState::Exited, "{st:?}");
    (st, log_lines(&log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_hello_logs_and_exits_zero() {
    let t = TestRuntime::new();
    let (st, lines) = run_to_end(&t, sh("echo", "echo hello; echo oops >&2; exit 0")).await;
    assert_eq!(st.exit_code, Some(0));
    assert!(!st.oom_killed);
    assert!(st.started_at.unwrap() <= st.finished_at.unwrap());
    assert!(
        lines.contains(&("stdout".into(), "F".into(), "hello".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "F".into(), "oops".into())),
        "{lines:?}"
    );
    // Image config defaults: no command → image Cmd, image env.
    let cfg = ContainerConfig {
        name: "dflt".into(),
        image: "skiff.local/busybox:stable".into(),
        ..Default::default()
    };
    let (st, lines) = run_to_end(&t, cfg).await;
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(lines[0].2, "from-image-cmd");
    let (st, _) = run_to_end(&t, sh("exit3", "exit 3")).await;
    assert_eq!(st.exit_code, Some(3));
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kill_is_reported() {
    let t = TestRuntime::new();
    let mut cfg = sh(
        "oom",
        "echo start; exec dd if=/dev/zero of=/dev/null bs=64M count=1",
    );
    cfg.resources = Resources {
        memory_limit: Some(16 * 1024 * 1024),
        ..Default::default()
    };
    let (st, lines) = run_to_end(&t, cfg).await;
    assert!(st.oom_killed, "expected an OOM kill: {st:?} {lines:?}");
    assert_eq!(st.exit_code, Some(137), "killed by SIGKILL");
    assert_eq!(lines.first().map(|l| l.2.as_str()), Some("start"));
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_holds() {
    let t = TestRuntime::new();
    // 20 background sleeps under a limit of 8 tasks: forks must fail (without the limit all succeed).
    let mut cfg = sh(
        "pids",
        "i=0; while [ $i -lt 20 ]; do sleep 2 & i=$((i+1)); done; echo looped",
    );
    cfg.resources = Resources {
        pids_limit: Some(8),
        ..Default::default()
    };
    let (_st, lines) = run_to_end(&t, cfg).await;
    assert!(
        lines
            .iter()
            .any(|l| l.0 == "stderr" && l.2.contains("fork")),
        "a fork must have failed: {lines:?}"
    );
    let (st, lines) = run_to_end(
        &t,
        sh(
            "nopids",
            "i=0; while [ $i -lt 20 ]; do sleep 1 & i=$((i+1)); done; wait; echo looped",
        ),
    )
    .await;
    assert_eq!(st.exit_code, Some(0));
    assert!(
        lines.iter().any(|l| l.2 == "looped") && !lines.iter().any(|l| l.2.contains("fork")),
        "{lines:?}"
    );
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_rootfs_user_and_capabilities() {
    let t = TestRuntime::new();
    // Read-only rootfs refuses writes.
    let mut cfg = sh("ro", "echo x > /newfile && echo wrote || echo refused");
    cfg.readonly_rootfs = true;
    let (_, lines) = run_to_end(&t, cfg).await;
    assert!(lines.iter().any(|l| l.2 == "refused"), "{lines:?}");
    // A non-root user cannot write a root-owned file.
    let mut cfg = sh(
        "user",
        "id -u; echo x >> /root-owned && echo wrote || echo refused",
    );
    cfg.run_as_user = Some(1000);
    let (_, lines) = run_to_end(&t, cfg).await;
    let out: Vec<&str> = lines
        .iter()
        .filter(|l| l.0 == "stdout")
        .map(|l| l.2.as_str())
        .collect();
    assert_eq!(out, ["1000", "refused"], "{lines:?}");
    // Root can (and the write lands in the container's upper dir, not the image).
    let (_, lines) = run_to_end(
        &t,
        sh(
            "rootw",
            "echo x >> /root-owned && echo wrote || echo refused",
        ),
    )
    .await;
    assert!(lines.iter().any(|l| l.2 == "wrote"), "{lines:?}");
    // Dropped capabilities are absent from CapEff.
    let mut cfg = sh("caps", "grep CapEff /proc/self/status");
    cfg.cap_drop = vec!["CHOWN".into(), "NET_RAW".into()];
    let (_, lines) = run_to_end(&t, cfg).await;
    let eff = lines
        .iter()
        .find(|l| l.2.starts_with("CapEff"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    let mask = u64::from_str_radix(eff.2.split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_eq!(mask & 1, 0, "CAP_CHOWN (bit 0) must be dropped: {mask:x}");
    assert_eq!(
        mask & (1 << 13),
        0,
        "CAP_NET_RAW (bit 13) must be dropped: {mask:x}"
    );
    assert_ne!(mask & (1 << 5), 0, "CAP_KILL (bit 5) stays: {mask:x}");
    assert_eq!(
        mask & (1 << 21),
        0,
        "CAP_SYS_ADMIN is never in the default set: {mask:x}"
    );
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_exec_hostname_and_whiteouts() {
    let t = TestRuntime::new();
    let sb =
        t.rt.create_sandbox(SandboxConfig {
            name: "pod".into(),
            hostname: "pod-host".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let netns = sb.netns.clone().unwrap();
    assert!(
        skiff_runtime::sandbox::is_mounted(&netns),
        "netns is pinned by a bind mount"
    );
    let id =
        t.rt.create(Some(&sb.id), sh("app", "echo up; sleep 1000"), t.log("app"))
            .await
            .unwrap();
    t.rt.start(&id).await.unwrap();
    let out =
        t.rt.exec(&id, vec!["hostname".into()], Duration::from_secs(20))
            .await
            .unwrap();
    assert_eq!(
        (out.exit_code, String::from_utf8_lossy(&out.stdout).trim()),
        (0, "pod-host")
    );
    // Streaming exec: stdin in, stdout out, exit code.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut p =
            t.rt.exec_stream(
                &id,
                vec![
                    "sh".into(),
                    "-c".into(),
                    "read x; echo got-$x; echo err-$x >&2; exit 4".into(),
                ],
                false,
            )
            .await
            .unwrap();
        let mut stdin = p.stdin.take().unwrap();
        stdin.write_all(b"ping\n").await.unwrap();
        drop(stdin);
        let (mut out, mut err) = (String::new(), String::new());
        p.stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        p.stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
        assert_eq!((out.as_str(), err.as_str()), ("got-ping\n", "err-ping\n"));
        assert_eq!(p.wait().await.unwrap(), 4);
    }
    // The two-layer image: the whiteout and the opaque dir hide lower content.
    let out =
        t.rt.exec(
            &id,
            vec!["sh".into(), "-c".into(), "ls /data /opq; exit 7".into()],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 7);
    let ls = String::from_utf8_lossy(&out.stdout);
    assert!(ls.contains("keep") && ls.contains("new"), "{ls}");
    assert!(!ls.contains("del") && !ls.contains("old"), "{ls}");
    // The container is in the pod's cgroup and network namespace.
    assert!(t.rt.cgroup_of(&id).unwrap().starts_with(&sb.cgroup));
    let st = t.rt.status(&id).await.unwrap();
    let ctr_net = std::fs::read_link(format!("/proc/{}/ns/net", st.pid.unwrap())).unwrap();
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(ctr_net, host_net);
    let stats = t.rt.stats(&id).await.unwrap();
    assert!(stats.memory_usage_bytes > 0, "{stats:?}");
    // Stop: sh as pid 1 ignores SIGTERM, so SIGKILL after the grace period.
    let t0 = std::time::Instant::now();
    let st = t.rt.stop(&id, Duration::from_millis(300)).await.unwrap();
    assert_eq!(st.state, ContainerState::Exited);
    assert_eq!(st.exit_code, Some(137));
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let pod_cgroup = sb.cgroup.clone();
    t.rt.remove_sandbox(&sb.id).await.unwrap();
    assert!(!netns.exists());
    assert!(!skiff_runtime::cgroup::Cgroups::host().exists(&pod_cgroup));
    t.teardown().await;
}

#[test]
fn container_survives_sigkill_of_the_runtime_process_and_is_readopted() {
    require_root();
    let t = TestRuntime::new();
    // A child process plays the runtime: it creates and starts a container, prints the id, and
    // then is SIGKILLed.
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "containers::runtime_child_process",
            "--nocapture",
            "--include-ignored",
        ])
        .env("SKIFF_TEST_STATE", t.dir.path())
        .env("SKIFF_TEST_CGROUP", &t.cgroup_parent)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let id = loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "child ended before printing the id"
        );
        if let Some(rest) = line.strip_prefix("CONTAINER-ID=") {
            break rest.trim().to_string();
        }
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.wait();
    // The shim zygote the killed runtime started ends too (its socket reads end-of-file).
    let zygote = format!("zygote --root {}", t.dir.path().join("rt").display());
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !pids_with(&zygote).is_empty() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pids_with(&zygote).is_empty(),
        "the zygote outlived the runtime process"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let fresh = t.reopen();
        let list = fresh.list().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, id);
        assert_eq!(list[0].state, ContainerState::Running);
        // Logs keep flowing after the runtime died.
        let log = list[0].log_path.clone();
        let n0 = log_lines(&log).len();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while log_lines(&log).len() <= n0 + 2 && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(log_lines(&log).len() > n0 + 2, "logs keep flowing");
        let st = fresh.stop(&id, Duration::from_secs(1)).await.unwrap();
        assert_eq!(st.state, ContainerState::Exited);
        fresh.remove(&id).await.unwrap();
        t.teardown().await;
    });
}

/// Not a test on its own: the "runtime process" of the test above (ignored when run alone, so it
/// is skipped unless the parent sets SKIFF_TEST_STATE).
#[test]
#[ignore = "helper process for container_survives_sigkill_of_the_runtime_process_and_is_readopted"]
fn runtime_child_process() {
    let Ok(state) = std::env::var("SKIFF_TEST_STATE") else {
        return;
    };
    let state = std::path::PathBuf::from(state);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let runtime = skiff_runtime::BuiltinRuntime::new(skiff_runtime::RuntimeConfig {
            state_dir: state.join("rt"),
            images: skiff_runtime::ImageStore::open(state.join("images")).unwrap(),
            shim_command: shim_command(),
            cgroup_parent: std::env::var("SKIFF_TEST_CGROUP").unwrap(),
        })
        .unwrap();
        let id = runtime
            .create(
                None,
                sh("survivor", "while true; do echo tick; sleep 0.1; done"),
                state.join("logs/survivor.log"),
            )
            .await
            .unwrap();
        runtime.start(&id).await.unwrap();
        println!("CONTAINER-ID={id}");
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_devices_sysctls_host_pid_and_image_in_use() {
    let t = TestRuntime::new();
    // CAP_SYS_ADMIN allows mount; the RuntimeDefault profile still refuses it.
    let script = "mkdir -p /m; mount -t tmpfs t /m && echo mounted || echo blocked";
    let mut cfg = sh("unconfined", script);
    cfg.cap_add = vec!["SYS_ADMIN".into()];
    let (_, lines) = run_to_end(&t, cfg.clone()).await;
    assert!(lines.iter().any(|l| l.2 == "mounted"), "{lines:?}");
    cfg.name = "seccomp".into();
    cfg.seccomp_runtime_default = true;
    let (_, lines) = run_to_end(&t, cfg).await;
    assert!(lines.iter().any(|l| l.2 == "blocked"), "{lines:?}");
    // A host device appears under its container path and may be written.
    let mut cfg = sh("dev", "echo hi > /dev/xnull && echo wrote-device");
    cfg.devices = vec![skiff_runtime::Device {
        host_path: "/dev/null".into(),
        container_path: Some("/dev/xnull".into()),
        permissions: None,
    }];
    let (_, lines) = run_to_end(&t, cfg).await;
    assert!(lines.iter().any(|l| l.2 == "wrote-device"), "{lines:?}");
    // Namespaced sysctls are set.
    let mut cfg = sh(
        "sysctl",
        "cat /proc/sys/net/ipv4/ip_unprivileged_port_start",
    );
    cfg.sysctls
        .insert("net.ipv4.ip_unprivileged_port_start".into(), "80".into());
    let (_, lines) = run_to_end(&t, cfg).await;
    assert_eq!(
        lines.iter().find(|l| l.0 == "stdout").map(|l| l.2.as_str()),
        Some("80"),
        "{lines:?}"
    );
    // hostPID sees the host's pid 1; otherwise pid 1 is the container's own shell.
    let host_init = std::fs::read_to_string("/proc/1/comm")
        .unwrap()
        .trim()
        .to_string();
    let mut cfg = sh("hostpid", "cat /proc/1/comm");
    cfg.host_pid = true;
    let (_, lines) = run_to_end(&t, cfg).await;
    assert_eq!(
        lines.iter().find(|l| l.0 == "stdout").map(|l| l.2.clone()),
        Some(host_init),
        "{lines:?}"
    );
    let (_, lines) = run_to_end(&t, sh("ownpid", "echo $(cat /proc/1/comm)")).await;
    assert_eq!(
        lines.iter().find(|l| l.0 == "stdout").map(|l| l.2.as_str()),
        Some("sh"),
        "{lines:?}"
    );
    // The image cannot be removed while containers use it.
    let e = t.rt.remove_image(TEST_IMAGE).await.unwrap_err().to_string();
    assert!(e.contains("is used by container"), "{e}");
    for c in t.rt.list().await.unwrap() {
        t.rt.remove(&c.id).await.unwrap();
    }
    let images = skiff_runtime::ImageStore::open(t.dir.path().join("images")).unwrap();
    assert!(images.disk_usage() > 0);
    assert!(t.rt.remove_image(TEST_IMAGE).await.unwrap());
    // Its blobs and unpacked layers are gone with it (the space is given back).
    assert_eq!(images.disk_usage(), 0, "image data left after removal");
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_reaches_httpd_in_the_pod() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestRuntime::new();
    let sb =
        t.rt.create_sandbox(SandboxConfig {
            name: "web".into(),
            hostname: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let cfg = sh(
        "httpd",
        "mkdir -p /www && echo hello-http > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    let id =
        t.rt.create(Some(&sb.id), cfg, t.log("httpd"))
            .await
            .unwrap();
    t.rt.start(&id).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        match t.rt.port_forward(&sb.id, 8080).await {
            Ok(mut s) => {
                s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                break String::from_utf8_lossy(&buf).to_string();
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("port-forward never connected: {e}"),
        }
    };
    assert!(
        body.starts_with("HTTP/1.") && body.contains("hello-http"),
        "{body}"
    );
    // A port nothing listens on inside the pod is refused (the connection really is in the pod).
    let e =
        t.rt.port_forward(&sb.id, 8081)
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("refused"), "{e}");
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_groups_and_cpu_limits() {
    let t = TestRuntime::new();
    let host = t.dir.path().join("shared");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("from-host"), "hi\n").unwrap();
    let mut cfg = sh(
        "mounts",
        "cat /ro/from-host; echo x > /ro/new 2>/dev/null && echo ro-written || echo ro-refused; \
         echo y > /rw/new && echo rw-written; echo z > /scratch/f && grep -q ' /scratch tmpfs' /proc/mounts && echo tmpfs-ok; \
         id -G; sleep 1000",
    );
    cfg.mounts = vec![
        skiff_runtime::Mount {
            kind: skiff_runtime::MountKind::Bind,
            source: host.clone(),
            destination: "/ro".into(),
            readonly: true,
        },
        skiff_runtime::Mount {
            kind: skiff_runtime::MountKind::Bind,
            source: host.clone(),
            destination: "/rw".into(),
            readonly: false,
        },
        skiff_runtime::Mount {
            kind: skiff_runtime::MountKind::Tmpfs,
            source: Default::default(),
            destination: "/scratch".into(),
            readonly: false,
        },
    ];
    cfg.run_as_user = Some(0);
    cfg.supplementary_groups = vec![4242];
    cfg.resources = Resources {
        cpu_shares: Some(512),
        cpu_quota: Some(50_000),
        cpu_period: Some(100_000),
        ..Default::default()
    };
    let log = t.log("mounts");
    let id = t.rt.create(None, cfg, log.clone()).await.unwrap();
    t.rt.start(&id).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while std::time::Instant::now() < deadline {
        lines = log_lines(&log);
        if lines.iter().filter(|l| l.0 == "stdout").count() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out: Vec<&str> = lines
        .iter()
        .filter(|l| l.0 == "stdout")
        .map(|l| l.2.as_str())
        .collect();
    assert_eq!(
        &out[..5],
        ["hi", "ro-refused", "rw-written", "tmpfs-ok", "0 4242"],
        "{lines:?}"
    );
    assert!(
        host.join("new").exists(),
        "the rw bind mount writes through to the host"
    );
    // The limits are in the container's cgroup (read from the host).
    let cg = t.rt.cgroup_of(&id).unwrap();
    let cpu = std::path::Path::new("/sys/fs/cgroup/cpu").join(cg.trim_start_matches('/'));
    if cpu.exists() {
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.shares"))
                .unwrap()
                .trim(),
            "512"
        );
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
                .unwrap()
                .trim(),
            "50000"
        );
    } else {
        let v2 = std::path::Path::new("/sys/fs/cgroup").join(cg.trim_start_matches('/'));
        assert_eq!(
            std::fs::read_to_string(v2.join("cpu.max")).unwrap().trim(),
            "50000 100000"
        );
    }
    let st = t.rt.stop(&id, Duration::ZERO).await.unwrap();
    assert_eq!(st.state, ContainerState::Exited);
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_gc_keeps_images_in_use_and_frees_the_rest() {
    let t = TestRuntime::new();
    let store = t.rt.images().clone();
    // A second image with its own layer.
    let extra = layer_tar(&[E::File("only-here".into(), vec![7u8; 100_000], 0o644)]);
    let p = t.dir.path().join("extra.tar");
    std::fs::write(
        &p,
        oci_layout(
            "skiff.local/extra:v1",
            &[Blob {
                media_type: "application/vnd.oci.image.layer.v1.tar",
                data: extra,
            }],
        ),
    )
    .unwrap();
    store.import(&p, None).unwrap();
    store
        .unpacked_layers(&store.resolve("skiff.local/extra:v1").unwrap())
        .unwrap();
    let id =
        t.rt.create(None, sh("user", "true"), t.log("user"))
            .await
            .unwrap();
    let before = store.disk_usage();
    // High-water mark 0%: always collect; low-water 0%: collect everything unused.
    let removed = t.rt.gc_images(0, 0).await.unwrap();
    assert_eq!(removed, vec!["skiff.local/extra:v1".to_string()]);
    assert!(
        store.disk_usage() + 100_000 <= before,
        "the unused image's data is gone"
    );
    assert!(store.resolve(TEST_IMAGE).is_ok(), "the image in use stays");
    // Untagged but in use: its blobs survive a collection.
    store.untag(TEST_IMAGE).unwrap();
    store
        .gc(&t.rt.image_digests_in_use().await.unwrap())
        .unwrap();
    t.rt.start(&id).await.unwrap();
    assert_eq!(
        t.rt.wait(&id, Duration::from_secs(20))
            .await
            .unwrap()
            .exit_code,
        Some(0)
    );
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_sandbox_shares_the_host_netns() {
    let t = TestRuntime::new();
    let cfg = SandboxConfig {
        name: "hostnet".into(),
        hostname: "hn".into(),
        host_network: true,
        host_ipc: true,
    };
    let sb = t.rt.create_sandbox(cfg).await.unwrap();
    assert!(sb.netns.is_none() && sb.ipcns.is_none());
    let id =
        t.rt.create(Some(&sb.id), sh("h", "sleep 1000"), t.log("h"))
            .await
            .unwrap();
    t.rt.start(&id).await.unwrap();
    let pid = t.rt.status(&id).await.unwrap().pid.unwrap();
    for ns in ["net", "ipc"] {
        let c = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_eq!(
            c,
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns}"
        );
    }
    let uts = std::fs::read_link(format!("/proc/{pid}/ns/uts")).unwrap();
    assert_ne!(
        uts,
        std::fs::read_link("/proc/self/ns/uts").unwrap(),
        "the pod keeps its own hostname"
    );
    let e = t.rt.port_forward(&sb.id, 80).await.unwrap_err().to_string();
    assert!(e.contains("host network"), "{e}");
    t.rt.remove_sandbox(&sb.id).await.unwrap();
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_rotation_and_graceful_stop() {
    let t = TestRuntime::new();
    let log = t.log("rot");
    let cfg = sh(
        "rot",
        "trap 'echo bye; exit 0' TERM; while true; do echo tick; sleep 0.05; done",
    );
    let id = t.rt.create(None, cfg, log.clone()).await.unwrap();
    t.rt.start(&id).await.unwrap();
    let has_tick = |p: &std::path::Path| log_lines(p).iter().any(|l| l.2 == "tick");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !has_tick(&log) && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    t.rt.reopen_log(&id).await.unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !has_tick(&log) && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(has_tick(&log), "new lines go to the new file");
    assert!(log_lines(&rotated).iter().any(|l| l.2 == "tick"));
    // The container handles SIGTERM: it exits 0 within the grace period, no SIGKILL.
    let t0 = std::time::Instant::now();
    let st = t.rt.stop(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.exit_code, Some(0), "{st:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(log_lines(&log).iter().any(|l| l.2 == "bye"));
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_whose_shim_died_is_killed_and_cleaned_up_on_remove() {
    let t = TestRuntime::new();
    let id =
        t.rt.create(None, sh("orphan", "sleep 1000"), t.log("orphan"))
            .await
            .unwrap();
    t.rt.start(&id).await.unwrap();
    let st = skiff_runtime::shim::read_state(&t.rt.container_dir(&id)).unwrap();
    let pid = st.pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st.shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while t.rt.status(&id).await.unwrap().state != ContainerState::Unknown
        && std::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        t.rt.status(&id).await.unwrap().state,
        ContainerState::Unknown
    );
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the container outlives its shim"
    );
    t.rt.remove(&id).await.unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
        && std::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "container process must be gone: {stat}"
    );
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_as_the_container_user_and_with_a_tty() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestRuntime::new();
    let mut cfg = sh("u", "sleep 1000");
    cfg.run_as_user = Some(1000);
    cfg.working_dir = Some("/tmp".into());
    let id = t.rt.create(None, cfg, t.log("u")).await.unwrap();
    t.rt.start(&id).await.unwrap();
    let out =
        t.rt.exec(
            &id,
            vec![
                "sh".into(),
                "-c".into(),
                "id -u; pwd; test -t 0 && echo tty || echo no-tty".into(),
            ],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1000\n/tmp\nno-tty\n");
    let mut p =
        t.rt.exec_stream(
            &id,
            vec![
                "sh".into(),
                "-c".into(),
                "test -t 0 && echo is-a-tty; read x; stty size; exit 3".into(),
            ],
            true,
        )
        .await
        .unwrap();
    let mut stdout = p.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("is-a-tty") && std::time::Instant::now() < until
    {
        let n = tokio::time::timeout(Duration::from_secs(10), stdout.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    p.resize(33, 101).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.stdin.as_mut().unwrap().write_all(b"go\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stdout.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    seen.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("is-a-tty") && text.contains("33 101"),
        "{text:?}"
    );
    assert_eq!(p.wait().await.unwrap(), 3);
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_streams_output_and_feeds_stdin() {
    let t = TestRuntime::new();
    let mut cfg = sh("att", "read x; echo got-$x; echo to-err >&2");
    cfg.stdin = true;
    cfg.stdin_once = true;
    let log = t.log("att");
    let id = t.rt.create(None, cfg, log.clone()).await.unwrap();
    t.rt.start(&id).await.unwrap();
    let mut a = t.rt.attach(&id).await.unwrap();
    a.write_stdin(b"hi\n").await.unwrap();
    a.close_stdin().await.unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some((which, data)) = tokio::time::timeout(Duration::from_secs(20), a.next())
        .await
        .unwrap()
        .unwrap()
    {
        match which {
            skiff_runtime::AttachStream::Stdout => out.extend(data),
            skiff_runtime::AttachStream::Stderr => err.extend(data),
        }
    }
    assert_eq!(
        (
            String::from_utf8_lossy(&out).as_ref(),
            String::from_utf8_lossy(&err).as_ref()
        ),
        ("got-hi\n", "to-err\n")
    );
    let st = t.rt.wait(&id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.exit_code, Some(0));
    assert!(
        log_lines(&log).iter().any(|l| l.2 == "got-hi"),
        "the log has it too"
    );
    t.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_with_a_tty_logs_attaches_and_resizes() {
    let t = TestRuntime::new();
    let mut cfg = sh(
        "tty",
        "test -t 1 && echo tty-ok; read x; stty size; echo got-$x",
    );
    cfg.tty = true;
    cfg.stdin = true;
    let log = t.log("tty");
    let id = t.rt.create(None, cfg, log.clone()).await.unwrap();
    t.rt.start(&id).await.unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !log_lines(&log).iter().any(|l| l.2.starts_with("tty-ok"))
        && std::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        log_lines(&log)
            .iter()
            .any(|l| l.0 == "stdout" && l.2.starts_with("tty-ok")),
        "{:?}",
        log_lines(&log)
    );
    t.rt.resize(&id, 33, 101).await.unwrap();
    let mut a = t.rt.attach(&id).await.unwrap();
    a.write_stdin(b"go\n").await.unwrap();
    let mut out = Vec::new();
    while let Some((_, data)) = tokio::time::timeout(Duration::from_secs(20), a.next())
        .await
        .unwrap()
        .unwrap()
    {
        out.extend(data);
    }
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("33 101") && text.contains("got-go"),
        "{text:?}"
    );
    assert_eq!(
        t.rt.wait(&id, Duration::from_secs(20))
            .await
            .unwrap()
            .exit_code,
        Some(0)
    );
    t.teardown().await;
}

/// Device and inode of a namespace (as `stat` on its pin or on `/proc/PID/ns/X` shows them).
fn ns_id(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.dev(), m.ino())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_joins_its_own_pods_namespaces_and_its_shim_stays_in_the_host_mount_namespace()
{
    let t = TestRuntime::new();
    let mut sbs = Vec::new();
    for name in ["pod-a", "pod-b"] {
        sbs.push(
            t.rt.create_sandbox(SandboxConfig {
                name: name.into(),
                hostname: format!("{name}-host"),
                ..Default::default()
            })
            .await
            .unwrap(),
        );
    }
    // The sandboxes dir is a private mount of its own, holding every pod's pins.
    let sandboxes = t.dir.path().join("rt/sandboxes");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(sandboxes.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not a mount point:\n{info}", sandboxes.display()));
    assert!(
        !line.contains("shared:") && !line.contains("master:"),
        "the sandboxes mount must be private: {line}"
    );
    // A container of pod B: created from the shim's own mount namespace, without pod A's pins.
    let b = &sbs[1];
    let id =
        t.rt.create(Some(&b.id), sh("app", "sleep 1000"), t.log("app"))
            .await
            .unwrap();
    t.rt.start(&id).await.unwrap();
    let pid = t.rt.status(&id).await.unwrap().pid.unwrap();
    let proc_ns = |n: &str| ns_id(std::path::Path::new(&format!("/proc/{pid}/ns/{n}")));
    assert_eq!(
        proc_ns("net"),
        ns_id(b.netns.as_ref().unwrap()),
        "pod B's netns"
    );
    assert_eq!(proc_ns("uts"), ns_id(&b.utsns), "pod B's uts ns");
    assert_eq!(
        proc_ns("ipc"),
        ns_id(b.ipcns.as_ref().unwrap()),
        "pod B's ipc ns"
    );
    assert_ne!(proc_ns("net"), ns_id(sbs[0].netns.as_ref().unwrap()));
    let out =
        t.rt.exec(&id, vec!["hostname".into()], Duration::from_secs(20))
            .await
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pod-b-host");
    // The host keeps every pin; the shim went back to the host's mount namespace.
    for sb in &sbs {
        for p in [
            sb.netns.clone().unwrap(),
            sb.utsns.clone(),
            sb.ipcns.clone().unwrap(),
        ] {
            assert!(
                skiff_runtime::sandbox::is_mounted(&p),
                "{} pinned",
                p.display()
            );
        }
    }
    let st =
        skiff_runtime::shim::read_state(&t.dir.path().join("rt/containers").join(&id)).unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/ns/mnt", st.shim_pid)).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "the shim holds no mount namespace of its own"
    );
    t.rt.remove(&id).await.unwrap();
    for sb in &sbs {
        t.rt.remove_sandbox(&sb.id).await.unwrap();
    }
    t.teardown().await;
}

/// Pids of live processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(needle)
            && !stat.contains(") Z ")
        {
            out.push(pid);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shims_are_forked_by_one_zygote_that_is_restarted_when_gone_and_ends_with_the_runtime() {
    let t = TestRuntime::new();
    let zygote = format!("zygote --root {}", t.dir.path().join("rt").display());
    let run = async |name: &str| {
        let id =
            t.rt.create(None, sh(name, "sleep 30"), t.log(name))
                .await
                .unwrap();
        t.rt.start(&id).await.unwrap();
        let st = skiff_runtime::shim::read_state(&t.rt.container_dir(&id)).unwrap();
        let cmd = std::fs::read(format!("/proc/{}/cmdline", st.shim_pid)).unwrap();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        assert!(
            cmd.contains(&format!(" create --id {id} ")),
            "a forked shim shows its create arguments: {cmd:?}"
        );
        id
    };
    let a = run("a").await;
    let first = pids_with(&zygote);
    assert_eq!(first.len(), 1, "one zygote after the first creation");
    let b = run("b").await;
    assert_eq!(pids_with(&zygote), first, "the zygote is reused");

    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(first[0], libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(100));
    let c = run("c").await;
    let second = pids_with(&zygote);
    assert_eq!(second.len(), 1, "a new zygote replaces the killed one");
    assert_ne!(second, first);
    for id in [&a, &b, &c] {
        assert_eq!(
            t.rt.status(id).await.unwrap().state,
            ContainerState::Running,
            "{id} runs, whichever zygote forked its shim"
        );
        t.rt.remove(id).await.unwrap();
    }
    let rt_dir = t.dir.path().to_path_buf();
    drop(t);
    assert!(
        pids_with(&format!("zygote --root {}", rt_dir.join("rt").display())).is_empty(),
        "the zygote ends with the runtime"
    );
}
