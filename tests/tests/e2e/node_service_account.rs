//! A pod's service-account credentials on a real node: the kubelet fills the
//! `kube-api-access-*` volume (token from a TokenRequest bound to the pod, `ca.crt`,
//! `namespace`), and the token read from inside the container authenticates as the pod's
//! service account with only the cluster CA, as an in-cluster client would use it.

use std::time::Duration;

use skiff_e2e::Kubectl;

use crate::node_pods::node_server;
use crate::service_account::{claims, token_only, wait_for, with_token};

const DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: sat}
spec:
  nodeName: skiff-e2e
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sleep", "3600"]
"#;

#[test]
fn node_pod_service_account_token_authenticates() {
    let server = node_server();
    let k = Kubectl::new(Some("1.33"), &server);
    k.ok(&["create", "namespace", "sat"]);
    wait_for(
        "sat/default serviceaccount",
        Duration::from_secs(30),
        || {
            k.run(&["-n", "sat", "get", "serviceaccount", "default"])
                .status
                .success()
        },
    );
    k.ok_stdin(&["apply", "-f", "-"], POD);
    wait_for("pod client running", Duration::from_secs(90), || {
        k.run(&[
            "-n",
            "sat",
            "get",
            "pod",
            "client",
            "-o",
            "jsonpath={.status.phase}",
        ])
        .stdout
            == b"Running"
    });
    let exec = |args: &[&str]| {
        let mut full = vec!["-n", "sat", "exec", "client", "--"];
        full.extend_from_slice(args);
        k.ok(&full)
    };
    let token = exec(&["cat", &format!("{DIR}/token")]);
    assert!(!token.is_empty(), "the token file is empty");
    let c = claims(&token);
    assert_eq!(c["sub"], "system:serviceaccount:sat:default");
    assert_eq!(c["kubernetes.io"]["pod"]["name"], "client");
    assert_eq!(c["kubernetes.io"]["node"]["name"], "skiff-e2e");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3607
    );
    assert_eq!(
        exec(&["stat", "-L", "-c", "%a", &format!("{DIR}/token")]).trim(),
        "644"
    );
    assert_eq!(exec(&["cat", &format!("{DIR}/namespace")]), "sat");
    let ca_b64 = k.ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let ca = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(ca_b64.trim())
            .unwrap()
    };
    assert_eq!(exec(&["cat", &format!("{DIR}/ca.crt")]).as_bytes(), &ca[..]);
    assert_eq!(
        exec(&[
            "sh",
            "-c",
            "echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
        ])
        .trim(),
        "10.43.0.1:443"
    );

    // The token from inside the pod authenticates with only the CA.
    let anon = token_only(&k, &server, "pod");
    let who = with_token(&anon, &token, &["auth", "whoami"]);
    let text = String::from_utf8_lossy(&who.stdout);
    assert!(
        text.contains("system:serviceaccount:sat:default"),
        "{text} {}",
        String::from_utf8_lossy(&who.stderr)
    );
    // ... until the pod is gone.
    k.ok(&["-n", "sat", "delete", "pod", "client", "--timeout=60s"]);
    let out = with_token(&anon, &token, &["get", "pods"]);
    assert!(!out.status.success(), "the pod's token outlived the pod");
}
