//! Bad input against a real `skiff server`: malformed JSON/YAML, wrong kind, name mismatch,
//! stale resourceVersion, oversize body and unknown resources each get kube-apiserver's code,
//! reason and a `Status` body (raw HTTPS for what kubectl will not send, kubectl otherwise).
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use skiff_e2e::{Kubectl, RawResponse, Server};

const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn status(r: &RawResponse, code: u16, reason: &str) -> Value {
    assert_eq!(r.code, code, "body: {}", r.text());
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", r.text()));
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["apiVersion"], "v1", "{v}");
    assert_eq!(v["status"], "Failure", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["reason"], reason, "{v}");
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    v
}

#[test]
fn bad_input_gets_status_errors() {
    let server = Server::start();
    let k = Kubectl::new(None, &server);

    // Malformed bodies.
    let r = server.raw(
        "POST",
        CMS,
        "application/json",
        b"{\"apiVersion\": \"v1\", \"kind\": ",
    );
    status(&r, 400, "BadRequest");
    let r = server.raw(
        "POST",
        CMS,
        "application/yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: [unclosed\n",
    );
    status(&r, 400, "BadRequest");
    // Well-formed YAML is accepted on the same path, so the 400 above is about the syntax.
    let r = server.raw(
        "POST",
        CMS,
        "application/yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\ndata:\n  a: b\n",
    );
    assert_eq!(r.code, 201, "{}", r.text());

    // Wrong kind for the path.
    let r = server.raw(
        "POST",
        CMS,
        "application/json",
        br#"{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}"#,
    );
    let v = status(&r, 400, "BadRequest");
    assert!(v["message"].as_str().unwrap().contains("Secret"), "{v}");

    // Name in the body differs from the name in the URL.
    let r = server.raw(
        "PUT",
        &format!("{CMS}/from-yaml"),
        "application/json",
        br#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}}"#,
    );
    let v = status(&r, 400, "BadRequest");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("other") && msg.contains("from-yaml"), "{v}");

    // Stale resourceVersion: raw, then as kubectl users see it.
    let cur: Value =
        serde_json::from_slice(&server.raw("GET", &format!("{CMS}/from-yaml"), "", b"").body)
            .unwrap();
    let mut stale = cur.clone();
    let rv: u64 = cur["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    k.ok(&["label", "configmap", "from-yaml", "touched=yes"]);
    stale["data"]["a"] = "c".into();
    let body = serde_json::to_vec(&stale).unwrap();
    let r = server.raw(
        "PUT",
        &format!("{CMS}/from-yaml"),
        "application/json",
        &body,
    );
    let v = status(&r, 409, "Conflict");
    assert_eq!(
        v["message"],
        "Operation cannot be fulfilled on configmaps \"from-yaml\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
    assert_eq!(v["details"]["name"], "from-yaml", "{v}");
    assert_eq!(v["details"]["kind"], "configmaps", "{v}");
    let file = server.dir.path().join("stale.json");
    std::fs::write(&file, &body).unwrap();
    let err = k.fails(&["replace", "-f", file.to_str().unwrap()]);
    assert!(
        err.contains("Error from server (Conflict)")
            && err.contains("the object has been modified"),
        "{err}"
    );
    assert!(rv > 0);

    // A body over 3 MiB.
    let mut big = br#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"a": ""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 3 * 1024 * 1024 + 1));
    big.extend_from_slice(br#""}}"#);
    let r = server.raw("POST", CMS, "application/json", &big);
    status(&r, 413, "RequestEntityTooLarge");

    // Unknown resources.
    let r = server.raw("GET", "/api/v1/namespaces/default/widgets", "", b"");
    status(&r, 404, "NotFound");
    let r = server.raw("GET", "/apis/example.com/v1/widgets", "", b"");
    status(&r, 404, "NotFound");
    let err = k.fails(&["get", "--raw", "/api/v1/widgets"]);
    assert!(err.contains("NotFound"), "{err}");

    // Nothing half-written: only the one good ConfigMap (plus kube-root-ca.crt, if any) exists.
    let names = k.ok(&[
        "get",
        "configmaps",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    assert!(names.contains("from-yaml"), "{names}");
    assert!(!names.contains("big") && !names.contains(" s "), "{names}");
}
