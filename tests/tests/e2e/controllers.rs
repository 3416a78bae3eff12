//! Scheduler and controllers end to end: `skiff server --disable-agent` plus hollow nodes
//! (`skiff-bench hollow-nodes`), driven with real kubectl: Deployment rollouts, scaling, undo,
//! cascading deletion, namespace deletion, node failure and FailedScheduling; leader election and
//! failover of the scheduler and controllers between servers sharing one etcd.
#![allow(clippy::unwrap_used)] // scenario helpers outside #[test] functions may unwrap

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skiff_e2e::{ChildGuard, Etcd, Kubectl, Server};

/// Builds `skiff-bench` into the test's target dir and returns its path.
fn bench_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let target = profile_dir.parent().unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "skiff-bench",
        "--bin",
        "skiff-bench",
        "--manifest-path",
    ])
    .arg(&manifest)
    .env("CARGO_TARGET_DIR", &target);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().unwrap().success(),
        "cargo build -p skiff-bench failed"
    );
    profile_dir.join("skiff-bench")
}

/// One hollow-nodes process (killed on drop: its leases stop, as a node losing power).
fn hollow(server: &Server, prefix: &str, count: usize) -> ChildGuard {
    let mut child = Command::new(bench_binary())
        .args([
            "hollow-nodes",
            "--count",
            &count.to_string(),
            "--prefix",
            prefix,
            "--renew-seconds",
            "2",
        ])
        .arg("--kubeconfig")
        .arg(&server.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(
        line.starts_with("hollow nodes ready"),
        "hollow-nodes said: {line:?}"
    );
    ChildGuard(child)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn deployment(name: &str, replicas: u32, image: &str, extra_pod_spec: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
        app: {name}
    spec:
{extra_pod_spec}
      containers:
      - name: main
        image: {image}
        resources:
          requests:
            cpu: 100m
"#
    )
}

/// Names of pods (not terminating) with label app=`app` in `ns`, with their node.
fn live_pods(k: &Kubectl, ns: &str, app: &str) -> Vec<(String, String)> {
    let out = k.ok(&[
        "get", "pods", "-n", ns, "-l", &format!("app={app}"), "-o",
        r#"jsonpath={range .items[?(@.metadata.deletionTimestamp)]}T {end}{"\n"}{range .items[*]}{.metadata.name}={.spec.nodeName}={.metadata.deletionTimestamp}{"\n"}{end}"#,
    ]);
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let mut p = l.split('=');
            let (name, node, del) = (p.next()?, p.next()?, p.next().unwrap_or(""));
            (del.is_empty() && !name.is_empty()).then(|| (name.to_string(), node.to_string()))
        })
        .collect()
}

fn count(k: &Kubectl, args: &[&str]) -> usize {
    k.ok(args).lines().filter(|l| !l.trim().is_empty()).count()
}

#[test]
fn deployment_rollout_scale_undo_and_cascading_delete() {
    let server = Server::start();
    let _nodes = hollow(&server, "hollow", 3);
    let k = Kubectl::new(None, &server);
    let k127 = Kubectl::new(Some("1.27"), &server);
    wait_for("3 nodes Ready", Duration::from_secs(30), || {
        k.ok(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}",
        ])
        .split_whitespace()
        .filter(|s| *s == "True")
        .count()
            == 3
    });
    // Every node got a pod CIDR.
    let cidrs = k.ok(&["get", "nodes", "-o", "jsonpath={.items[*].spec.podCIDR}"]);
    assert_eq!(cidrs.split_whitespace().count(), 3, "pod cidrs: {cidrs}");

    k.ok_stdin(
        &["apply", "-f", "-"],
        &deployment("web", 3, "busybox:1", ""),
    );
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert_eq!(
        k.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.status.availableReplicas}"
        ]),
        "3"
    );
    let nodes: std::collections::BTreeSet<String> = live_pods(&k, "default", "web")
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert!(
        nodes.iter().all(|n| n.starts_with("hollow-")),
        "pods on {nodes:?}"
    );

    // set image + rollout status.
    k.ok(&["set", "image", "deployment/web", "main=busybox:2"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let images = k.ok(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[*].spec.containers[0].image}",
    ]);
    wait_for("only busybox:2 pods", Duration::from_secs(30), || {
        live_pods(&k, "default", "web").len() == 3
            && k.ok(&[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[*].spec.containers[0].image}",
            ])
            .split_whitespace()
            .all(|i| i == "busybox:2")
    });
    let _ = images;
    assert_eq!(
        k.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
        ]),
        "2"
    );

    // rollout undo (client-side in kubectl >= 1.27) restores the first template.
    for kc in [&k127, &k] {
        kc.ok(&["rollout", "undo", "deployment/web"]);
        kc.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    }
    let img = k.ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(img, "busybox:2", "two undos go back and forth");
    k.ok(&["rollout", "undo", "deployment/web", "--to-revision=3"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert_eq!(
        k.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}"
        ]),
        "busybox:1"
    );
    let history = k.ok(&["rollout", "history", "deployment/web"]);
    assert!(history.contains("REVISION"), "{history}");

    // scale 0 and 5.
    k.ok(&["scale", "deployment/web", "--replicas=0"]);
    wait_for("no pods", Duration::from_secs(30), || {
        live_pods(&k, "default", "web").is_empty()
    });
    k.ok(&["scale", "deployment/web", "--replicas=5"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert_eq!(
        k.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.status.availableReplicas}"
        ]),
        "5"
    );

    // Background deletion removes ReplicaSets and pods.
    k.ok(&["delete", "deployment", "web"]);
    wait_for(
        "web's replica sets and pods gone",
        Duration::from_secs(30),
        || {
            count(&k, &["get", "rs", "-l", "app=web", "-o", "name"]) == 0
                && count(&k, &["get", "pods", "-l", "app=web", "-o", "name"]) == 0
        },
    );

    // Orphan keeps them.
    k.ok_stdin(
        &["apply", "-f", "-"],
        &deployment("orph", 2, "busybox:1", ""),
    );
    k.ok(&["rollout", "status", "deployment/orph", "--timeout=60s"]);
    k.ok(&["delete", "deployment", "orph", "--cascade=orphan"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&k, &["get", "rs", "-l", "app=orph", "-o", "name"]), 1);
    assert_eq!(live_pods(&k, "default", "orph").len(), 2);
    let owners = k.ok(&[
        "get",
        "rs",
        "-l",
        "app=orph",
        "-o",
        "jsonpath={.items[0].metadata.ownerReferences}",
    ]);
    assert!(
        owners.is_empty() || owners == "[]",
        "orphaned rs still owned: {owners}"
    );

    // Foreground: kubectl waits until the deployment is gone, which is after its children.
    k.ok_stdin(&["apply", "-f", "-"], &deployment("fg", 2, "busybox:1", ""));
    k.ok(&["rollout", "status", "deployment/fg", "--timeout=60s"]);
    k.ok(&[
        "delete",
        "deployment",
        "fg",
        "--cascade=foreground",
        "--timeout=60s",
    ]);
    assert_eq!(count(&k, &["get", "rs", "-l", "app=fg", "-o", "name"]), 0);
    assert_eq!(count(&k, &["get", "pods", "-l", "app=fg", "-o", "name"]), 0);

    // Namespace deletion removes everything in it.
    k.ok(&["create", "namespace", "scratch"]);
    k.ok_stdin(
        &["apply", "-n", "scratch", "-f", "-"],
        &deployment("inner", 2, "busybox:1", ""),
    );
    k.ok(&[
        "rollout",
        "status",
        "-n",
        "scratch",
        "deployment/inner",
        "--timeout=60s",
    ]);
    k.ok(&["delete", "namespace", "scratch", "--timeout=60s"]);
    wait_for("namespace gone", Duration::from_secs(60), || {
        !k.run(&["get", "namespace", "scratch"]).status.success()
    });
    assert_eq!(
        count(&k, &["get", "pods", "-A", "-l", "app=inner", "-o", "name"]),
        0
    );
}

#[test]
fn failed_scheduling_message() {
    let server = Server::start();
    let _nodes = hollow(&server, "small", 3);
    let k = Kubectl::new(None, &server);
    k.ok(&["run", "huge", "--image=busybox", "--overrides",
        r#"{"spec":{"containers":[{"name":"huge","image":"busybox","resources":{"requests":{"cpu":"100"}}}]}}"#]);
    wait_for("FailedScheduling event", Duration::from_secs(30), || {
        let ev = k.ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=huge",
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
        ]);
        ev.contains("FailedScheduling: 0/3 nodes are available: 3 Insufficient cpu.")
    });
}

#[test]
fn lost_node_is_tainted_and_its_pods_replaced() {
    let server = Server::start();
    let k = Kubectl::new(None, &server);
    let mut nodes: Vec<(String, Option<ChildGuard>)> = ["na", "nb", "nc"]
        .iter()
        .map(|p| (format!("{p}-0"), Some(hollow(&server, p, 1))))
        .collect();
    let tolerations = r#"      tolerations:
      - key: node.kubernetes.io/unreachable
        operator: Exists
        effect: NoExecute
        tolerationSeconds: 5
      - key: node.kubernetes.io/not-ready
        operator: Exists
        effect: NoExecute
        tolerationSeconds: 5"#;
    k.ok_stdin(
        &["apply", "-f", "-"],
        &deployment("survivor", 3, "busybox:1", tolerations),
    );
    k.ok(&["rollout", "status", "deployment/survivor", "--timeout=60s"]);
    let victim = live_pods(&k, "default", "survivor")[0].1.clone();
    let started = Instant::now();
    for (name, guard) in nodes.iter_mut() {
        if *name == victim {
            drop(guard.take());
        }
    }
    wait_for("victim NotReady", Duration::from_secs(60), || {
        k.ok(&[
            "get",
            "node",
            &victim,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ]) == "Unknown"
    });
    assert!(
        started.elapsed() <= Duration::from_secs(50),
        "NotReady after {:?}",
        started.elapsed()
    );
    wait_for(
        "unreachable NoExecute taint",
        Duration::from_secs(10),
        || {
            let taints = k.ok(&["get", "node", &victim, "-o", "jsonpath={.spec.taints}"]);
            taints.contains("node.kubernetes.io/unreachable") && taints.contains("NoExecute")
        },
    );
    wait_for(
        "3 replacement pods on live nodes",
        Duration::from_secs(60),
        || {
            let pods = live_pods(&k, "default", "survivor");
            pods.len() == 3 && pods.iter().all(|(_, n)| *n != victim)
        },
    );
    k.ok(&["rollout", "status", "deployment/survivor", "--timeout=60s"]);
}

/// Jobs, DaemonSets, StatefulSets and CronJobs with real kubectl: `kubectl wait
/// --for=condition=complete`, `kubectl rollout status ds/...` and `sts/...`, and a
/// `*/1 * * * *` CronJob that starts a Job within 70 s (hollow nodes finish pods labelled
/// `skiff.dev/hollow-exit=0`).
#[test]
fn workloads_job_daemonset_statefulset_cronjob() {
    let server = Server::start();
    let _nodes = hollow(&server, "wl", 3);
    let k = Kubectl::new(None, &server);
    wait_for("3 nodes Ready", Duration::from_secs(30), || {
        k.ok(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}",
        ])
        .split_whitespace()
        .filter(|s| *s == "True")
        .count()
            == 3
    });

    // A Job with completions=3 completes.
    k.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "pi"},
            "spec": {"completions": 3, "parallelism": 2, "template": {
                "metadata": {"labels": {"skiff.dev/hollow-exit": "0"}},
                "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "pi", "image": "busybox"}]}}}}"#,
    );
    k.ok(&[
        "wait",
        "--for=condition=complete",
        "job/pi",
        "--timeout=60s",
    ]);
    assert_eq!(
        k.ok(&["get", "job", "pi", "-o", "jsonpath={.status.succeeded}"]),
        "3"
    );

    // A DaemonSet lands on every node.
    k.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "a", "image": "busybox"}]}}}}"#,
    );
    k.ok(&["rollout", "status", "ds/agent", "--timeout=60s"]);
    let nodes: std::collections::BTreeSet<String> = live_pods(&k, "default", "agent")
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert_eq!(nodes.len(), 3, "one agent pod per node: {nodes:?}");

    // A StatefulSet creates web-0, web-1, web-2 and their PVCs.
    k.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "serviceName": "web",
                "selector": {"matchLabels": {"app": "web"}}, "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "w", "image": "busybox"}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}}}}]}}"#,
    );
    k.ok(&["rollout", "status", "sts/web", "--timeout=60s"]);
    let mut names: Vec<String> = live_pods(&k, "default", "web")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    assert_eq!(names, ["web-0", "web-1", "web-2"]);
    let pvcs = k.ok(&["get", "pvc", "-o", "jsonpath={.items[*].metadata.name}"]);
    for n in ["data-web-0", "data-web-1", "data-web-2"] {
        assert!(pvcs.contains(n), "pvc {n} in {pvcs}");
    }

    // A CronJob starts a scheduled Job within 70 s, and `kubectl create job --from=cronjob/...`
    // (kubectl 1.33 posts that Job as protobuf) starts one at once that runs to completion.
    k.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "tick"},
            "spec": {"schedule": "*/1 * * * *", "jobTemplate": {"spec": {"template": {
                "metadata": {"labels": {"skiff.dev/hollow-exit": "0"}},
                "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "t", "image": "busybox"}]}}}}}}"#,
    );
    k.ok(&["create", "job", "--from=cronjob/tick", "tick-now"]);
    wait_for(
        "the job from the cronjob completes",
        Duration::from_secs(60),
        || {
            k.ok(&[
                "get",
                "job",
                "tick-now",
                "-o",
                "jsonpath={.status.succeeded}",
            ]) == "1"
        },
    );
    assert_eq!(
        k.ok(&[
            "get",
            "job",
            "tick-now",
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
        ]),
        "CronJob/tick"
    );
    wait_for("a scheduled job", Duration::from_secs(70), || {
        k.ok(&["get", "jobs", "-o", "jsonpath={.items[*].metadata.name}"])
            .split_whitespace()
            .any(|n| n.starts_with("tick-") && n != "tick-now")
    });
    wait_for("lastScheduleTime", Duration::from_secs(10), || {
        !k.ok(&[
            "get",
            "cronjob",
            "tick",
            "-o",
            "jsonpath={.status.lastScheduleTime}",
        ])
        .is_empty()
    });
}

fn pdb_yaml(min_available: u32) -> String {
    format!(
        r#"apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: web
spec:
  minAvailable: {min_available}
  selector:
    matchLabels:
      app: web
"#
    )
}

/// A PodDisruptionBudget seen by `kubectl get pdb` and honoured by `kubectl drain` (through
/// pods/eviction), and the controller Events `kubectl describe` shows.
#[test]
fn pdb_blocks_drain_until_the_budget_allows_it() {
    let server = Server::start();
    let _nodes = hollow(&server, "pdb", 3);
    let k = Kubectl::new(None, &server);
    wait_for("3 nodes Ready", Duration::from_secs(30), || {
        k.ok(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}",
        ])
        .split_whitespace()
        .filter(|s| *s == "True")
        .count()
            == 3
    });
    k.ok_stdin(
        &["apply", "-f", "-"],
        &deployment("web", 3, "busybox:1", ""),
    );
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    k.ok_stdin(&["apply", "-f", "-"], &pdb_yaml(3));
    wait_for("pdb status", Duration::from_secs(30), || {
        k.ok(&[
            "get",
            "pdb",
            "web",
            "-o",
            "jsonpath={.status.observedGeneration}/{.status.currentHealthy}/{.status.desiredHealthy}/{.status.disruptionsAllowed}",
        ]) == "1/3/3/0"
    });
    let table = k.ok(&["get", "pdb"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "MIN AVAILABLE",
            "MAX UNAVAILABLE",
            "ALLOWED DISRUPTIONS",
            "AGE"
        ],
        "{table}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["web", "3", "N/A", "0"], "{table}");

    // Drain a node that runs a web pod: every eviction is refused, kubectl gives up.
    let before = live_pods(&k, "default", "web");
    let node = before[0].1.clone();
    let on_node: Vec<String> = before
        .iter()
        .filter(|(_, n)| *n == node)
        .map(|(p, _)| p.clone())
        .collect();
    let out = k.run(&["drain", &node, "--ignore-daemonsets", "--timeout=10s"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "drain succeeded: {text}");
    assert!(
        text.contains("Cannot evict pod as it would violate the pod's disruption budget."),
        "drain output: {text}"
    );
    let still: Vec<String> = live_pods(&k, "default", "web")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    for p in &on_node {
        assert!(still.contains(p), "{p} was evicted despite the budget");
    }

    // With minAvailable 2 one pod may go at a time: the drain finishes and the pods come back
    // on the other nodes.
    k.ok_stdin(&["apply", "-f", "-"], &pdb_yaml(2));
    wait_for("pdb allows 1", Duration::from_secs(30), || {
        k.ok(&[
            "get",
            "pdb",
            "web",
            "-o",
            "jsonpath={.status.observedGeneration}/{.status.disruptionsAllowed}",
        ]) == "2/1"
    });
    let out = k.ok(&["drain", &node, "--ignore-daemonsets", "--timeout=90s"]);
    assert!(
        out.contains(&format!("node/{node} drained")),
        "drain output: {out}"
    );
    for p in &on_node {
        assert!(
            out.contains(&format!("pod/{p} evicted")),
            "drain output: {out}"
        );
    }
    wait_for(
        "3 web pods off the drained node",
        Duration::from_secs(60),
        || {
            let pods = live_pods(&k, "default", "web");
            pods.len() == 3 && pods.iter().all(|(_, n)| !n.is_empty() && *n != node)
        },
    );
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);

    // The controllers' Events, as `kubectl describe` shows them.
    let rs = k.ok(&[
        "get",
        "rs",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let d = k.ok(&["describe", "deployment", "web"]);
    assert!(
        d.contains("ScalingReplicaSet")
            && d.contains(&format!("Scaled up replica set {rs} from 0 to 3")),
        "describe deployment: {d}"
    );
    assert!(
        d.contains("deployment-controller"),
        "describe deployment: {d}"
    );
    let r = k.ok(&["describe", "rs", &rs]);
    assert!(r.contains("SuccessfulCreate"), "describe rs: {r}");
    assert!(r.contains("replicaset-controller"), "describe rs: {r}");
    let created = r
        .lines()
        .filter(|l| l.contains("Created pod: web-"))
        .count();
    assert!(created >= 1, "describe rs: {r}");
}

/// The holder of Lease `name` in kube-system, as kubectl shows it ("" when it does not exist or
/// has no holder).
fn lease_holder(k: &Kubectl, name: &str) -> String {
    let out = k.run(&[
        "get",
        "lease",
        "-n",
        "kube-system",
        name,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const LEASES: [&str; 2] = ["kube-scheduler", "kube-controller-manager"];

/// Waits until `server` (its `--node-name`) holds both control-plane leases; returns how long
/// that took.
fn wait_for_leader(k: &Kubectl, server: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    wait_for(&format!("{server} to hold {LEASES:?}"), timeout, || {
        LEASES
            .iter()
            .all(|l| lease_holder(k, l).starts_with(&format!("{server}_")))
    });
    start.elapsed()
}

/// Applies a Deployment of `replicas` pods through `k` and waits until all are created, bound
/// (spec.nodeName set on a hollow node) and available (the hollow kubelet ran them).
fn deployment_runs(k: &Kubectl, name: &str, replicas: usize, node_prefix: &str) {
    k.ok_stdin(
        &["apply", "-f", "-"],
        &deployment(name, replicas as u32, "busybox:hollow", ""),
    );
    wait_for(
        &format!("deployment {name} to have {replicas} available pods"),
        Duration::from_secs(60),
        || {
            k.ok(&[
                "get",
                "deploy",
                name,
                "-o",
                "jsonpath={.status.availableReplicas}",
            ])
            .trim()
                == replicas.to_string()
        },
    );
    let pods = live_pods(k, "default", name);
    assert_eq!(pods.len(), replicas, "pods of {name}: {pods:?}");
    for (pod, node) in &pods {
        assert!(
            node.starts_with(&format!("{node_prefix}-")),
            "pod {pod} of {name} is bound to {node:?}, not to a {node_prefix}-* node"
        );
    }
}

/// Several servers on one etcd: one of them runs the scheduler and the controllers (it holds
/// the `kube-scheduler` and `kube-controller-manager` Leases); when it is killed (SIGKILL: it
/// cannot release) another takes over once the lease expires (15 s), and when it stops cleanly
/// (SIGTERM) it releases the leases so that another takes over within a retry period (2 s).
/// The servers share one cluster token (and so one CA, see `shared_datastore.rs`); every kubectl
/// still talks to one server.
#[test]
fn leader_election_fails_over_between_servers_on_one_etcd() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>7.1?} {what}", t0.elapsed());
    let etcd = Etcd::start();
    let server = |name: &str| {
        Server::start_with(
            tempfile::tempdir().unwrap(),
            &[
                "--datastore-endpoint",
                &etcd.url,
                "--node-name",
                name,
                "--token",
                "failover-token",
            ],
        )
    };
    let a = server("server-a");
    let ka = Kubectl::new(None, &a);
    wait_for_leader(&ka, "server-a", Duration::from_secs(30));
    phase("server-a leads");
    let b = server("server-b");
    let kb = Kubectl::new(None, &b);
    // server-b sees the same leases and does not take them while server-a renews them.
    let transitions = |k: &Kubectl, l: &str| {
        k.ok(&[
            "get",
            "lease",
            "-n",
            "kube-system",
            l,
            "-o",
            "jsonpath={.spec.leaseTransitions}",
        ])
    };
    let before: Vec<String> = LEASES.iter().map(|l| transitions(&kb, l)).collect();
    phase("server-b up");
    let nodes_b = hollow(&b, "fo", 3);
    wait_for("3 hollow nodes Ready", Duration::from_secs(30), || {
        kb.ok(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}",
        ])
        .split_whitespace()
        .filter(|s| *s == "True")
        .count()
            == 3
    });
    phase("nodes ready");
    deployment_runs(&kb, "before-failover", 3, "fo");
    for (l, t) in LEASES.iter().zip(&before) {
        let holder = lease_holder(&kb, l);
        assert!(
            holder.starts_with("server-a_"),
            "{l} must still be held by server-a, is {holder:?}"
        );
        assert_eq!(
            &transitions(&kb, l),
            t,
            "{l} changed hands while server-a held it"
        );
    }

    phase("before-failover runs");
    // SIGKILL the leader: server-b takes over after the lease duration (15 s).
    drop(a);
    let took = wait_for_leader(&kb, "server-b", Duration::from_secs(45));
    assert!(
        took >= Duration::from_secs(10),
        "server-b took a lease that server-a did not release after only {took:?}"
    );
    for (l, t) in LEASES.iter().zip(&before) {
        let now: u32 = transitions(&kb, l).trim().parse().unwrap();
        assert_eq!(now, t.trim().parse::<u32>().unwrap() + 1, "{l} transitions");
    }
    phase("server-b leads");
    deployment_runs(&kb, "after-kill", 3, "fo");
    phase("after-kill runs");
    eprintln!("takeover after SIGKILL of the leader: {took:?}");

    // A clean stop releases the leases: server-c takes over within about a retry period. The
    // hollow nodes move to server-c first (server-b's go away with it).
    let c = server("server-c");
    let kc = Kubectl::new(None, &c);
    drop(nodes_b);
    kc.ok(&["delete", "node", "fo-0", "fo-1", "fo-2"]);
    let _nodes_c = hollow(&c, "fc", 3);
    for l in LEASES {
        let holder = lease_holder(&kc, l);
        assert!(holder.starts_with("server-b_"), "{l} is held by {holder:?}");
    }
    phase("server-c up, nodes moved");
    let mut b = b;
    let start = Instant::now();
    assert!(b.stop().success(), "server-b did not exit cleanly");
    wait_for_leader(&kc, "server-c", Duration::from_secs(30));
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "server-c took {took:?} (from SIGTERM of server-b) to take over released leases"
    );
    phase("server-c leads");
    deployment_runs(&kc, "after-stop", 3, "fc");
    phase("after-stop runs");
    eprintln!("takeover after SIGTERM of the leader: {took:?}");
}
