//! Pod admission defaults as a kubectl user sees them on a real `skiff server`: priority from a
//! PriorityClass, default not-ready/unreachable tolerations, requests from limits.
#![allow(clippy::unwrap_used)]

use skiff_e2e::{Kubectl, Server};

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: critical
  namespace: kube-system
spec:
  priorityClassName: system-cluster-critical
  containers:
  - name: c
    image: busybox
    resources:
      limits:
        cpu: 100m
        memory: 16Mi
"#;

#[test]
fn pod_admission_defaults() {
    let server = Server::start();
    let k = Kubectl::new(None, &server);
    let pcs = k.ok(&[
        "get",
        "priorityclasses",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.value} {end}",
    ]);
    assert!(
        pcs.contains("system-node-critical=2000001000")
            && pcs.contains("system-cluster-critical=2000000000"),
        "{pcs}"
    );
    k.ok_stdin(&["apply", "-f", "-"], POD);
    let got = k.ok(&[
        "get",
        "pod",
        "critical",
        "-n",
        "kube-system",
        "-o",
        "jsonpath={.spec.priority} {.spec.preemptionPolicy} {.spec.serviceAccountName} \
         {.spec.containers[0].resources.requests.cpu} {.status.qosClass} \
         {.spec.tolerations[*].key}",
    ]);
    assert_eq!(
        got,
        "2000000000 PreemptLowerPriority default 100m Guaranteed \
         node.kubernetes.io/not-ready node.kubernetes.io/unreachable"
    );
    let err = k.fails(&[
        "run",
        "nope",
        "--image=busybox",
        "--overrides",
        r#"{"spec": {"priorityClassName": "missing"}}"#,
    ]);
    assert!(
        err.contains("Forbidden") && err.contains("no PriorityClass with name missing was found"),
        "{err}"
    );
}
