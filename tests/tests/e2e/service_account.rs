//! Service-account tokens with real kubectl 1.27 and 1.33 against `skiff server --disable-agent`:
//! `kubectl create token` (defaults, `--duration`, `--audience`, `--bound-object-kind Pod`), the
//! tokens used as `--token` with only the server CA (who am I, list pods), what ends a token
//! (deleted service account, deleted bound pod, a forged signature), and the ServiceAccount
//! admission plugin's `kube-api-access-*` volume on pods made by kubectl.
#![allow(clippy::unwrap_used)] // scenario helpers outside #[test] functions may unwrap

use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_e2e::{Kubectl, Server};

const MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

pub(crate) fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A kubeconfig with the server URL and CA of the admin kubeconfig and no user credentials.
pub(crate) fn token_only(k: &Kubectl, server: &Server, version: &str) -> Kubectl {
    let ca = k.ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    assert!(!ca.trim().is_empty(), "admin kubeconfig has no CA data");
    let path = server.dir.path().join(format!("token-only-{version}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: nobody\n  user: {{}}\ncontexts:\n- name: skiff\n  context:\n    cluster: skiff\n    user: nobody\ncurrent-context: skiff\n",
            server.url,
            ca.trim()
        ),
    )
    .unwrap();
    Kubectl {
        bin: k.bin.clone(),
        kubeconfig: path,
    }
}

pub(crate) fn claims(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// `kubectl --token=T ARGS` with the token-only kubeconfig.
pub(crate) fn with_token(anon: &Kubectl, token: &str, args: &[&str]) -> std::process::Output {
    let flag = format!("--token={token}");
    let mut full = vec![flag.as_str()];
    full.extend_from_slice(args);
    anon.run(&full)
}

fn unauthorized(anon: &Kubectl, token: &str) {
    let out = with_token(anon, token, &["get", "pods"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "token still works");
    assert!(
        err.contains("Unauthorized") || err.contains("provide credentials"),
        "stderr: {err}"
    );
}

fn pod_json(k: &Kubectl, name: &str) -> Value {
    serde_json::from_str(&k.ok(&["get", "pod", name, "-o", "json"])).unwrap()
}

fn scenario(version: &str) {
    let server = Server::start();
    let k = Kubectl::new(Some(version), &server);
    let anon = token_only(&k, &server, version);
    // The service-account controller makes `default` shortly after start.
    wait_for("default serviceaccount", Duration::from_secs(30), || {
        k.run(&["get", "serviceaccount", "default"])
            .status
            .success()
    });

    // kubectl create token default → a JWT that authenticates with only the CA.
    let token = k.ok(&["create", "token", "default"]).trim().to_string();
    let c = claims(&token);
    assert_eq!(c["sub"], "system:serviceaccount:default:default");
    assert_eq!(
        c["aud"],
        serde_json::json!(["https://kubernetes.default.svc.cluster.local"])
    );
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    let who = with_token(&anon, &token, &["auth", "whoami"]);
    let text = String::from_utf8_lossy(&who.stdout);
    assert!(
        who.status.success(),
        "whoami: {}",
        String::from_utf8_lossy(&who.stderr)
    );
    for want in [
        "system:serviceaccount:default:default",
        "system:serviceaccounts",
        "system:serviceaccounts:default",
        "system:authenticated",
    ] {
        assert!(text.contains(want), "whoami lacks {want}: {text}");
    }
    k.ok(&["run", "p", "--image=busybox:1", "--restart=Never"]);
    let out = with_token(&anon, &token, &["get", "pods", "-o", "name"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pod/p");
    // Without the token the same kubeconfig is refused.
    assert!(!anon.run(&["get", "pods"]).status.success());

    // Garbage and a forged signature: 401.
    unauthorized(&anon, "not-a-token");
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let flipped = if &parts[2][10..11] == "A" { "B" } else { "A" };
    parts[2].replace_range(10..11, flipped);
    unauthorized(&anon, &parts.join("."));

    // --duration below the 10-minute minimum is refused as kube-apiserver refuses it; 10m works.
    let err = k.fails(&["create", "token", "default", "--duration=1m"]);
    assert!(
        err.contains("may not specify a duration less than 10 minutes"),
        "{err}"
    );
    let short = k.ok(&["create", "token", "default", "--duration=10m"]);
    let c = claims(short.trim());
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);

    // A token for another audience is not accepted by the API.
    let vault = k.ok(&["create", "token", "default", "--audience=vault"]);
    assert_eq!(claims(vault.trim())["aud"], serde_json::json!(["vault"]));
    unauthorized(&anon, vault.trim());

    // Missing service account: 404.
    let err = k.fails(&["create", "token", "ghost"]);
    assert!(err.contains("serviceaccounts \"ghost\" not found"), "{err}");

    // Bound to a pod: works while the pod exists, not after it is deleted.
    let bound = k.ok(&[
        "create",
        "token",
        "default",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "p",
    ]);
    let bound = bound.trim().to_string();
    let p = pod_json(&k, "p");
    assert_eq!(
        claims(&bound)["kubernetes.io"]["pod"],
        serde_json::json!({"name": "p", "uid": p["metadata"]["uid"]})
    );
    assert!(with_token(&anon, &bound, &["get", "pods"]).status.success());
    k.ok(&["delete", "pod", "p", "--wait=true", "--timeout=60s"]);
    unauthorized(&anon, &bound);
    // The unbound token of the same service account still works.
    assert!(with_token(&anon, &token, &["get", "pods"]).status.success());

    // A deleted service account's tokens stop working, also when one of the same name returns.
    k.ok(&["create", "serviceaccount", "robot"]);
    let robot = k.ok(&["create", "token", "robot"]).trim().to_string();
    assert!(with_token(&anon, &robot, &["get", "pods"]).status.success());
    k.ok(&["delete", "serviceaccount", "robot"]);
    unauthorized(&anon, &robot);
    k.ok(&["create", "serviceaccount", "robot"]);
    unauthorized(&anon, &robot);

    // Admission: a pod made by kubectl gets the kube-api-access volume and mounts.
    k.ok(&["run", "q", "--image=busybox:1", "--restart=Never"]);
    let q = pod_json(&k, "q");
    assert_eq!(q["spec"]["serviceAccountName"], "default");
    let vols = q["spec"]["volumes"].as_array().unwrap();
    let vol = vols
        .iter()
        .find(|v| {
            v["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("kube-api-access-"))
        })
        .unwrap_or_else(|| panic!("no kube-api-access volume: {vols:?}"));
    let sources = &vol["projected"]["sources"];
    assert_eq!(sources[0]["serviceAccountToken"]["path"], "token");
    assert_eq!(sources[0]["serviceAccountToken"]["expirationSeconds"], 3607);
    assert_eq!(sources[1]["configMap"]["name"], "kube-root-ca.crt");
    assert_eq!(
        sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    let mounts = &q["spec"]["containers"][0]["volumeMounts"];
    assert_eq!(
        mounts,
        &serde_json::json!([{"name": vol["name"], "readOnly": true, "mountPath": MOUNT}])
    );
    // ... and not with automountServiceAccountToken: false.
    k.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: quiet\nspec:\n  automountServiceAccountToken: false\n  containers:\n  - name: c\n    image: busybox:1\n",
    );
    let quiet = pod_json(&k, "quiet");
    assert!(quiet["spec"].get("volumes").is_none(), "{quiet}");
    assert!(
        quiet["spec"]["containers"][0].get("volumeMounts").is_none(),
        "{quiet}"
    );
    // A pod naming a service account that does not exist is refused.
    let err = k.fails(&[
        "run",
        "lost",
        "--image=busybox:1",
        "--overrides={\"spec\":{\"serviceAccountName\":\"ghost\"}}",
    ]);
    assert!(
        err.contains("error looking up service account default/ghost"),
        "{err}"
    );

    // A Deployment in a brand-new namespace still gets its pods (the ReplicaSet controller
    // retries until the namespace's default service account exists).
    k.ok(&["create", "namespace", "fresh"]);
    k.ok(&[
        "-n",
        "fresh",
        "create",
        "deployment",
        "d",
        "--image=busybox:1",
        "--replicas=2",
    ]);
    wait_for("pods of fresh/d", Duration::from_secs(60), || {
        k.ok(&["-n", "fresh", "get", "pods", "-o", "name"])
            .lines()
            .count()
            == 2
    });
}

#[test]
fn kubectl_1_27_service_account_tokens() {
    scenario("1.27");
}

#[test]
fn kubectl_1_33_service_account_tokens() {
    scenario("1.33");
}

/// The signing key is made once (0600) and kept: tokens survive a server restart.
#[test]
fn signing_key_is_private_and_survives_restart() {
    let server = Server::start();
    let k = Kubectl::new(Some("1.33"), &server);
    wait_for("default serviceaccount", Duration::from_secs(30), || {
        k.run(&["get", "serviceaccount", "default"])
            .status
            .success()
    });
    let token = k.ok(&["create", "token", "default"]).trim().to_string();
    let key = server.dir.path().join("server/tls/service.key");
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600);
    let before = std::fs::read(&key).unwrap();
    let key = std::path::PathBuf::from("server/tls/service.key");
    let server = Server::start_in(server.into_dir());
    assert_eq!(std::fs::read(server.dir.path().join(&key)).unwrap(), before);
    let k = Kubectl::new(Some("1.33"), &server);
    let anon = token_only(&k, &server, "restart");
    let out = with_token(&anon, &token, &["auth", "whoami"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("system:serviceaccount:default:default"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
