//! Hard topology spread constraints (`whenUnsatisfiable: DoNotSchedule`): pod counts per
//! topology domain computed once per attempt, then the skew check per node.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Node, Pod, TopologySpreadConstraint};

use crate::interpod::selector_matches;
use crate::plugins::{Failure, node_matches_pod_selectors};

/// Skew too large.
pub const SPREAD: &str = "node(s) didn't match pod topology spread constraints";
/// The node lacks a topology key.
pub const MISSING_LABEL: &str =
    "node(s) didn't match pod topology spread constraints (missing required label)";

struct Constraint {
    key: String,
    max_skew: i64,
    self_match: i64,
    counts: HashMap<String, i64>,
    min: i64,
}

/// Per-attempt state.
#[derive(Default)]
pub struct State {
    constraints: Vec<Constraint>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("constraints", &self.constraints.len())
            .finish()
    }
}

/// Which constraints: `DoNotSchedule` (filter) or `ScheduleAnyway` (score).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// whenUnsatisfiable: DoNotSchedule.
    Hard,
    /// whenUnsatisfiable: ScheduleAnyway.
    Soft,
}

fn constraints(pod: &Pod, kind: Kind) -> Vec<&TopologySpreadConstraint> {
    let want = match kind {
        Kind::Hard => "DoNotSchedule",
        Kind::Soft => "ScheduleAnyway",
    };
    pod.spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.as_ref())
        .map(|cs| cs.iter().filter(|c| c.when_unsatisfiable == want).collect())
        .unwrap_or_default()
}

/// Whether the pod has spread constraints of this kind.
pub fn relevant(pod: &Pod, kind: Kind) -> bool {
    !constraints(pod, kind).is_empty()
}

/// Counts matching pods per domain over nodes that pass the pod's node affinity and carry the key.
pub fn prepare<'a>(
    pod: &Pod,
    kind: Kind,
    nodes: impl Iterator<Item = (&'a Node, Vec<&'a Pod>)> + Clone,
) -> State {
    let empty = BTreeMap::new();
    let pod_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let ns = pod.metadata.namespace.as_deref().unwrap_or("");
    let mut out = State::default();
    for c in constraints(pod, kind) {
        let mut selector = c.label_selector.clone().unwrap_or_default();
        for k in c.match_label_keys.iter().flatten() {
            if let Some(v) = pod_labels.get(k) {
                selector
                    .match_labels
                    .get_or_insert_with(BTreeMap::new)
                    .insert(k.clone(), v.clone());
            }
        }
        let honor_affinity = c.node_affinity_policy.as_deref() != Some("Ignore");
        let mut counts: HashMap<String, i64> = HashMap::new();
        for (node, pods) in nodes.clone() {
            let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
            let Some(value) = labels.get(&c.topology_key) else {
                continue;
            };
            if honor_affinity && !node_matches_pod_selectors(pod, node) {
                continue;
            }
            let n = pods
                .iter()
                .filter(|p| {
                    p.metadata.namespace.as_deref().unwrap_or("") == ns
                        && p.metadata.deletion_timestamp.is_none()
                        && selector_matches(
                            Some(&selector),
                            p.metadata.labels.as_ref().unwrap_or(&empty),
                        )
                })
                .count() as i64;
            *counts.entry(value.clone()).or_default() += n;
        }
        let mut min = counts.values().copied().min().unwrap_or(0);
        if let Some(md) = c.min_domains
            && (counts.len() as i64) < i64::from(md)
        {
            min = 0;
        }
        out.constraints.push(Constraint {
            key: c.topology_key.clone(),
            max_skew: i64::from(c.max_skew),
            self_match: i64::from(selector_matches(Some(&selector), pod_labels)),
            counts,
            min,
        });
    }
    out
}

/// Soft spread: matching pods already in the node's domains (lower is better); nodes without a
/// key count as the most crowded.
pub fn score_raw(st: &State, node_labels: &BTreeMap<String, String>) -> Option<i64> {
    let mut total = 0;
    for c in &st.constraints {
        let v = node_labels.get(&c.key)?;
        total += c.counts.get(v).copied().unwrap_or(0);
    }
    Some(total)
}

/// Checks one node.
pub fn filter(st: &State, node_labels: &BTreeMap<String, String>) -> Option<Failure> {
    for c in &st.constraints {
        let Some(v) = node_labels.get(&c.key) else {
            return Some(Failure {
                reason: MISSING_LABEL.into(),
                resolvable: false,
            });
        };
        let count = c.counts.get(v).copied().unwrap_or(0);
        if count + c.self_match - c.min > c.max_skew {
            return Some(Failure {
                reason: SPREAD.into(),
                resolvable: true,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, zone: Option<&str>) -> Node {
        let mut labels = BTreeMap::new();
        if let Some(z) = zone {
            labels.insert("zone".to_string(), z.to_string());
        }
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(spread: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                topology_spread_constraints: spread.then(|| {
                    vec![TopologySpreadConstraint {
                        max_skew: 1,
                        topology_key: "zone".into(),
                        when_unsatisfiable: "DoNotSchedule".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some([("app".to_string(), "web".to_string())].into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn skew_limits_the_fuller_zone() {
        let (a, b, bare) = (node("a", Some("a")), node("b", Some("b")), node("c", None));
        let existing = pod(false);
        let incoming = pod(true);
        assert!(relevant(&incoming, Kind::Hard));
        assert!(!relevant(&incoming, Kind::Soft));
        let nodes = vec![(&a, vec![&existing]), (&b, vec![]), (&bare, vec![])];
        let st = prepare(&incoming, Kind::Hard, nodes.into_iter());
        let labels = |n: &Node| n.metadata.labels.clone().unwrap();
        assert_eq!(
            filter(&st, &labels(&a)).map(|f| f.reason),
            Some(SPREAD.into())
        );
        assert_eq!(filter(&st, &labels(&b)), None);
        assert_eq!(
            filter(&st, &labels(&bare)).map(|f| f.reason),
            Some(MISSING_LABEL.into())
        );
        assert_eq!(score_raw(&st, &labels(&a)), Some(1));
        assert_eq!(score_raw(&st, &labels(&b)), Some(0));
        assert_eq!(score_raw(&st, &labels(&bare)), None);
    }
}
