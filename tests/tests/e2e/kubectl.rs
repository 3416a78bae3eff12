//! Real kubectl (1.27 and 1.33) against a real `skiff server`: the everyday commands.
#![allow(clippy::unwrap_used)] // scenario helpers outside #[test] functions may unwrap

use std::time::Duration;

use skiff_e2e::{Kubectl, Server};

const MANIFEST_V1: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: app-config
  labels:
    app: web
data:
  color: blue
  size: "1"
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginx:1.27
        env:
        - name: A
          value: "1"
        ports:
        - containerPort: 80
"#;

fn contains_all(text: &str, words: &[&str]) {
    for w in words {
        assert!(text.contains(w), "expected {w:?} in:\n{text}");
    }
}

fn everyday(version: &str) {
    let server = Server::start();
    let k = Kubectl::new(Some(version), &server);

    // Namespaces exist from the first start, shown with real columns.
    let ns = k.ok(&["get", "ns"]);
    contains_all(
        &ns,
        &[
            "NAME",
            "STATUS",
            "AGE",
            "default",
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "Active",
        ],
    );

    let v = k.ok(&["version"]);
    contains_all(&v, &["Server Version", "v1.35.0+skiff"]);
    let av = k.ok(&["api-versions"]);
    contains_all(
        &av,
        &[
            "apps/v1\n",
            "v1\n",
            "batch/v1\n",
            "rbac.authorization.k8s.io/v1\n",
        ],
    );
    let ar = k.ok(&["api-resources"]);
    let deploy_line = ar
        .lines()
        .find(|l| l.starts_with("deployments "))
        .expect("deployments in api-resources");
    contains_all(deploy_line, &["deploy", "apps/v1", "true", "Deployment"]);
    assert!(
        ar.lines()
            .any(|l| l.starts_with("namespaces ") && l.contains("false")),
        "{ar}"
    );

    let pods = k.run(&["get", "pods"]);
    assert!(pods.status.success());
    contains_all(
        &String::from_utf8_lossy(&pods.stderr),
        &["No resources found in default namespace."],
    );

    // Imperative configmap: create, read back as YAML, label, annotate, patch, delete.
    contains_all(
        &k.ok(&["create", "configmap", "c1", "--from-literal=a=1"]),
        &["configmap/c1 created"],
    );
    let y = k.ok(&["get", "cm", "c1", "-o", "yaml"]);
    contains_all(
        &y,
        &[
            "name: c1",
            "namespace: default",
            "a: \"1\"",
            "resourceVersion:",
            "uid:",
            "creationTimestamp:",
        ],
    );
    let cms = k.ok(&["get", "cm"]);
    contains_all(&cms, &["NAME", "DATA", "AGE", "c1"]);
    contains_all(
        &k.ok(&["label", "cm", "c1", "tier=front"]),
        &["configmap/c1 labeled"],
    );
    assert_eq!(
        k.ok(&["get", "cm", "-l", "tier=front", "-o", "name"])
            .trim(),
        "configmap/c1"
    );
    // Only c1 has the label; kube-root-ca.crt (published by the controllers) may be listed.
    let others = k.ok(&["get", "cm", "-l", "tier!=front", "-o", "name"]);
    assert!(
        others
            .lines()
            .all(|l| l.trim() == "configmap/kube-root-ca.crt"),
        "{others}"
    );
    contains_all(
        &k.ok(&["label", "cm", "c1", "tier=back", "--overwrite"]),
        &["labeled"],
    );
    contains_all(
        &k.ok(&["annotate", "cm", "c1", "note=hello"]),
        &["configmap/c1 annotate"],
    );
    assert_eq!(
        k.ok(&[
            "get",
            "cm",
            "c1",
            "-o",
            "jsonpath={.metadata.annotations.note}"
        ]),
        "hello"
    );
    contains_all(
        &k.ok(&[
            "patch",
            "cm",
            "c1",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"b":"2"}}"#,
        ]),
        &["configmap/c1 patched"],
    );
    assert_eq!(k.ok(&["get", "cm", "c1", "-o", "jsonpath={.data.b}"]), "2");
    contains_all(
        &k.ok(&[
            "patch",
            "cm",
            "c1",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/data/a"}]"#,
        ]),
        &["patched"],
    );
    assert_eq!(
        k.ok(&["get", "cm", "c1", "-o", "jsonpath={.data}"]),
        r#"{"b":"2"}"#
    );
    contains_all(
        &k.ok(&["delete", "cm", "c1"]),
        &["configmap \"c1\" deleted"],
    );
    contains_all(
        &k.fails(&["get", "cm", "c1"]),
        &["configmaps \"c1\" not found"],
    );

    // Declarative: apply, re-apply with a change (strategic merge patch), remove a field.
    let validate = "--validate=true";
    let out = k.ok_stdin(&["apply", validate, "-f", "-"], MANIFEST_V1);
    contains_all(
        &out,
        &[
            "configmap/app-config created",
            "deployment.apps/web created",
        ],
    );
    let out = k.ok_stdin(&["apply", validate, "-f", "-"], MANIFEST_V1);
    contains_all(
        &out,
        &[
            "configmap/app-config unchanged",
            "deployment.apps/web unchanged",
        ],
    );
    let v2 = MANIFEST_V1
        .replace("color: blue\n  size: \"1\"\n", "color: green\n")
        .replace("replicas: 2", "replicas: 3")
        .replace("image: nginx:1.27", "image: nginx:1.28");
    let out = k.ok_stdin(&["apply", validate, "-f", "-"], &v2);
    contains_all(
        &out,
        &[
            "configmap/app-config configured",
            "deployment.apps/web configured",
        ],
    );
    assert_eq!(
        k.ok(&["get", "cm", "app-config", "-o", "jsonpath={.data}"]),
        r#"{"color":"green"}"#
    );
    assert_eq!(k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].env[0].value} {.metadata.generation}"]), "3 nginx:1.28 1 2");
    // Defaults users see.
    assert_eq!(
        k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.strategy.type} {.spec.revisionHistoryLimit} {.spec.template.spec.restartPolicy} {.spec.template.spec.containers[0].imagePullPolicy}"]),
        "RollingUpdate 10 Always IfNotPresent"
    );
    let d = k.ok(&["get", "deploy"]);
    contains_all(
        &d,
        &["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "web", "0/3"],
    );
    contains_all(
        &k.ok(&["scale", "deploy", "web", "--replicas=5"]),
        &["deployment.apps/web scaled"],
    );
    assert_eq!(
        k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "5"
    );
    contains_all(
        &k.ok(&[
            "patch",
            "deploy",
            "web",
            "-p",
            r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:2"}]}}}}"#,
        ]),
        &["patched"],
    );
    assert_eq!(k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort}"]), "nginx:2 80");
    contains_all(
        &k.ok(&["delete", "deploy", "web", "--cascade=foreground"]),
        &["deployment.apps \"web\" deleted"],
    );

    // Watch: another client's change arrives.
    k.ok(&["create", "configmap", "w1", "--from-literal=v=1"]);
    let (_guard, lines) = k.spawn_lines(&[
        "get",
        "cm",
        "w1",
        "--watch",
        "-o",
        "jsonpath={.data.v}{\"\\n\"}",
    ]);
    let first = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("initial watch line");
    assert_eq!(first.trim(), "1");
    k.ok(&[
        "patch",
        "cm",
        "w1",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"v":"2"}}"#,
    ]);
    let mut seen = false;
    while let Ok(l) = lines.recv_timeout(Duration::from_secs(20)) {
        if l.trim() == "2" {
            seen = true;
            break;
        }
    }
    assert!(seen, "kubectl get --watch did not see the update");

    // Namespaces: create, use, delete.
    k.ok(&["create", "namespace", "team-a"]);
    k.ok(&[
        "-n",
        "team-a",
        "create",
        "configmap",
        "x",
        "--from-literal=k=v",
    ]);
    contains_all(
        &k.fails(&["-n", "nope", "create", "configmap", "x"]),
        &["namespaces \"nope\" not found"],
    );
    contains_all(
        &k.ok(&["delete", "namespace", "team-a", "--timeout=30s"]),
        &["namespace \"team-a\" deleted"],
    );
    contains_all(
        &k.fails(&["get", "ns", "team-a"]),
        &["namespaces \"team-a\" not found"],
    );

    // Raw paths.
    assert_eq!(k.ok(&["get", "--raw", "/readyz"]), "ok");
}

#[test]
fn kubectl_1_33_everyday_commands() {
    everyday("1.33");
}

#[test]
fn kubectl_1_27_everyday_commands() {
    everyday("1.27");
}

#[test]
fn auth_whoami() {
    let server = Server::start();
    let k = Kubectl::new(Some("1.33"), &server);
    let out = k.ok(&["auth", "whoami"]);
    contains_all(
        &out,
        &["system:admin", "system:masters", "system:authenticated"],
    );
    let k27 = Kubectl::new(Some("1.27"), &server);
    let out = k27.ok(&["auth", "whoami"]);
    contains_all(&out, &["system:admin"]);
}

const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.27
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: v1
kind: Pod
metadata:
  name: p1
spec:
  containers:
  - name: c
    image: busybox
"#;

fn more_commands(version: &str) {
    let server = Server::start();
    let k = Kubectl::new(Some(version), &server);
    let file = server.dir.path().join("workloads.yaml");
    std::fs::write(&file, WORKLOADS).unwrap();
    let f = file.to_str().unwrap();

    let out = k.ok(&["apply", "--dry-run=server", "-f", f]);
    contains_all(
        &out,
        &[
            "deployment.apps/web created (server dry run)",
            "pod/p1 created (server dry run)",
        ],
    );
    assert!(
        !k.run(&["get", "deploy", "web"]).status.success(),
        "server dry run must not store"
    );
    k.ok(&["apply", "-f", f]);

    let wide = k.ok(&["get", "deploy,svc,pods", "-o", "wide"]);
    contains_all(
        &wide,
        &[
            "CONTAINERS",
            "IMAGES",
            "SELECTOR",
            "nginx:1.27",
            "app=web",
            "ClusterIP",
            "10.43.",
            "80/TCP",
            "Pending",
            "0/1",
            "NOMINATED NODE",
        ],
    );
    let pod = k.ok(&["get", "pod", "p1", "-o", "jsonpath={.spec.restartPolicy} {.spec.dnsPolicy} {.spec.terminationGracePeriodSeconds} {.spec.schedulerName} {.spec.containers[0].imagePullPolicy}"]);
    assert_eq!(pod, "Always ClusterFirst 30 default-scheduler Always");
    let svc = k.ok(&["get", "svc", "web", "-o", "json"]);
    let svc: serde_json::Value = serde_json::from_str(&svc).unwrap();
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["sessionAffinity"], "None");
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");

    // Server-side field validation: a typo is refused (kubectl sends fieldValidation=Strict).
    let typo = WORKLOADS.replace("replicas: 2", "replicaz: 2");
    let out = k.run_stdin(&["apply", "-f", "-"], Some(&typo));
    assert!(!out.status.success());
    contains_all(
        &String::from_utf8_lossy(&out.stderr),
        &["strict decoding error: unknown field \"spec.replicaz\""],
    );

    let explain = k.ok(&["explain", "pod.spec.containers.resources"]);
    contains_all(
        &explain,
        &[
            "KIND:",
            "Pod",
            "FIELD: resources <ResourceRequirements>",
            "Compute Resources required by this container",
        ],
    );
    let explain = k.ok(&["explain", "deployments.spec.strategy"]);
    contains_all(&explain, &["GROUP:", "apps", "rollingUpdate"]);

    let desc = k.ok(&["describe", "deploy", "web"]);
    contains_all(
        &desc,
        &[
            "Name:",
            "web",
            "Replicas:",
            "2 desired",
            "StrategyType:",
            "RollingUpdate",
            "nginx:1.27",
        ],
    );

    // diff exits 1 and shows the change.
    let changed = WORKLOADS.replace("replicas: 2", "replicas: 3");
    let file2 = server.dir.path().join("workloads2.yaml");
    std::fs::write(&file2, changed).unwrap();
    let out = k.run(&["diff", "-f", file2.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "kubectl diff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    contains_all(
        &String::from_utf8_lossy(&out.stdout),
        &["-  replicas: 2", "+  replicas: 3"],
    );

    contains_all(
        &k.ok(&[
            "wait",
            "--for=jsonpath={.spec.replicas}=2",
            "deploy/web",
            "--timeout=10s",
        ]),
        &["condition met"],
    );

    // edit with a scripted editor.
    let mut cmd = std::process::Command::new(&k.bin);
    cmd.arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .args(["edit", "deploy", "web"]);
    cmd.env("KUBE_EDITOR", "sed -i s/nginx:1.27/nginx:1.29/");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "kubectl edit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        k.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "custom-columns=NAME:.metadata.name,IMG:.spec.template.spec.containers[0].image",
            "--no-headers"
        ])
        .split_whitespace()
        .collect::<Vec<_>>(),
        ["web", "nginx:1.29"]
    );

    // Secrets from literals and files, strategic patch, json output.
    let secret_file = server.dir.path().join("token.txt");
    std::fs::write(&secret_file, "s3cret").unwrap();
    k.ok(&[
        "create",
        "secret",
        "generic",
        "s1",
        "--from-literal=user=admin",
        &format!("--from-file=token={}", secret_file.display()),
    ]);
    assert_eq!(
        k.ok(&["get", "secret", "s1", "-o", "jsonpath={.data.token}"]),
        "czNjcmV0"
    );
    contains_all(&k.ok(&["get", "secrets"]), &["TYPE", "DATA", "Opaque", "2"]);
    contains_all(
        &k.ok(&[
            "patch",
            "svc",
            "web",
            "--type",
            "strategic",
            "-p",
            r#"{"spec":{"ports":[{"port":80,"targetPort":9090}]}}"#,
        ]),
        &["patched"],
    );
    assert_eq!(
        k.ok(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.ports[*].targetPort}"
        ]),
        "9090"
    );
    contains_all(
        &k.ok(&["delete", "-f", f]),
        &["deployment.apps \"web\" deleted", "pod \"p1\" deleted"],
    );

    // Server-side apply: create, re-apply, a conflict between managers that --force-conflicts resolves.
    let ssa = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  level: \"1\"\n";
    contains_all(
        &k.ok_stdin(&["apply", "--server-side", "-f", "-"], ssa),
        &["configmap/ssa serverside-applied"],
    );
    contains_all(
        &k.ok_stdin(&["apply", "--server-side", "-f", "-"], ssa),
        &["configmap/ssa serverside-applied"],
    );
    let other = ssa.replace("\"1\"", "\"2\"");
    let out = k.run_stdin(
        &["apply", "--server-side", "--field-manager=other", "-f", "-"],
        Some(&other),
    );
    assert!(!out.status.success(), "a conflicting apply must fail");
    contains_all(
        &String::from_utf8_lossy(&out.stderr),
        &["Apply failed with 1 conflict: conflict with \"kubectl\" using v1: .data.level"],
    );
    k.ok_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=other",
            "--force-conflicts",
            "-f",
            "-",
        ],
        &other,
    );
    assert_eq!(
        k.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data.level}"]),
        "2"
    );
    let managers = k.ok(&[
        "get",
        "cm",
        "ssa",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ]);
    assert_eq!(managers, "other");
    // Re-applying workloads server-side does not conflict with itself.
    k.ok(&["apply", "--server-side", "-f", f]);
    k.ok(&["apply", "--server-side", "-f", f]);
}

#[test]
fn kubectl_1_33_more_commands() {
    more_commands("1.33");
}

#[test]
fn kubectl_1_27_more_commands() {
    more_commands("1.27");
}
