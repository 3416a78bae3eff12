//! `skiff server` lifecycle: restart keeps state and certificates, exit codes, authentication.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use skiff_e2e::{Etcd, Kubectl, Server, skiff_binary};

#[test]
fn restart_keeps_objects_and_certificates() {
    let mut server = Server::start();
    let k = Kubectl::new(None, &server);
    k.ok(&["create", "configmap", "keep", "--from-literal=x=1"]);
    let ca = std::fs::read(server.dir.path().join("server/tls/ca.crt")).unwrap();
    let mode = std::fs::metadata(&server.kubeconfig)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "kubeconfig must be private");
    let status = server.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must stop the server cleanly"
    );
    let dir = server.into_dir();
    let server = Server::start_in(dir);
    assert_eq!(
        std::fs::read(server.dir.path().join("server/tls/ca.crt")).unwrap(),
        ca,
        "CA must be reused"
    );
    let k = Kubectl::new(None, &server);
    assert_eq!(
        k.ok(&["get", "cm", "keep", "-o", "jsonpath={.data.x}"]),
        "1"
    );
}

#[test]
fn bad_flags_exit_2() {
    let bin = skiff_binary();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(&bin)
        .args(["server", "--https-listen-port", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(&bin)
        .args([
            "server",
            "--https-listen-port",
            "0",
            "--service-cidr",
            "bogus",
            "--data-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--service-cidr"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn corrupt_store_exits_2_with_a_clear_message() {
    let bin = skiff_binary();
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("server/db");
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("state.redb"), vec![0x5a; 8192]).unwrap();
    let out = Command::new(&bin)
        .args([
            "server",
            "--https-listen-port",
            "0",
            "--bind-address",
            "127.0.0.1",
            "--data-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state.redb"), "{err}");
}

#[test]
fn anonymous_gets_401_and_tokens_authenticate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("server")).unwrap();
    std::fs::write(
        dir.path().join("server/token-auth.csv"),
        "s3cret-token,alice,uid-1,\"dev,ops\"\n",
    )
    .unwrap();
    let server = Server::start_in(dir);
    let kubectl = skiff_e2e::kubectl_path(None);
    let empty = server.dir.path().join("empty-kubeconfig");
    std::fs::write(&empty, "apiVersion: v1\nkind: Config\n").unwrap();
    let run = |extra: &[&str]| {
        Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&empty)
            .args(["--server", &server.url, "--insecure-skip-tls-verify"])
            .args(extra)
            .output()
            .unwrap()
    };
    // No credentials: 401 with a Status body, except health checks and /version.
    let curl = |path: &str| {
        let out = Command::new("curl")
            .args(["-sk", "-w", "\n%{http_code}"])
            .arg(format!("{}{path}", server.url))
            .output()
            .expect("curl is needed by this test");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let body = curl("/api/v1/namespaces");
    assert!(body.ends_with("\n401"), "{body}");
    assert!(
        body.contains("\"kind\":\"Status\"") && body.contains("\"reason\":\"Unauthorized\""),
        "{body}"
    );
    assert_eq!(curl("/readyz"), "ok\n200");
    assert!(curl("/version").contains("v1.35.0+skiff"));
    let out = run(&["--token", "s3cret-token", "auth", "whoami"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("alice") && text.contains("dev") && text.contains("ops"),
        "{text}"
    );
    let out = run(&["--token", "wrong", "get", "ns"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Unauthorized") || err.contains("provide credentials"),
        "stderr: {err} stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn etcd_datastore_holds_objects_under_registry_keys() {
    let etcd = Etcd::start();
    let server = Server::start_with(
        tempfile::tempdir().unwrap(),
        &["--datastore-endpoint", &etcd.url],
    );
    let k = Kubectl::new(None, &server);
    let ns = k.ok(&["get", "ns", "-o", "name"]);
    assert!(ns.contains("namespace/kube-system"), "{ns}");
    k.ok(&["create", "configmap", "in-etcd", "--from-literal=a=b"]);
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.url,
            "get",
            "--prefix",
            "/registry/configmaps/",
            "--keys-only",
        ])
        .output()
        .expect("etcdctl (Debian package etcd-client) is needed by this test");
    assert!(String::from_utf8_lossy(&out.stdout).contains("/registry/configmaps/default/in-etcd"));
    assert_eq!(
        k.ok(&["get", "cm", "in-etcd", "-o", "jsonpath={.data.a}"]),
        "b"
    );
}

/// `--config FILE` (k3s's config.yaml format): the file's flags apply, the command line wins,
/// and a key that is not a flag stops the server with exit 2 naming the file and the key.
#[test]
fn config_file_sets_flags_and_bad_keys_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "tls-san:\n  - from-config.example\ndisable-agent: true\ncluster-dns: 10.43.0.99\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir, &["--config", cfg.to_str().unwrap()]);
    let k = Kubectl::new(None, &server);
    k.ok(&["get", "--raw", "/readyz"]);
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(server.dir.path().join("server/tls/serving.crt"))
        .output()
        .unwrap();
    let sans = String::from_utf8_lossy(&out.stdout);
    assert!(
        sans.contains("DNS:from-config.example"),
        "the config file's tls-san must be in the serving certificate: {sans}"
    );

    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "tls-sans: [x]\n").unwrap();
    let out = Command::new(skiff_binary())
        .args(["server", "--https-listen-port", "0", "--config"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown key `tls-sans`") && err.contains("bad.yaml"),
        "{err}"
    );
}
