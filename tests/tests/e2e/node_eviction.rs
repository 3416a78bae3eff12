//! Node-pressure eviction on a real node: the data dir sits on a small tmpfs, a pod fills its
//! emptyDir past `--kubelet-arg eviction-hard=nodefs.available<50%`, and the kubelet reports
//! DiskPressure (the node gets the disk-pressure NoSchedule taint), deletes unused images, evicts
//! the pod (Failed/Evicted, volumes removed), refuses new pods while the condition holds, and
//! clears it afterwards; with soft thresholds it evicts only after the grace period and lets the
//! pod stop on SIGTERM. Named `node_*`: runs alone (it uses the host's cni0).

use std::path::{Path, PathBuf};
use std::process::Command;

use skiff_e2e::{Kubectl, Server, skiff_binary};

use crate::node_pods::{node_server_with, require_root, wait_until};

fn image_tar(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../build/images/{name}.tar"));
    assert!(
        p.exists(),
        "{} is missing: run `make images` first (make test does)",
        p.display()
    );
    p
}

/// Imports the test images into the (not yet started) node's data dir.
fn import_images(data: &Path, names: &[&str]) {
    for img in names {
        let st = Command::new(skiff_binary())
            .args(["images", "--data-dir"])
            .arg(data)
            .arg("import")
            .arg(image_tar(img))
            .status()
            .expect("skiff images import");
        assert!(st.success(), "skiff images import {img} failed");
    }
}

/// A tmpfs mounted on a fresh dir; unmounted (lazily, after the server's own cleanup) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("skiff-evict-e2e-")
            .tempdir_in("/tmp")
            .expect("tempdir")
            .keep();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs on {} failed", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn node_condition(k: &Kubectl, kind: &str) -> String {
    k.ok(&[
        "get",
        "node",
        "skiff-e2e",
        "-o",
        &format!("jsonpath={{.status.conditions[?(@.type==\"{kind}\")].status}}"),
    ])
}

/// The MiB in an eviction message's "was using 150Mi" (0 if there is none).
fn used_mib(msg: &str) -> u64 {
    msg.split("was using ")
        .nth(1)
        .and_then(|r| r.split("Mi").next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}

fn taints(k: &Kubectl) -> String {
    k.ok(&[
        "get",
        "node",
        "skiff-e2e",
        "-o",
        "jsonpath={.spec.taints[*].key}",
    ])
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: keeper}
spec:
  nodeName: skiff-e2e
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sleep", "3600"]
    resources:
      requests: {cpu: 10m, memory: 16Mi, ephemeral-storage: 50Mi}
---
apiVersion: v1
kind: Pod
metadata: {name: filler}
spec:
  nodeName: skiff-e2e
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sh", "-c", "dd if=/dev/zero of=/scratch/fill bs=1M count=75 && dd if=/dev/zero of=/fill bs=1M count=75 && sleep 3600"]
    volumeMounts: [{name: scratch, mountPath: /scratch}]
  volumes:
  - name: scratch
    emptyDir: {}
"#;

const LATE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: late}
spec:
  nodeName: skiff-e2e
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sleep", "3600"]
"#;

const SCHEDULED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: scheduled}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sleep", "3600"]
"#;

#[test]
fn node_disk_pressure_reclaims_images_evicts_the_biggest_user_and_refuses_new_pods() {
    require_root();
    let fs = Tmpfs::mount("256M");
    let data = tempfile::TempDir::with_prefix_in("data-", &fs.0).expect("data dir on the tmpfs");
    import_images(data.path(), &["busybox", "nginx"]);
    let server = Server::start_with_agent(
        data,
        &[
            "--kubelet-arg",
            "eviction-hard=nodefs.available<50%",
            "--kubelet-arg",
            "eviction-pressure-transition-period=20s",
            "--kubelet-arg",
            "minimum-image-ttl-duration=0s",
            "--kubelet-arg",
            "housekeeping-interval=2s",
        ],
    );
    let k = Kubectl::new(Some("1.33"), &server);
    wait_until("node skiff-e2e Ready", 60, || {
        node_condition(&k, "Ready") == "True"
    });
    assert_eq!(node_condition(&k, "DiskPressure"), "False");
    let images = || {
        k.ok(&[
            "get",
            "node",
            "skiff-e2e",
            "-o",
            "jsonpath={.status.images[*].names}",
        ])
    };
    wait_until("both images listed in the node status", 60, || {
        let i = images();
        i.contains("busybox") && i.contains("nginx")
    });

    k.ok_stdin(&["apply", "-f", "-"], PODS);
    wait_until("keeper and filler Running", 90, || {
        k.ok(&[
            "get",
            "pods",
            "keeper",
            "filler",
            "-o",
            "jsonpath={.items[*].status.phase}",
        ]) == "Running Running"
    });

    // The filler crosses the threshold: DiskPressure, the taint, the unused image goes, and
    // the filler (over its zero request) is evicted while the keeper stays.
    wait_until("filler evicted", 120, || {
        k.ok(&["get", "pod", "filler", "-o", "jsonpath={.status.reason}"]) == "Evicted"
    });
    let phase = k.ok(&["get", "pod", "filler", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Failed");
    let msg = k.ok(&["get", "pod", "filler", "-o", "jsonpath={.status.message}"]);
    assert!(
        msg.contains("The node was low on resource: ephemeral-storage. Threshold quantity: 50%"),
        "eviction message: {msg}"
    );
    // Its emptyDir and what it wrote into its root filesystem (the writable layer) both count.
    assert!(
        used_mib(&msg) >= 140,
        "the filler wrote 75 MiB to an emptyDir and 75 MiB to its rootfs: {msg}"
    );
    let described = k.ok(&["describe", "pod", "filler"]);
    assert!(
        described
            .lines()
            .any(|l| l.starts_with("Reason:") && l.contains("Evicted")),
        "kubectl describe pod filler shows:\n{described}"
    );
    let events = k.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=filler,reason=Evicted",
        "-o",
        "name",
    ]);
    assert!(!events.is_empty(), "no Evicted event for the filler");
    assert_eq!(
        k.ok(&["get", "pod", "keeper", "-o", "jsonpath={.status.phase}"]),
        "Running",
        "the keeper (within its request) must not be evicted"
    );
    // The node status lists images as of its last write (every 10 s at most).
    wait_until("nginx (unused) deleted, busybox (used) kept", 30, || {
        let i = images();
        !i.contains("nginx") && i.contains("busybox")
    });
    assert_eq!(node_condition(&k, "DiskPressure"), "True");

    // While the condition holds (20 s transition period), new pods are refused...
    k.ok_stdin(&["apply", "-f", "-"], LATE);
    wait_until("late refused", 30, || {
        k.ok(&["get", "pod", "late", "-o", "jsonpath={.status.reason}"]) == "Evicted"
    });
    let msg = k.ok(&["get", "pod", "late", "-o", "jsonpath={.status.message}"]);
    assert!(
        msg.contains("The node had condition: [DiskPressure]"),
        "refusal message: {msg}"
    );
    let table = k.ok(&["get", "pod", "late"]);
    assert!(
        table.contains("Evicted"),
        "kubectl get pod late shows:\n{table}"
    );
    assert!(
        taints(&k).contains("node.kubernetes.io/disk-pressure"),
        "no disk-pressure taint: {}",
        taints(&k)
    );

    // ... and once the space is back the condition and the taint go, and scheduling resumes.
    wait_until("DiskPressure False", 90, || {
        node_condition(&k, "DiskPressure") == "False"
    });
    wait_until("disk-pressure taint removed", 30, || {
        !taints(&k).contains("disk-pressure")
    });
    k.ok_stdin(&["apply", "-f", "-"], SCHEDULED);
    wait_until("scheduled pod Running", 90, || {
        k.ok(&["get", "pod", "scheduled", "-o", "jsonpath={.status.phase}"]) == "Running"
    });
    drop(server);
}

const SOFT_FILLER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: soft-filler}
spec:
  nodeName: skiff-e2e
  terminationGracePeriodSeconds: 60
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sh", "-c", "trap 'exit 0' TERM; dd if=/dev/zero of=/scratch/fill bs=1M count=150; while true; do sleep 1; done"]
    volumeMounts: [{name: scratch, mountPath: /scratch}]
  volumes:
  - name: scratch
    emptyDir: {}
"#;

/// Soft thresholds (`eviction-soft` + `eviction-soft-grace-period`): the condition comes at once,
/// the eviction only after the grace period, and the pod gets SIGTERM with
/// `eviction-max-pod-grace-period` to stop (its trap exits 0; a hard eviction kills it: 137).
#[test]
fn node_soft_disk_pressure_evicts_after_the_grace_period_and_lets_the_pod_stop() {
    require_root();
    let fs = Tmpfs::mount("256M");
    let data = tempfile::TempDir::with_prefix_in("data-", &fs.0).expect("data dir on the tmpfs");
    import_images(data.path(), &["busybox"]);
    let server = Server::start_with_agent(
        data,
        &[
            "--kubelet-arg",
            "eviction-hard=nodefs.available<1%",
            "--kubelet-arg",
            "eviction-soft=nodefs.available<50%",
            "--kubelet-arg",
            "eviction-soft-grace-period=nodefs.available=25s",
            "--kubelet-arg",
            "eviction-max-pod-grace-period=20",
            "--kubelet-arg",
            "eviction-pressure-transition-period=5s",
            "--kubelet-arg",
            "housekeeping-interval=1s",
        ],
    );
    let k = Kubectl::new(Some("1.33"), &server);
    wait_until("node skiff-e2e Ready", 60, || {
        node_condition(&k, "Ready") == "True"
    });
    assert_eq!(node_condition(&k, "DiskPressure"), "False");
    k.ok_stdin(&["apply", "-f", "-"], SOFT_FILLER);
    // The node status is written at most every 10 s (as the kubelet's), so the condition shows
    // within ~10 s of the threshold being met, well inside the 25 s grace period.
    wait_until("DiskPressure True", 120, || {
        node_condition(&k, "DiskPressure") == "True"
    });
    let pressure_seen = std::time::Instant::now();
    assert_eq!(
        k.ok(&[
            "get",
            "pod",
            "soft-filler",
            "-o",
            "jsonpath={.status.phase}"
        ]),
        "Running",
        "a soft threshold must not evict before its grace period"
    );
    wait_until("soft-filler evicted", 60, || {
        k.ok(&[
            "get",
            "pod",
            "soft-filler",
            "-o",
            "jsonpath={.status.reason}",
        ]) == "Evicted"
    });
    let waited = pressure_seen.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(10),
        "evicted {waited:?} after DiskPressure was seen; the soft grace period is 25 s"
    );
    let msg = k.ok(&[
        "get",
        "pod",
        "soft-filler",
        "-o",
        "jsonpath={.status.message}",
    ]);
    assert!(
        msg.contains("The node was low on resource: ephemeral-storage. Threshold quantity: 50%"),
        "eviction message: {msg}"
    );
    let code = k.ok(&[
        "get",
        "pod",
        "soft-filler",
        "-o",
        "jsonpath={.status.containerStatuses[0].state.terminated.exitCode}",
    ]);
    assert_eq!(
        code, "0",
        "the container should have stopped on SIGTERM within the eviction grace period"
    );
    wait_until("DiskPressure False again", 90, || {
        node_condition(&k, "DiskPressure") == "False"
    });
    drop(server);
}

const MEMORY_HOG: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  nodeName: skiff-e2e
  terminationGracePeriodSeconds: 30
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sh", "-c", "dd if=/dev/zero of=/mem/fill bs=1M count=48 && echo filled && sleep 3600"]
    resources:
      requests: {cpu: 10m, memory: 16Mi}
    volumeMounts: [{name: mem, mountPath: /mem}]
  volumes:
  - name: mem
    emptyDir: {medium: Memory, sizeLimit: 64Mi}
"#;

const BURSTABLE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: burstable}
spec:
  nodeName: skiff-e2e
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sleep", "3600"]
    resources:
      requests: {cpu: 10m, memory: 16Mi}
"#;

/// Memory pressure, with a hard threshold above what any machine has so that it holds from the
/// start: MemoryPressure and its taint; a pod using more memory than it requested (48 MiB in a
/// memory-backed emptyDir, request 16Mi) is evicted at once, whatever its grace period, with the
/// kubelet's message; new BestEffort pods are refused while Burstable ones are still admitted.
#[test]
fn node_memory_pressure_evicts_a_pod_over_its_request_and_refuses_best_effort_pods() {
    let server = node_server_with(&[
        "--kubelet-arg",
        "eviction-hard=memory.available<100Ti,nodefs.available<1%,imagefs.available<1%",
        "--kubelet-arg",
        "housekeeping-interval=2s",
    ]);
    let k = Kubectl::new(Some("1.33"), &server);
    wait_until("node skiff-e2e Ready", 60, || {
        node_condition(&k, "Ready") == "True"
    });
    wait_until("MemoryPressure True", 30, || {
        node_condition(&k, "MemoryPressure") == "True"
    });
    wait_until("memory-pressure taint", 30, || {
        taints(&k).contains("node.kubernetes.io/memory-pressure")
    });
    assert_eq!(node_condition(&k, "DiskPressure"), "False");

    k.ok_stdin(&["apply", "-f", "-"], MEMORY_HOG);
    wait_until("hog evicted", 90, || {
        k.ok(&["get", "pod", "hog", "-o", "jsonpath={.status.reason}"]) == "Evicted"
    });
    assert_eq!(
        k.ok(&["get", "pod", "hog", "-o", "jsonpath={.status.phase}"]),
        "Failed"
    );
    let msg = k.ok(&["get", "pod", "hog", "-o", "jsonpath={.status.message}"]);
    assert!(
        msg.contains("The node was low on resource: memory. Threshold quantity: 100Ti")
            && msg.contains("Container main was using")
            && msg.contains("request is 16Mi"),
        "eviction message: {msg}"
    );
    // It was evicted for the 48 MiB it wrote, not before.
    assert!(used_mib(&msg) >= 40, "eviction message: {msg}");

    // BestEffort pods are refused while the condition holds...
    k.ok_stdin(&["apply", "-f", "-"], LATE);
    wait_until("late (BestEffort) refused", 30, || {
        k.ok(&["get", "pod", "late", "-o", "jsonpath={.status.reason}"]) == "Evicted"
    });
    let msg = k.ok(&["get", "pod", "late", "-o", "jsonpath={.status.message}"]);
    assert!(
        msg.contains("The node had condition: [MemoryPressure]"),
        "refusal message: {msg}"
    );
    // ... Burstable ones are admitted (the lasting pressure may evict them later, for memory).
    k.ok_stdin(&["apply", "-f", "-"], BURSTABLE);
    wait_until("burstable admitted", 60, || {
        let status = k.ok(&[
            "get",
            "pod",
            "burstable",
            "-o",
            "jsonpath={.status.phase} {.status.message}",
        ]);
        assert!(
            !status.contains("had condition"),
            "a Burstable pod was refused under memory pressure: {status}"
        );
        status.starts_with("Running") || status.contains("low on resource: memory")
    });
    drop(server);
}
