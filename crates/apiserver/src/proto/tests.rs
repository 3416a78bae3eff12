//! Decoder tests: typed k8s-pb messages encoded with prost, wrapped in the `k8s\0` envelope,
//! decoded and compared with the JSON Go would have written.

use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::batch::v1 as batch;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::policy::v1 as policy;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{RawExtension, TypeMeta, Unknown};
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::{Value, json};

use super::{ProtoError, decode, go_duration};

fn s(x: &str) -> Option<String> {
    Some(x.to_string())
}

fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
    let u = Unknown {
        type_meta: Some(TypeMeta {
            api_version: s(api_version),
            kind: s(kind),
        }),
        raw: Some(raw),
        content_encoding: s(""),
        content_type: s(""),
    };
    [b"k8s\x00".to_vec(), u.encode_to_vec()].concat()
}

fn dec(api_version: &str, kind: &str, m: &impl Message) -> Value {
    match decode(&envelope(api_version, kind, m.encode_to_vec())) {
        Ok(Some(v)) => v,
        other => panic!("{kind}: {other:?}"),
    }
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

fn q(x: &str) -> Quantity {
    Quantity { string: s(x) }
}

/// ObjectMeta as Go's typed client writes it: every non-pointer field present, empty ones too.
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

fn pod_spec() -> core::PodSpec {
    let c = core::Container {
        name: s("web"),
        image: s("nginx:1.25"),
        command: vec!["nginx".into(), "-g".into(), String::new()],
        ports: vec![core::ContainerPort {
            name: s("http"),
            host_port: Some(0),
            container_port: Some(80),
            protocol: s("TCP"),
            host_ip: s(""),
        }],
        env: vec![
            core::EnvVar {
                name: s("A"),
                value: s("1"),
                value_from: None,
            },
            core::EnvVar {
                name: s("POD"),
                value: s(""),
                value_from: Some(core::EnvVarSource {
                    field_ref: Some(core::ObjectFieldSelector {
                        api_version: s("v1"),
                        field_path: s("metadata.name"),
                    }),
                    ..Default::default()
                }),
            },
        ],
        resources: Some(core::ResourceRequirements {
            limits: [
                ("cpu".to_string(), q("500m")),
                ("memory".into(), q("128Mi")),
            ]
            .into(),
            requests: [("cpu".to_string(), q("250m"))].into(),
            claims: vec![],
        }),
        liveness_probe: Some(core::Probe {
            handler: Some(core::ProbeHandler {
                http_get: Some(core::HttpGetAction {
                    path: s("/healthz"),
                    port: string("http"),
                    host: s(""),
                    scheme: s("HTTP"),
                    http_headers: vec![],
                }),
                ..Default::default()
            }),
            initial_delay_seconds: Some(3),
            timeout_seconds: Some(0),
            period_seconds: Some(10),
            success_threshold: Some(0),
            failure_threshold: Some(3),
            termination_grace_period_seconds: None,
        }),
        readiness_probe: Some(core::Probe {
            handler: Some(core::ProbeHandler {
                tcp_socket: Some(core::TcpSocketAction {
                    port: int(80),
                    host: s(""),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: vec![core::VolumeMount {
            name: s("scratch"),
            read_only: Some(false),
            mount_path: s("/scratch"),
            sub_path: s(""),
            ..Default::default()
        }],
        image_pull_policy: s("IfNotPresent"),
        stdin: Some(false),
        ..Default::default()
    };
    core::PodSpec {
        containers: vec![c],
        restart_policy: s("OnFailure"),
        termination_grace_period_seconds: Some(30),
        dns_policy: s("ClusterFirst"),
        service_account_name: s(""),
        volumes: vec![
            core::Volume {
                name: s("scratch"),
                volume_source: Some(core::VolumeSource {
                    empty_dir: Some(core::EmptyDirVolumeSource {
                        medium: s(""),
                        size_limit: None,
                    }),
                    ..Default::default()
                }),
            },
            core::Volume {
                name: s("cfg"),
                volume_source: Some(core::VolumeSource {
                    config_map: Some(core::ConfigMapVolumeSource {
                        local_object_reference: Some(core::LocalObjectReference {
                            name: s("settings"),
                        }),
                        default_mode: Some(420),
                        optional: Some(false),
                        items: vec![],
                    }),
                    ..Default::default()
                }),
            },
        ],
        tolerations: vec![core::Toleration {
            key: s("node.kubernetes.io/not-ready"),
            operator: s("Exists"),
            value: s(""),
            effect: s("NoExecute"),
            toleration_seconds: Some(300),
        }],
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

fn pod_spec_json() -> Value {
    json!({
        "containers": [{
            "name": "web",
            "image": "nginx:1.25",
            "command": ["nginx", "-g", ""],
            "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
            "env": [
                {"name": "A", "value": "1"},
                {"name": "POD", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}
            ],
            "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "250m"}},
            "livenessProbe": {
                "httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                "initialDelaySeconds": 3, "periodSeconds": 10, "failureThreshold": 3
            },
            "readinessProbe": {"tcpSocket": {"port": 80}},
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "imagePullPolicy": "IfNotPresent"
        }],
        "restartPolicy": "OnFailure",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "volumes": [
            {"name": "scratch", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "settings", "defaultMode": 420, "optional": false}}
        ],
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        "automountServiceAccountToken": false
    })
}

#[test]
fn job_with_a_full_pod_template() {
    let job = batch::Job {
        metadata: Some(meta::ObjectMeta {
            owner_references: vec![meta::OwnerReference {
                api_version: s("batch/v1"),
                kind: s("CronJob"),
                name: s("nightly"),
                uid: s("1234"),
                controller: Some(true),
                block_owner_deletion: None,
            }],
            annotations: [(
                "cronjob.kubernetes.io/instantiate".to_string(),
                "manual".to_string(),
            )]
            .into(),
            ..om("nightly-manual").unwrap_or_default()
        }),
        spec: Some(batch::JobSpec {
            backoff_limit: Some(0),
            parallelism: Some(1),
            template: Some(core::PodTemplateSpec {
                metadata: Some(meta::ObjectMeta {
                    creation_timestamp: Some(meta::Time::default()),
                    ..Default::default()
                }),
                spec: Some(pod_spec()),
            }),
            ..Default::default()
        }),
        status: Some(batch::JobStatus::default()),
    };
    let got = dec("batch/v1", "Job", &job);
    let want = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "nightly-manual",
            "creationTimestamp": null,
            "labels": {"app": "web"},
            "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly", "uid": "1234", "controller": true}]
        },
        "spec": {
            "backoffLimit": 0,
            "parallelism": 1,
            "template": {"metadata": {"creationTimestamp": null}, "spec": pod_spec_json()}
        },
        "status": {}
    });
    assert_eq!(got, want);
}

#[test]
fn deployment_strategy_and_replicas() {
    let d = apps::Deployment {
        metadata: om("web"),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(0),
            selector: Some(meta::LabelSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
                match_expressions: vec![meta::LabelSelectorRequirement {
                    key: s("tier"),
                    operator: s("In"),
                    values: vec!["a".into(), "b".into()],
                }],
            }),
            strategy: Some(apps::DeploymentStrategy {
                r#type: s("RollingUpdate"),
                rolling_update: Some(apps::RollingUpdateDeployment {
                    max_unavailable: int(0),
                    max_surge: string("25%"),
                }),
            }),
            min_ready_seconds: Some(0),
            ..Default::default()
        }),
        status: None,
    };
    let got = dec("apps/v1", "Deployment", &d);
    assert_eq!(
        got["spec"],
        json!({
            "replicas": 0,
            "selector": {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}}
        })
    );
}

#[test]
fn service_target_port_zero_is_unset() {
    let svc = core::Service {
        metadata: om("web"),
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
                    name: s("raw"),
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
    let got = dec("v1", "Service", &svc);
    assert_eq!(
        got["spec"]["ports"],
        json!([
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"},
            {"name": "raw", "protocol": "TCP", "port": 81}
        ])
    );
    assert_eq!(got["spec"]["type"], "ClusterIP");
}

#[test]
fn rbac_role_keeps_the_empty_core_group() {
    let r = rbac::Role {
        metadata: om("reader"),
        rules: vec![rbac::PolicyRule {
            verbs: vec!["get".into(), "list".into()],
            api_groups: vec![String::new()],
            resources: vec!["pods".into()],
            resource_names: vec![],
            non_resource_ur_ls: vec![],
        }],
    };
    let got = dec("rbac.authorization.k8s.io/v1", "Role", &r);
    assert_eq!(
        got["rules"],
        json!([{"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"]}])
    );
}

#[test]
fn pdb_min_available_time_and_quantities() {
    let p = policy::PodDisruptionBudget {
        metadata: Some(meta::ObjectMeta {
            creation_timestamp: Some(meta::Time {
                seconds: Some(1_700_000_000),
                nanos: Some(123_000_000),
            }),
            ..om("pdb").unwrap_or_default()
        }),
        spec: Some(policy::PodDisruptionBudgetSpec {
            min_available: int(1),
            ..Default::default()
        }),
        status: Some(policy::PodDisruptionBudgetStatus {
            conditions: vec![meta::Condition {
                r#type: s("DisruptionAllowed"),
                status: s("True"),
                observed_generation: Some(1),
                last_transition_time: Some(meta::Time {
                    seconds: Some(0),
                    nanos: Some(0),
                }),
                reason: s("SufficientPods"),
                message: s(""),
            }],
            ..Default::default()
        }),
    };
    let got = dec("policy/v1", "PodDisruptionBudget", &p);
    assert_eq!(got["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");
    assert_eq!(got["spec"], json!({"minAvailable": 1}));
    assert_eq!(
        got["status"]["conditions"][0],
        json!({"type": "DisruptionAllowed", "status": "True", "observedGeneration": 1,
               "lastTransitionTime": "1970-01-01T00:00:00Z", "reason": "SufficientPods"})
    );

    let quota = core::ResourceQuota {
        metadata: om("q"),
        spec: Some(core::ResourceQuotaSpec {
            hard: [
                ("pods".to_string(), q("10")),
                ("requests.cpu".into(), q("2")),
            ]
            .into(),
            ..Default::default()
        }),
        status: None,
    };
    let got = dec("v1", "ResourceQuota", &quota);
    assert_eq!(
        got["spec"],
        json!({"hard": {"pods": "10", "requests.cpu": "2"}})
    );
}

#[test]
fn special_types_micro_time_duration_raw_bytes() {
    let ev = k8s_pb::api::events::v1::Event {
        metadata: om("e"),
        event_time: Some(meta::MicroTime {
            seconds: Some(1_700_000_000),
            nanos: Some(5_000),
        }),
        reporting_controller: s("skiff"),
        ..Default::default()
    };
    let got = dec("events.k8s.io/v1", "Event", &ev);
    assert_eq!(got["eventTime"], "2023-11-14T22:13:20.000005Z");

    let cr = apps::ControllerRevision {
        metadata: om("r"),
        data: Some(RawExtension {
            raw: Some(br#"{"spec":{"a":1}}"#.to_vec()),
        }),
        revision: Some(2),
    };
    let got = dec("apps/v1", "ControllerRevision", &cr);
    assert_eq!(got["data"], json!({"spec": {"a": 1}}));
    assert_eq!(got["revision"], 2);

    let sec = core::Secret {
        metadata: om("s"),
        data: [("k".to_string(), vec![0u8, 1, 2])].into(),
        r#type: s("Opaque"),
        ..Default::default()
    };
    assert_eq!(dec("v1", "Secret", &sec)["data"]["k"], "AAEC");

    assert_eq!(go_duration(0), "0s");
    assert_eq!(go_duration(1_500_000), "1.5ms");
    assert_eq!(go_duration(3_723_000_000_000), "1h2m3s");
    assert_eq!(go_duration(90_000_000_000), "1m30s");
    assert_eq!(go_duration(-2_000_000_000), "-2s");
}

#[test]
fn unknown_fields_are_skipped_and_packed_repeats_read() {
    let mut raw = core::ConfigMap {
        metadata: om("c"),
        data: [("a".to_string(), "1".to_string())].into(),
        ..Default::default()
    }
    .encode_to_vec();
    // field 99, length-delimited, unknown to the schema
    raw.extend([0x9a, 0x06, 0x02, b'h', b'i']);
    let got = match decode(&envelope("v1", "ConfigMap", raw)) {
        Ok(Some(v)) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(got["data"], json!({"a": "1"}));

    // SupplementalGroups (int64, repeated): prost packs them.
    let pod = core::Pod {
        metadata: om("p"),
        spec: Some(core::PodSpec {
            security_context: Some(core::PodSecurityContext {
                supplemental_groups: vec![1000, 2000],
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    };
    let got = dec("v1", "Pod", &pod);
    assert_eq!(
        got["spec"]["securityContext"]["supplementalGroups"],
        json!([1000, 2000])
    );
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let job = batch::Job {
        metadata: om("j"),
        spec: Some(batch::JobSpec {
            template: Some(core::PodTemplateSpec {
                metadata: None,
                spec: Some(pod_spec()),
            }),
            ..Default::default()
        }),
        status: None,
    };
    let good = envelope("batch/v1", "Job", job.encode_to_vec());
    assert!(matches!(decode(&good), Ok(Some(_))));
    // Every truncation is rejected or decodes to something; none panics.
    let mut errors = 0;
    for n in 0..good.len() {
        if decode(&good[..n]).is_err() {
            errors += 1;
        }
    }
    assert!(
        errors > good.len() / 2,
        "{errors} of {} truncations rejected",
        good.len()
    );
    assert!(matches!(decode(b"nope"), Err(ProtoError::Envelope)));
    // A string field that is not UTF-8.
    let bad = [
        b"k8s\x00".to_vec(),
        vec![0x0a, 0x0a, 0x0a, 0x02, b'v', b'1', 0x12, 0x04],
    ]
    .concat();
    let mut bad = bad;
    bad.extend(b"Pod\xff");
    assert!(decode(&bad).is_err());
    // A wire type that does not match: metadata.name (string) sent as a varint.
    let raw = vec![0x0a, 0x02, 0x08, 0x01];
    assert!(matches!(
        decode(&envelope("v1", "ConfigMap", raw)),
        Err(ProtoError::WireType { .. })
    ));
    // gzip content encoding is refused.
    let u = Unknown {
        type_meta: Some(TypeMeta {
            api_version: s("v1"),
            kind: s("ConfigMap"),
        }),
        raw: Some(vec![]),
        content_encoding: s("gzip"),
        content_type: None,
    };
    let body = [b"k8s\x00".to_vec(), u.encode_to_vec()].concat();
    assert!(matches!(decode(&body), Err(ProtoError::ContentEncoding(_))));
    // Deep nesting is refused, not a stack overflow: JSONSchemaProps.not (tag 28) nested.
    let mut inner: Vec<u8> = Vec::new();
    for _ in 0..200 {
        let mut m = vec![(28 << 3) | 2, 0x01];
        prost::encoding::encode_varint(inner.len() as u64, &mut m);
        m.extend(&inner);
        inner = m;
    }
    let props = super::MESSAGES
        .iter()
        .position(|m| m.name.ends_with("apiextensions.v1.JsonSchemaProps"))
        .expect("JSONSchemaProps in the table");
    assert!(matches!(
        super::message(&inner, props, 0),
        Err(ProtoError::TooDeep)
    ));
}

#[test]
fn zero_is_unset_names_real_fields() {
    for (m, f) in super::ZERO_IS_UNSET {
        let msg = super::MESSAGES.iter().find(|x| x.name == *m);
        assert!(
            msg.is_some_and(|x| x.fields.iter().any(|y| y.json == *f)),
            "{m}.{f} is not in the table"
        );
    }
}

#[test]
fn kinds_without_a_schema_are_not_decoded() {
    assert!(matches!(
        decode(&envelope("example.com/v1", "Widget", vec![])),
        Ok(None)
    ));
}

#[test]
fn corrupted_bytes_never_panic() {
    let job = batch::Job {
        metadata: om("j"),
        spec: Some(batch::JobSpec {
            template: Some(core::PodTemplateSpec {
                metadata: om("t"),
                spec: Some(pod_spec()),
            }),
            ..Default::default()
        }),
        status: None,
    };
    let good = envelope("batch/v1", "Job", job.encode_to_vec());
    let mut decoded = 0;
    for i in 4..good.len() {
        for b in [
            0x00u8,
            0x01,
            0x7f,
            0x80,
            0xff,
            good[i] ^ 0x08,
            good[i].wrapping_add(1),
        ] {
            let mut bad = good.clone();
            bad[i] = b;
            if let Ok(Some(_)) = decode(&bad) {
                decoded += 1;
            }
        }
    }
    // Some corruptions (inside strings, numbers) still decode; none panics.
    assert!(decoded > 0);
}
