//! Protobuf request bodies through the router: each object is created once as protobuf (typed
//! k8s-pb message, prost, `k8s\0` envelope) and once as the JSON Go would write for it; after
//! defaulting and validation both stored objects must be the same. Malformed bodies get 400.

use std::time::Duration;

use axum::body::Body;
use http::{Method, Request};
use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::batch::v1 as batch;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::policy::v1 as policy;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::{Value, json};
use skiff_apiserver::{ApiState, Config, Identity, router};
use tower::ServiceExt;

const PB: &str = "application/vnd.kubernetes.protobuf";

fn s(x: &str) -> Option<String> {
    Some(x.to_string())
}

async fn app() -> axum::Router {
    let config = Config {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    };
    router(ApiState::new(skiff_store::memory(), config).await.unwrap())
}

async fn send(
    r: &axum::Router,
    method: Method,
    path: &str,
    ct: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ct)
        .header("accept", "application/json")
        .body(Body::from(body))
        .unwrap();
    req.extensions_mut().insert(Identity {
        user: "system:admin".into(),
        groups: vec!["system:masters".into()],
        uid: String::new(),
    });
    let resp = r.clone().oneshot(req).await.unwrap();
    let code = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn envelope(api_version: &str, kind: &str, m: &impl Message) -> Vec<u8> {
    let u = Unknown {
        type_meta: Some(TypeMeta {
            api_version: s(api_version),
            kind: s(kind),
        }),
        raw: Some(m.encode_to_vec()),
        content_encoding: s(""),
        content_type: s(""),
    };
    [b"k8s\x00".to_vec(), u.encode_to_vec()].concat()
}

/// ObjectMeta as Go's typed client writes it: non-pointer fields present even when empty.
fn om(name: &str) -> Option<meta::ObjectMeta> {
    Some(meta::ObjectMeta {
        name: s(name),
        generate_name: s(""),
        namespace: s(""),
        uid: s(""),
        resource_version: s(""),
        generation: Some(0),
        creation_timestamp: Some(meta::Time::default()),
        labels: [("app".to_string(), "web".to_string())].into(),
        ..Default::default()
    })
}

fn int(i: i32) -> Option<IntOrString> {
    Some(IntOrString {
        r#type: Some(0),
        int_val: Some(i),
        str_val: s(""),
    })
}

fn string(x: &str) -> Option<IntOrString> {
    Some(IntOrString {
        r#type: Some(1),
        int_val: Some(0),
        str_val: s(x),
    })
}

/// The stored object with what differs between two creations (name, uid, times, versions)
/// replaced by placeholders.
fn normalized(v: &Value) -> Value {
    let name = v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let uid = v["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        for k in ["resourceVersion", "creationTimestamp", "managedFields"] {
            m.remove(k);
        }
    }
    let mut text = serde_json::to_string(&v).unwrap();
    if !uid.is_empty() {
        text = text.replace(&uid, "UID");
    }
    text = text.replace(&format!("\"{name}\""), "\"NAME\"");
    serde_json::from_str(&text).unwrap()
}

/// Creates `proto` as protobuf and `json` as JSON (both named by `name` + `-p`/`-j`) at `path`
/// and asserts that the stored objects are the same. Returns the protobuf one.
async fn same_as_json(
    r: &axum::Router,
    path: &str,
    (api_version, kind): (&str, &str),
    proto: impl Message,
    mut json: Value,
) -> Value {
    let (code, from_pb) = send(
        r,
        Method::POST,
        path,
        PB,
        envelope(api_version, kind, &proto),
    )
    .await;
    assert_eq!(code, 201, "{kind} as protobuf: {from_pb}");
    json["apiVersion"] = api_version.into();
    json["kind"] = kind.into();
    let pb_name = from_pb["metadata"]["name"].as_str().unwrap().to_string();
    json["metadata"]["name"] = format!("{pb_name}-json").into();
    let (code, from_json) = send(
        r,
        Method::POST,
        path,
        "application/json",
        serde_json::to_vec(&json).unwrap(),
    )
    .await;
    assert_eq!(code, 201, "{kind} as JSON: {from_json}");
    assert_eq!(normalized(&from_pb), normalized(&from_json), "{kind}");
    from_pb
}

fn pod_template() -> Option<core::PodTemplateSpec> {
    let c = core::Container {
        name: s("web"),
        image: s("nginx:1.25"),
        ports: vec![core::ContainerPort {
            name: s("http"),
            host_port: Some(0),
            container_port: Some(80),
            protocol: s("TCP"),
            host_ip: s(""),
        }],
        env: vec![core::EnvVar {
            name: s("A"),
            value: s("1"),
            value_from: None,
        }],
        resources: Some(core::ResourceRequirements {
            limits: [
                ("cpu".to_string(), Quantity { string: s("500m") }),
                ("memory".to_string(), Quantity { string: s("128Mi") }),
            ]
            .into(),
            requests: Default::default(),
            claims: vec![],
        }),
        liveness_probe: Some(core::Probe {
            handler: Some(core::ProbeHandler {
                http_get: Some(core::HttpGetAction {
                    path: s("/healthz"),
                    port: string("http"),
                    host: s(""),
                    scheme: s(""),
                    http_headers: vec![],
                }),
                ..Default::default()
            }),
            initial_delay_seconds: Some(3),
            timeout_seconds: Some(0),
            period_seconds: Some(0),
            success_threshold: Some(0),
            failure_threshold: Some(0),
            termination_grace_period_seconds: None,
        }),
        volume_mounts: vec![core::VolumeMount {
            name: s("scratch"),
            read_only: Some(false),
            mount_path: s("/scratch"),
            sub_path: s(""),
            ..Default::default()
        }],
        termination_message_path: s(""),
        image_pull_policy: s(""),
        stdin: Some(false),
        tty: Some(false),
        ..Default::default()
    };
    Some(core::PodTemplateSpec {
        metadata: Some(meta::ObjectMeta {
            creation_timestamp: Some(meta::Time::default()),
            labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        }),
        spec: Some(core::PodSpec {
            containers: vec![c],
            restart_policy: s("Never"),
            dns_policy: s(""),
            service_account_name: s(""),
            host_network: Some(false),
            volumes: vec![core::Volume {
                name: s("scratch"),
                volume_source: Some(core::VolumeSource {
                    empty_dir: Some(core::EmptyDirVolumeSource {
                        medium: s(""),
                        size_limit: None,
                    }),
                    ..Default::default()
                }),
            }],
            tolerations: vec![core::Toleration {
                key: s("dedicated"),
                operator: s("Equal"),
                value: s("batch"),
                effect: s("NoSchedule"),
                toleration_seconds: None,
            }],
            ..Default::default()
        }),
    })
}

fn pod_template_json() -> Value {
    json!({
        "metadata": {"labels": {"app": "web"}, "creationTimestamp": null},
        "spec": {
            "containers": [{
                "name": "web", "image": "nginx:1.25",
                "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
                "env": [{"name": "A", "value": "1"}],
                "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "initialDelaySeconds": 3},
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]
            }],
            "restartPolicy": "Never",
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}]
        }
    })
}

#[tokio::test]
async fn protobuf_bodies_store_the_same_object_as_json() {
    let r = app().await;

    // Job with a full pod template.
    let job = batch::Job {
        metadata: om("job-p"),
        spec: Some(batch::JobSpec {
            backoff_limit: Some(0),
            template: pod_template(),
            ..Default::default()
        }),
        status: Some(batch::JobStatus::default()),
    };
    let (code, stored) = send(
        &r,
        Method::POST,
        "/apis/batch/v1/namespaces/default/jobs",
        PB,
        envelope("batch/v1", "Job", &job),
    )
    .await;
    assert_eq!(code, 201, "{stored}");
    let c = &stored["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(
        c["livenessProbe"]["timeoutSeconds"], 1,
        "zero probe timings are defaulted"
    );
    assert_eq!(c["livenessProbe"]["periodSeconds"], 10);
    assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    assert_eq!(
        stored["spec"]["template"]["spec"]["volumes"][0],
        json!({"name": "scratch", "emptyDir": {}})
    );
    assert_eq!(stored["spec"]["backoffLimit"], 0);
    let mut json = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"backoffLimit": 0, "template": pod_template_json()}});
    json["apiVersion"] = "batch/v1".into();
    json["kind"] = "Job".into();
    json["metadata"]["name"] = "job-j".into();
    let (code, from_json) = send(
        &r,
        Method::POST,
        "/apis/batch/v1/namespaces/default/jobs",
        "application/json",
        serde_json::to_vec(&json).unwrap(),
    )
    .await;
    assert_eq!(code, 201, "{from_json}");
    assert_eq!(normalized(&stored), normalized(&from_json));

    // Deployment as `kubectl create deployment` builds it: an empty strategy.
    let d = apps::Deployment {
        metadata: om("dep-p"),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(2),
            selector: Some(meta::LabelSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
                match_expressions: vec![],
            }),
            template: Some(core::PodTemplateSpec {
                metadata: Some(meta::ObjectMeta {
                    labels: [("app".to_string(), "web".to_string())].into(),
                    ..Default::default()
                }),
                spec: Some(core::PodSpec {
                    containers: vec![core::Container {
                        name: s("nginx"),
                        image: s("nginx"),
                        resources: Some(core::ResourceRequirements::default()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            }),
            strategy: Some(apps::DeploymentStrategy::default()),
            ..Default::default()
        }),
        status: Some(apps::DeploymentStatus::default()),
    };
    let got = same_as_json(
        &r,
        "/apis/apps/v1/namespaces/default/deployments",
        ("apps/v1", "Deployment"),
        d,
        json!({"metadata": {"labels": {"app": "web"}}, "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "nginx", "image": "nginx", "resources": {}}]}},
            "strategy": {}}, "status": {}}),
    )
    .await;
    assert_eq!(got["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");

    // Deployment with an explicit strategy.
    let d = apps::Deployment {
        metadata: om("web2"),
        spec: Some(apps::DeploymentSpec {
            selector: Some(meta::LabelSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
                match_expressions: vec![],
            }),
            template: pod_template().map(|mut t| {
                if let Some(sp) = t.spec.as_mut() {
                    sp.restart_policy = s("Always");
                }
                t
            }),
            strategy: Some(apps::DeploymentStrategy {
                r#type: s("RollingUpdate"),
                rolling_update: Some(apps::RollingUpdateDeployment {
                    max_unavailable: int(0),
                    max_surge: string("25%"),
                }),
            }),
            ..Default::default()
        }),
        status: None,
    };
    let (code, got) = send(
        &r,
        Method::POST,
        "/apis/apps/v1/namespaces/default/deployments",
        PB,
        envelope("apps/v1", "Deployment", &d),
    )
    .await;
    assert_eq!(code, 201, "{got}");
    assert_eq!(
        got["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}})
    );

    // Service: a named targetPort, and a zero targetPort that defaults to the port.
    let svc = core::Service {
        metadata: om("svc"),
        spec: Some(core::ServiceSpec {
            ports: vec![
                core::ServicePort {
                    name: s("http"),
                    protocol: s("TCP"),
                    port: Some(80),
                    target_port: string("http"),
                    node_port: Some(0),
                    app_protocol: None,
                },
                core::ServicePort {
                    name: s("alt"),
                    protocol: s("TCP"),
                    port: Some(81),
                    target_port: int(0),
                    node_port: Some(0),
                    app_protocol: None,
                },
            ],
            selector: [("app".to_string(), "web".to_string())].into(),
            r#type: s("ClusterIP"),
            ..Default::default()
        }),
        status: Some(core::ServiceStatus::default()),
    };
    let (code, got) = send(
        &r,
        Method::POST,
        "/api/v1/namespaces/default/services",
        PB,
        envelope("v1", "Service", &svc),
    )
    .await;
    assert_eq!(code, 201, "{got}");
    assert_eq!(got["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(got["spec"]["ports"][1]["targetPort"], 81);
    assert!(got["spec"]["clusterIP"].is_string());

    // RBAC Role with the core group "".
    let role = rbac::Role {
        metadata: om("reader"),
        rules: vec![rbac::PolicyRule {
            verbs: vec!["get".into(), "list".into()],
            api_groups: vec![String::new()],
            resources: vec!["pods".into()],
            resource_names: vec![],
            non_resource_ur_ls: vec![],
        }],
    };
    same_as_json(
        &r,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles",
        ("rbac.authorization.k8s.io/v1", "Role"),
        role,
        json!({"metadata": {"labels": {"app": "web"}}, "rules": [{"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"]}]}),
    )
    .await;

    // PodDisruptionBudget minAvailable.
    let pdb = policy::PodDisruptionBudget {
        metadata: om("pdb"),
        spec: Some(policy::PodDisruptionBudgetSpec {
            min_available: int(1),
            selector: Some(meta::LabelSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
                match_expressions: vec![],
            }),
            ..Default::default()
        }),
        status: Some(policy::PodDisruptionBudgetStatus {
            observed_generation: Some(0),
            current_healthy: Some(0),
            desired_healthy: Some(0),
            disruptions_allowed: Some(0),
            expected_pods: Some(0),
            ..Default::default()
        }),
    };
    let got = same_as_json(
        &r,
        "/apis/policy/v1/namespaces/default/poddisruptionbudgets",
        ("policy/v1", "PodDisruptionBudget"),
        pdb,
        json!({"metadata": {"labels": {"app": "web"}}, "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
               "status": {"observedGeneration": 0, "currentHealthy": 0, "desiredHealthy": 0, "disruptionsAllowed": 0, "expectedPods": 0}}),
    )
    .await;
    assert_eq!(got["spec"]["minAvailable"], 1);

    // ResourceQuota: a map of Quantities.
    let quota = core::ResourceQuota {
        metadata: om("quota"),
        spec: Some(core::ResourceQuotaSpec {
            hard: [
                ("pods".to_string(), Quantity { string: s("10") }),
                ("requests.cpu".to_string(), Quantity { string: s("2") }),
            ]
            .into(),
            ..Default::default()
        }),
        status: Some(core::ResourceQuotaStatus::default()),
    };
    same_as_json(
        &r,
        "/api/v1/namespaces/default/resourcequotas",
        ("v1", "ResourceQuota"),
        quota,
        json!({"metadata": {"labels": {"app": "web"}}, "spec": {"hard": {"pods": "10", "requests.cpu": "2"}}, "status": {}}),
    )
    .await;
}

#[tokio::test]
async fn malformed_protobuf_bodies_are_bad_requests() {
    let r = app().await;
    let cm = core::ConfigMap {
        metadata: om("c"),
        data: [("a".to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    let good = envelope("v1", "ConfigMap", &cm);
    let path = "/api/v1/namespaces/default/configmaps";
    let (code, st) = send(&r, Method::POST, path, PB, good[..good.len() - 3].to_vec()).await;
    assert_eq!(code, 400, "{st}");
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["reason"], "BadRequest");
    assert!(st["message"].as_str().unwrap().contains("protobuf"), "{st}");
    let (code, st) = send(
        &r,
        Method::POST,
        path,
        PB,
        b"{\"kind\": \"ConfigMap\"}".to_vec(),
    )
    .await;
    assert_eq!((code, st["reason"].as_str()), (400, Some("BadRequest")));
    // A kind skiff does not serve: 415, as before.
    let (code, _) = send(
        &r,
        Method::POST,
        path,
        PB,
        envelope("example.com/v1", "Widget", &cm),
    )
    .await;
    assert_eq!(code, 415);
    // The good body still works.
    let (code, got) = send(&r, Method::POST, path, PB, good).await;
    assert_eq!(code, 201, "{got}");
    assert_eq!(got["data"], json!({"a": "1"}));
}

#[tokio::test]
async fn openapi_v2_is_json_when_json_is_acceptable_and_a_stub_for_protobuf_clients() {
    let r = app().await;
    let get = |accept: &'static str| {
        let r = r.clone();
        async move {
            let mut req = Request::builder()
                .uri("/openapi/v2")
                .header("accept", accept)
                .body(Body::empty())
                .unwrap();
            req.extensions_mut().insert(Identity {
                user: "system:admin".into(),
                groups: vec!["system:masters".into()],
                uid: String::new(),
            });
            let resp = r.oneshot(req).await.unwrap();
            let code = resp.status().as_u16();
            let ct = resp
                .headers()
                .get("content-type")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (code, ct, body)
        }
    };
    let (code, ct, body) = get("application/json").await;
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["swagger"], "2.0");
    assert!(doc["definitions"]["io.k8s.api.apps.v1.Deployment"].is_object());
    // Cached: the same bytes again.
    let (_, _, again) = get("application/json, */*").await;
    assert_eq!(body, again);
    // kubectl's Accept: gnostic protobuf only.
    let (code, ct, body) = get("application/com.github.proto-openapi.spec.v2@v1.0+protobuf").await;
    assert_eq!(code, 200);
    assert!(ct.contains("protobuf"), "{ct}");
    assert!(
        body.starts_with(b"\x0a\x032.0"),
        "gnostic Document.swagger first"
    );
    let (code, _, _) = get("text/html").await;
    assert_eq!(code, 406);
}
