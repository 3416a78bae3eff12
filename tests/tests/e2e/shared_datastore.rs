//! Servers sharing one etcd share one cluster identity (k3s's bootstrap data): the first server
//! saves its CA and service-account key to etcd sealed with the cluster token; a second server
//! given that token uses them, so the admin kubeconfig, service-account tokens and the agents'
//! node-token of one server are good on the other. A server with a missing or wrong token
//! stops with exit code 2 and says what to do.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skiff_e2e::{ChildGuard, Etcd, Kubectl, Server, kubectl_path, skiff_binary};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Starts `skiff server` on `etcd` with `extra` flags, expecting it to exit by itself within
/// 60 s; returns (exit code, stderr).
fn server_exit(etcd: &Etcd, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("stderr");
    let child = Command::new(skiff_binary())
        .args([
            "server",
            "--https-listen-port",
            "0",
            "--bind-address",
            "127.0.0.1",
        ])
        .args(["--disable-agent", "--datastore-endpoint", &etcd.url])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("starting skiff server");
    let mut guard = ChildGuard(child);
    let start = Instant::now();
    loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            return (st.code(), read(&stderr));
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "skiff server {extra:?} did not exit within 60 s; stderr: {}",
            read(&stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kubectl auth whoami` at `url` with only a CA and a bearer token (no kubeconfig identity).
fn whoami_with_token(url: &str, ca: &Path, token: &str) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    let empty = home.path().join("empty-kubeconfig");
    std::fs::write(&empty, "apiVersion: v1\nkind: Config\n").unwrap();
    Command::new(kubectl_path(None))
        .arg("--kubeconfig")
        .arg(&empty)
        .args(["--server", url, "--token", token])
        .arg("--certificate-authority")
        .arg(ca)
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .env("HOME", home.path())
        .output()
        .expect("kubectl")
}

#[test]
fn servers_on_one_etcd_share_ca_service_account_key_and_token() {
    let etcd = Etcd::start();
    // The first server is given no token: it makes one and saves the bootstrap data with it.
    let a = Server::start_with(
        tempfile::tempdir().unwrap(),
        &["--datastore-endpoint", &etcd.url, "--node-name", "server-a"],
    );
    let token = read(&a.dir.path().join("server/token")).trim().to_string();
    assert!(!token.is_empty());

    // Without the token, or with another one, a second server refuses to start (exit 2).
    let (code, err) = server_exit(&etcd, &[]);
    assert_eq!(code, Some(2), "no --token: {err}");
    assert!(
        err.contains("already holds the bootstrap data") && err.contains("--token"),
        "{err}"
    );
    let (code, err) = server_exit(&etcd, &["--token", "not-the-cluster-token"]);
    assert_eq!(code, Some(2), "wrong --token: {err}");
    assert!(
        err.contains("encrypted with a different token") && err.contains("--token"),
        "{err}"
    );

    // With the token (here the full node-token of server A) it joins the same cluster identity.
    let node_token_a = read(&a.dir.path().join("server/node-token"));
    let b = Server::start_with(
        tempfile::tempdir().unwrap(),
        &[
            "--datastore-endpoint",
            &etcd.url,
            "--node-name",
            "server-b",
            "--token",
            node_token_a.trim(),
        ],
    );
    let (tls_a, tls_b) = (
        a.dir.path().join("server/tls"),
        b.dir.path().join("server/tls"),
    );
    assert_eq!(read(&tls_a.join("ca.crt")), read(&tls_b.join("ca.crt")));
    assert_ne!(
        read(&tls_a.join("serving.crt")),
        read(&tls_b.join("serving.crt")),
        "server-b must issue its own serving certificate"
    );
    for key in ["ca.key", "service.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tls_b.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} of server-b");
    }
    // The agents' join token is the same on both servers.
    assert_eq!(node_token_a, read(&b.dir.path().join("server/node-token")));

    // The admin kubeconfig of A works against B's URL (B trusts A's client certificate, and
    // kubectl trusts B's serving certificate through the shared CA).
    let ka = Kubectl::new(None, &a);
    assert_ne!(a.url, b.url);
    let who = ka.ok(&[
        "--server",
        &b.url,
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(who.trim(), "system:admin");
    ka.ok(&["--server", &b.url, "get", "namespaces"]);

    // A service-account token issued by A authenticates on B.
    ka.ok(&["create", "serviceaccount", "robot"]);
    let sa_token = ka.ok(&["create", "token", "robot"]).trim().to_string();
    let out = whoami_with_token(&b.url, &tls_a.join("ca.crt"), &sa_token);
    assert!(
        out.status.success(),
        "token from server-a on server-b: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "system:serviceaccount:default:robot"
    );
    // ... and one signed by another cluster's key does not (the check can fail): server-c has
    // its own embedded store and keys.
    let c = Server::start_with(tempfile::tempdir().unwrap(), &[]);
    let kc = Kubectl::new(None, &c);
    kc.ok(&["create", "serviceaccount", "robot"]);
    let other = kc.ok(&["create", "token", "robot"]).trim().to_string();
    let out = whoami_with_token(&b.url, &tls_a.join("ca.crt"), &other);
    assert!(
        !out.status.success(),
        "a token of another cluster authenticated on server-b"
    );
    let out = whoami_with_token(&c.url, &c.dir.path().join("server/tls/ca.crt"), &other);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What etcd holds is sealed: no PEM key in the clear.
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.url,
            "get",
            "/skiff/bootstrap",
            "--print-value-only",
        ])
        .output()
        .expect("etcdctl (Debian package etcd-client) is needed by this test");
    let value = String::from_utf8_lossy(&out.stdout);
    assert!(value.contains("ciphertext"), "bootstrap record: {value}");
    assert!(
        !value.contains("PRIVATE KEY"),
        "bootstrap record holds a clear key"
    );
}
