//! `/openapi/v2` (Swagger 2.0 from the built-in schemas) and what kubectl 1.27 does with the
//! OpenAPI documents: `explain` and `apply --validate=strict` name the fields.
#![allow(clippy::unwrap_used)] // scenario helpers outside #[test] functions may unwrap

use serde_json::Value;
use skiff_e2e::{Kubectl, Server};

const UNKNOWN_FIELD: &str = r#"{"apiVersion": "apps/v1", "kind": "Deployment",
  "metadata": {"name": "typo"},
  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "typo"}},
    "template": {"metadata": {"labels": {"app": "typo"}},
      "spec": {"containers": [{"name": "c", "image": "busybox", "imagee": "typo"}]}}}}"#;

#[test]
fn kubectl_1_27_explain_validate_and_openapi_v2() {
    let server = Server::start();
    let k = Kubectl::new(Some("1.27"), &server);

    let doc: Value = serde_json::from_str(&k.ok(&["get", "--raw", "/openapi/v2"])).unwrap();
    assert_eq!(doc["swagger"], "2.0");
    let defs = doc["definitions"].as_object().unwrap();
    assert!(defs.len() > 300, "{} definitions", defs.len());
    assert_eq!(
        defs["io.k8s.api.batch.v1.Job"]["x-kubernetes-group-version-kind"][0]["kind"],
        "Job"
    );
    assert_eq!(
        defs["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"]["items"]["$ref"],
        "#/definitions/io.k8s.api.core.v1.Container"
    );
    assert!(
        !serde_json::to_string(&doc)
            .unwrap()
            .contains("#/components/")
    );
    assert!(
        doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments"]["post"].is_object(),
        "deployments path"
    );

    let explain = k.ok(&["explain", "deployment.spec.strategy"]);
    for w in [
        "KIND:",
        "Deployment",
        "strategy",
        "DeploymentStrategy",
        "rollingUpdate",
        "type",
    ] {
        assert!(explain.contains(w), "{w:?} in:\n{explain}");
    }
    let explain = k.ok(&["explain", "deployment.spec.strategy.rollingUpdate.maxSurge"]);
    assert!(explain.contains("maxSurge"), "{explain}");

    let out = k.run_stdin(
        &["apply", "--validate=strict", "-f", "-"],
        Some(UNKNOWN_FIELD),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "apply of an unknown field succeeded");
    assert!(
        stderr.contains("unknown field \"spec.template.spec.containers[0].imagee\""),
        "{stderr}"
    );
    // Nothing was created.
    assert!(!k.run(&["get", "deployment", "typo"]).status.success());
    // Warn: created, with the field named in a warning.
    let out = k.run_stdin(
        &["apply", "--validate=warn", "-f", "-"],
        Some(UNKNOWN_FIELD),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("imagee"), "{stderr}");
}
