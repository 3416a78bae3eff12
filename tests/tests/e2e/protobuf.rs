//! Real kubectl (1.27 and 1.33) `create` subcommands, several of which send their bodies as
//! Kubernetes protobuf (typed clients): the objects the server stores are checked field by
//! field, and kubectl's own request log (`-v=8`) tells which requests were protobuf.
#![allow(clippy::unwrap_used)] // scenario helpers outside #[test] functions may unwrap

use serde_json::Value;
use skiff_e2e::{Kubectl, Server};

/// Runs `kubectl -v=8 ARGS`, asserts success and returns the Content-Type of each POST it sent
/// (`(url, content type)`).
fn create(k: &Kubectl, args: &[&str]) -> Vec<(String, String)> {
    let mut full = vec!["-v=8"];
    full.extend_from_slice(args);
    let out = k.run(&full);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubectl {} failed:\n{}",
        args.join(" "),
        stderr
            .lines()
            .filter(|l| !l.contains("round_trippers") && !l.contains("request.go"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // kubectl 1.27 logs `POST <url>` / `Request Headers:` / `    Content-Type: ...`; 1.33 logs
    // `"Request" verb="POST" url="<url>" headers=<` followed by tab-indented headers.
    let mut posts = Vec::new();
    let mut pending: Option<String> = None;
    let mut in_request = false;
    for line in stderr.lines() {
        let msg = line.split("] ").nth(1).unwrap_or(line);
        if let Some(url) = msg.strip_prefix("POST ") {
            pending = Some(url.to_string());
            in_request = true;
        } else if let Some(rest) = msg.strip_prefix("\"Request\" verb=") {
            pending = rest
                .strip_prefix("\"POST\" url=\"")
                .and_then(|u| u.split('"').next())
                .map(str::to_string);
            in_request = true;
        } else if ["GET ", "PUT ", "PATCH ", "DELETE "]
            .iter()
            .any(|v| msg.starts_with(v))
        {
            pending = None;
        } else if msg.starts_with("Response") || msg.starts_with("\"Response\"") {
            in_request = false;
        } else if let Some(ct) = msg.trim().strip_prefix("Content-Type: ")
            && in_request
            && let Some(url) = pending.take()
        {
            let url = url.split('?').next().unwrap_or(&url).to_string();
            posts.push((url, ct.trim().to_string()));
        }
    }
    // One POST per command: a body refused as protobuf and retried as JSON would show as two.
    assert_eq!(posts.len(), 1, "kubectl {}: {posts:?}", args.join(" "));
    posts
}

fn get(k: &Kubectl, what: &[&str]) -> Value {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&k.ok(&args)).unwrap()
}

/// Which POSTs were protobuf, as "resource-url: content type" lines for the test output.
fn report(log: &mut Vec<String>, cmd: &str, posts: &[(String, String)]) {
    for (url, ct) in posts {
        let path = url.splitn(4, '/').nth(3).unwrap_or(url);
        log.push(format!("{cmd:<40} POST /{path}: {ct}"));
    }
}

fn is_protobuf(posts: &[(String, String)], resource: &str) -> bool {
    posts.iter().any(|(u, ct)| {
        u.ends_with(resource) && ct.starts_with("application/vnd.kubernetes.protobuf")
    })
}

fn creates(version: &str) {
    let server = Server::start();
    let k = Kubectl::new(Some(version), &server);
    let mut log = Vec::new();

    // CronJob, then a Job from it: the Job is owned by the CronJob and copies its template.
    let p = create(
        &k,
        &[
            "create",
            "cronjob",
            "cj",
            "--image=busybox",
            "--schedule=*/5 * * * *",
            "--",
            "echo",
            "hi",
        ],
    );
    report(&mut log, "create cronjob", &p);
    let cj = get(&k, &["cronjob", "cj"]);
    assert_eq!(cj["spec"]["schedule"], "*/5 * * * *");
    let cj_pod = &cj["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(cj_pod["containers"][0]["image"], "busybox");
    assert_eq!(
        cj_pod["containers"][0]["command"],
        serde_json::json!(["echo", "hi"])
    );

    let p = create(&k, &["create", "job", "j1", "--from=cronjob/cj"]);
    report(&mut log, "create job --from=cronjob/cj", &p);
    // kubectl 1.33's typed clients send protobuf; 1.27's `create` commands still send JSON.
    if version != "1.27" {
        assert!(
            is_protobuf(&p, "/jobs"),
            "kubectl {version} posted the Job as: {p:?}"
        );
    }
    assert_eq!(p.len(), 1, "one POST: {p:?}");
    let job = get(&k, &["job", "j1"]);
    let owner = &job["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "CronJob");
    assert_eq!(owner["name"], "cj");
    assert_eq!(owner["uid"], cj["metadata"]["uid"]);
    if version != "1.27" {
        // kubectl 1.27 leaves `controller` unset in the reference it sends.
        assert_eq!(owner["controller"], true);
    }
    assert_eq!(
        job["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"],
        "manual"
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], "busybox");
    assert_eq!(
        pod["containers"][0]["command"],
        serde_json::json!(["echo", "hi"])
    );
    assert_eq!(pod["restartPolicy"], cj_pod["restartPolicy"]);
    assert_eq!(pod["containers"][0]["resources"], serde_json::json!({}));
    assert!(
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"].is_string()
    );

    // Deployment with replicas and a port.
    let p = create(
        &k,
        &[
            "create",
            "deployment",
            "web",
            "--image=nginx",
            "--replicas=2",
            "--port=80",
        ],
    );
    report(&mut log, "create deployment", &p);
    if version != "1.27" {
        assert!(is_protobuf(&p, "/deployments"), "{p:?}");
    }
    let d = get(&k, &["deployment", "web"]);
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "nginx");
    assert_eq!(c["ports"][0]["containerPort"], 80);
    assert_eq!(c["ports"][0]["protocol"], "TCP");
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");

    // Service.
    let p = create(
        &k,
        &["create", "service", "clusterip", "svc1", "--tcp=5678:8080"],
    );
    report(&mut log, "create service clusterip", &p);
    let s = get(&k, &["service", "svc1"]);
    assert_eq!(s["spec"]["type"], "ClusterIP");
    assert_eq!(s["spec"]["ports"][0]["port"], 5678);
    assert_eq!(s["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(s["spec"]["selector"]["app"], "svc1");
    assert!(
        s["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.43."))
    );

    // ServiceAccount, Role, RoleBinding, ClusterRole.
    let p = create(&k, &["create", "serviceaccount", "sa1"]);
    report(&mut log, "create serviceaccount", &p);
    assert_eq!(
        get(&k, &["serviceaccount", "sa1"])["metadata"]["name"],
        "sa1"
    );
    let p = create(
        &k,
        &[
            "create",
            "role",
            "r1",
            "--verb=get,list",
            "--resource=pods,deployments.apps",
        ],
    );
    report(&mut log, "create role", &p);
    let r = get(&k, &["role", "r1"]);
    let rules = r["rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|x| x["apiGroups"] == serde_json::json!([""])
                && x["resources"] == serde_json::json!(["pods"])
                && x["verbs"] == serde_json::json!(["get", "list"])),
        "{r}"
    );
    assert!(
        rules
            .iter()
            .any(|x| x["apiGroups"] == serde_json::json!(["apps"])),
        "{r}"
    );
    let p = create(
        &k,
        &[
            "create",
            "rolebinding",
            "rb1",
            "--role=r1",
            "--serviceaccount=default:sa1",
        ],
    );
    report(&mut log, "create rolebinding", &p);
    let rb = get(&k, &["rolebinding", "rb1"]);
    assert_eq!(rb["roleRef"]["kind"], "Role");
    assert_eq!(rb["roleRef"]["name"], "r1");
    assert_eq!(rb["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(rb["subjects"][0]["name"], "sa1");
    assert_eq!(rb["subjects"][0]["namespace"], "default");
    let p = create(
        &k,
        &[
            "create",
            "clusterrole",
            "cr1",
            "--verb=get,watch",
            "--resource=nodes",
        ],
    );
    report(&mut log, "create clusterrole", &p);
    let cr = get(&k, &["clusterrole", "cr1"]);
    assert_eq!(cr["rules"][0]["resources"], serde_json::json!(["nodes"]));
    assert_eq!(cr["rules"][0]["verbs"], serde_json::json!(["get", "watch"]));

    // PriorityClass, ResourceQuota, PodDisruptionBudget, Ingress.
    let p = create(
        &k,
        &[
            "create",
            "priorityclass",
            "pc1",
            "--value=1000",
            "--description=e2e",
        ],
    );
    report(&mut log, "create priorityclass", &p);
    let pc = get(&k, &["priorityclass", "pc1"]);
    assert_eq!(pc["value"], 1000);
    assert_eq!(pc["description"], "e2e");
    assert_eq!(pc["preemptionPolicy"], "PreemptLowerPriority");
    let p = create(
        &k,
        &[
            "create",
            "quota",
            "q1",
            "--hard=pods=10,requests.cpu=2,limits.memory=1Gi",
        ],
    );
    report(&mut log, "create quota", &p);
    let q = get(&k, &["resourcequota", "q1"]);
    assert_eq!(
        q["spec"]["hard"],
        serde_json::json!({"pods": "10", "requests.cpu": "2", "limits.memory": "1Gi"})
    );
    let p = create(
        &k,
        &[
            "create",
            "pdb",
            "pdb1",
            "--selector=app=web",
            "--min-available=1",
        ],
    );
    report(&mut log, "create pdb", &p);
    let pdb = get(&k, &["pdb", "pdb1"]);
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"]["app"], "web");
    let p = create(
        &k,
        &[
            "create",
            "ingress",
            "ing1",
            "--rule=foo.example.com/bar=svc1:5678",
        ],
    );
    report(&mut log, "create ingress", &p);
    let ing = get(&k, &["ingress", "ing1"]);
    let rule = &ing["spec"]["rules"][0];
    assert_eq!(rule["host"], "foo.example.com");
    let path = &rule["http"]["paths"][0];
    assert_eq!(path["path"], "/bar");
    assert_eq!(path["pathType"], "Exact");
    assert_eq!(path["backend"]["service"]["name"], "svc1");
    assert_eq!(path["backend"]["service"]["port"]["number"], 5678);

    // Secrets: docker-registry and tls (the server's own serving pair).
    let p = create(
        &k,
        &[
            "create",
            "secret",
            "docker-registry",
            "reg1",
            "--docker-server=registry.example",
            "--docker-username=u",
            "--docker-password=p",
        ],
    );
    report(&mut log, "create secret docker-registry", &p);
    let reg = get(&k, &["secret", "reg1"]);
    assert_eq!(reg["type"], "kubernetes.io/dockerconfigjson");
    assert!(
        reg["data"][".dockerconfigjson"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let (cert, key) = serving_pair(&server);
    let p = create(
        &k,
        &[
            "create",
            "secret",
            "tls",
            "tls1",
            &format!("--cert={cert}"),
            &format!("--key={key}"),
        ],
    );
    report(&mut log, "create secret tls", &p);
    let tls = get(&k, &["secret", "tls1"]);
    assert_eq!(tls["type"], "kubernetes.io/tls");
    assert!(
        tls["data"]["tls.crt"]
            .as_str()
            .is_some_and(|s| s.len() > 100)
    );

    println!("kubectl {version} request bodies:\n{}", log.join("\n"));
    if version != "1.27" {
        // Every one of these commands posts protobuf from kubectl 1.33 (and JSON from 1.27).
        assert!(
            log.iter()
                .all(|l| l.ends_with("application/vnd.kubernetes.protobuf")),
            "{log:#?}"
        );
    }
}

/// A certificate and key PEM file pair from the server's data dir.
fn serving_pair(server: &Server) -> (String, String) {
    let mut found = Vec::new();
    let mut dirs = vec![server.dir.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().map_while(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                found.push(p);
            }
        }
    }
    for crt in &found {
        let name = crt.file_name().unwrap().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".crt") else {
            continue;
        };
        let key = crt.with_file_name(format!("{stem}.key"));
        if key.exists() && stem != "ca" && !stem.contains("ca") {
            return (crt.display().to_string(), key.display().to_string());
        }
    }
    panic!("no .crt/.key pair in the data dir: {found:?}");
}

#[test]
fn kubectl_1_27_create_commands_with_protobuf_bodies() {
    creates("1.27");
}

#[test]
fn kubectl_1_33_create_commands_with_protobuf_bodies() {
    creates("1.33");
}

/// An object with what differs between two creations (names, uids, times, versions, IPs,
/// status) replaced or removed.
fn normalized(v: &Value, name: &str) -> String {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        for k in [
            "name",
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
            "generation",
        ] {
            m.remove(k);
        }
    }
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    let mut text = serde_json::to_string_pretty(&v).unwrap();
    text = text.replace(&format!("\"{name}\""), "\"NAME\"");
    let mut out = String::new();
    for line in text.lines() {
        let l = line.trim();
        let volatile = [
            "\"uid\"",
            "\"controller-uid\"",
            "\"batch.kubernetes.io/controller-uid\"",
            "\"clusterIP\"",
        ];
        if volatile.iter().any(|p| l.starts_with(p)) || l.starts_with("\"10.43.") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The same `kubectl create` commands from kubectl 1.27 (JSON bodies) and 1.33 (protobuf
/// bodies) against one server store the same objects.
#[test]
fn protobuf_and_json_bodies_store_the_same_objects() {
    let server = Server::start();
    let json = Kubectl::new(Some("1.27"), &server);
    let pb = Kubectl::new(Some("1.33"), &server);
    let cmds: &[(&str, &[&str])] = &[
        (
            "cronjob",
            &[
                "create",
                "cronjob",
                "{}",
                "--image=busybox",
                "--schedule=*/5 * * * *",
                "--",
                "echo",
                "hi",
            ],
        ),
        (
            "deployment",
            &[
                "create",
                "deployment",
                "{}",
                "--image=nginx",
                "--replicas=2",
                "--port=80",
            ],
        ),
        (
            "service",
            &["create", "service", "clusterip", "{}", "--tcp=5678:8080"],
        ),
        ("serviceaccount", &["create", "serviceaccount", "{}"]),
        (
            "role",
            &[
                "create",
                "role",
                "{}",
                "--verb=get,list",
                "--resource=pods,deployments.apps",
            ],
        ),
        (
            "rolebinding",
            &[
                "create",
                "rolebinding",
                "{}",
                "--role=r",
                "--user=u",
                "--group=g",
            ],
        ),
        (
            "clusterrole",
            &[
                "create",
                "clusterrole",
                "{}",
                "--verb=get",
                "--resource=nodes",
            ],
        ),
        (
            "priorityclass",
            &["create", "priorityclass", "{}", "--value=7"],
        ),
        (
            "resourcequota",
            &["create", "quota", "{}", "--hard=pods=10,requests.cpu=2"],
        ),
        (
            "pdb",
            &[
                "create",
                "pdb",
                "{}",
                "--selector=app=web",
                "--min-available=1",
            ],
        ),
        (
            "ingress",
            &[
                "create",
                "ingress",
                "{}",
                "--rule=foo.example.com/bar=svc1:5678",
                "--class=default",
            ],
        ),
        (
            "secret",
            &[
                "create",
                "secret",
                "docker-registry",
                "{}",
                "--docker-server=r.example",
                "--docker-username=u",
                "--docker-password=p",
            ],
        ),
    ];
    for (kind, args) in cmds {
        let mut objs = Vec::new();
        for (k, suffix) in [(&json, "j"), (&pb, "p")] {
            let name = format!("x{suffix}");
            let a: Vec<String> = args.iter().map(|x| x.replace("{}", &name)).collect();
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            k.ok(&a);
            objs.push(normalized(&get(k, &[kind, &name]), &name));
        }
        assert_eq!(objs[0], objs[1], "{kind}: JSON (1.27) vs protobuf (1.33)");
    }
    // A Job from a CronJob: the same but for the owner reference's `controller`, which kubectl
    // 1.27 does not set.
    json.ok(&["create", "job", "jj", "--from=cronjob/xj"]);
    pb.ok(&["create", "job", "jp", "--from=cronjob/xj"]);
    let j = normalized(&get(&json, &["job", "jj"]), "jj");
    let p: String = normalized(&get(&pb, &["job", "jp"]), "jp")
        .lines()
        .filter(|l| l.trim() != "\"controller\": true,")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(j, p, "job --from: JSON (1.27) vs protobuf (1.33)");
}
