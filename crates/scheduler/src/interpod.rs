//! Required inter-pod affinity and anti-affinity: topology counts computed once per scheduling
//! attempt, then checked per node.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Pod, PodAffinityTerm};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::plugins::Failure;

/// InterPodAffinity reasons.
pub const AFFINITY: &str = "node(s) didn't match pod affinity rules";
/// The incoming pod's anti-affinity.
pub const ANTI_AFFINITY: &str = "node(s) didn't match pod anti-affinity rules";
/// Existing pods' anti-affinity against the incoming pod.
pub const EXISTING_ANTI_AFFINITY: &str = "node(s) didn't satisfy existing pods anti-affinity rules";

/// Whether a label selector matches labels (nil selector matches nothing, empty matches all).
pub fn selector_matches(sel: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else {
        return false;
    };
    if let Some(ml) = sel.match_labels.as_ref()
        && ml.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return false;
    }
    sel.match_expressions.iter().flatten().all(|e| {
        let v = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or(&[]);
        match e.operator.as_str() {
            "In" => v.is_some_and(|v| values.contains(v)),
            "NotIn" => v.is_none_or(|v| !values.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            _ => false,
        }
    })
}

fn term_matches_pod(owner: &Pod, term: &PodAffinityTerm, other: &Pod) -> bool {
    let other_ns = other.metadata.namespace.as_deref().unwrap_or("");
    let ns_ok = match (&term.namespaces, &term.namespace_selector) {
        (Some(list), _) if !list.is_empty() => list.iter().any(|n| n == other_ns),
        // An empty namespaceSelector selects every namespace; label-based namespace selectors
        // would need namespace labels, which the scheduler does not watch: treated as all.
        (_, Some(_)) => true,
        _ => owner.metadata.namespace.as_deref().unwrap_or("") == other_ns,
    };
    let empty = BTreeMap::new();
    ns_ok
        && selector_matches(
            term.label_selector.as_ref(),
            other.metadata.labels.as_ref().unwrap_or(&empty),
        )
}

fn required_terms(pod: &Pod, anti: bool) -> &[PodAffinityTerm] {
    let a = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    let terms = if anti {
        a.and_then(|a| a.pod_anti_affinity.as_ref()).and_then(|x| {
            x.required_during_scheduling_ignored_during_execution
                .as_deref()
        })
    } else {
        a.and_then(|a| a.pod_affinity.as_ref()).and_then(|x| {
            x.required_during_scheduling_ignored_during_execution
                .as_deref()
        })
    };
    terms.unwrap_or(&[])
}

/// Whether a pod has required anti-affinity terms (existing pods with them are checked).
pub fn has_required_anti_affinity(pod: &Pod) -> bool {
    !required_terms(pod, true).is_empty()
}

/// Per-attempt state: topology pairs that attract or repel the incoming pod.
#[derive(Debug, Default)]
pub struct State {
    affinity_terms: Vec<PodAffinityTerm>,
    anti_terms: Vec<PodAffinityTerm>,
    /// (topologyKey, value) → pods matching all affinity terms there.
    affinity_counts: HashMap<(String, String), usize>,
    /// (topologyKey, value) → pods matching an anti-affinity term there.
    anti_counts: HashMap<(String, String), usize>,
    /// (topologyKey, value) → existing pods whose anti-affinity repels the incoming pod.
    existing_anti: HashMap<(String, String), usize>,
    /// No pod matches the affinity terms but the pod matches its own terms: it may start the group.
    self_affinity_ok: bool,
}

/// Whether the incoming pod needs the inter-pod computation at all.
pub fn relevant(pod: &Pod, any_existing_anti: bool) -> bool {
    any_existing_anti
        || !required_terms(pod, false).is_empty()
        || !required_terms(pod, true).is_empty()
}

/// Builds the state from every (node labels, pods on the node).
pub fn prepare<'a>(
    pod: &Pod,
    nodes: impl Iterator<Item = (&'a BTreeMap<String, String>, Vec<&'a Pod>)>,
) -> State {
    let mut st = State {
        affinity_terms: required_terms(pod, false).to_vec(),
        anti_terms: required_terms(pod, true).to_vec(),
        ..Default::default()
    };
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let mut any_affinity_match = false;
    for (node_labels, pods) in nodes {
        for other in pods {
            if !st.affinity_terms.is_empty()
                && st
                    .affinity_terms
                    .iter()
                    .all(|t| term_matches_pod(pod, t, other))
            {
                any_affinity_match = true;
                for t in &st.affinity_terms {
                    if let Some(v) = node_labels.get(&t.topology_key) {
                        *st.affinity_counts
                            .entry((t.topology_key.clone(), v.clone()))
                            .or_default() += 1;
                    }
                }
            }
            for t in &st.anti_terms {
                if term_matches_pod(pod, t, other)
                    && let Some(v) = node_labels.get(&t.topology_key)
                {
                    *st.anti_counts
                        .entry((t.topology_key.clone(), v.clone()))
                        .or_default() += 1;
                }
            }
            for t in required_terms(other, true) {
                if term_matches_pod(other, t, pod)
                    && let Some(v) = node_labels.get(&t.topology_key)
                {
                    *st.existing_anti
                        .entry((t.topology_key.clone(), v.clone()))
                        .or_default() += 1;
                }
            }
        }
    }
    st.self_affinity_ok = !any_affinity_match
        && st.affinity_terms.iter().all(|t| {
            t.namespaces.as_ref().is_none_or(|n| n.is_empty())
                && selector_matches(t.label_selector.as_ref(), labels)
        });
    st
}

/// Checks a node against the state, in kube-scheduler's order: the pod's affinity, its
/// anti-affinity, then existing pods' anti-affinity.
pub fn filter(st: &State, node_labels: &BTreeMap<String, String>) -> Option<Failure> {
    let hit = |m: &HashMap<(String, String), usize>, key: &str| {
        node_labels
            .get(key)
            .is_some_and(|v| m.get(&(key.to_string(), v.clone())).is_some_and(|c| *c > 0))
    };
    if !st.affinity_terms.is_empty() {
        let all_keys = st
            .affinity_terms
            .iter()
            .all(|t| node_labels.contains_key(&t.topology_key));
        let ok = all_keys
            && (st.self_affinity_ok
                || st
                    .affinity_terms
                    .iter()
                    .all(|t| hit(&st.affinity_counts, &t.topology_key)));
        if !ok {
            return Some(Failure {
                reason: AFFINITY.into(),
                resolvable: false,
            });
        }
    }
    if st
        .anti_terms
        .iter()
        .any(|t| hit(&st.anti_counts, &t.topology_key))
    {
        return Some(Failure {
            reason: ANTI_AFFINITY.into(),
            resolvable: true,
        });
    }
    if st
        .existing_anti
        .keys()
        .any(|(k, _)| hit(&st.existing_anti, k))
    {
        return Some(Failure {
            reason: EXISTING_ANTI_AFFINITY.into(),
            resolvable: true,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Affinity, PodAffinity, PodAntiAffinity, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(app: &str, anti: Option<&str>, aff: Option<&str>) -> Pod {
        let term = |v: &str| PodAffinityTerm {
            label_selector: Some(LabelSelector {
                match_labels: Some([("app".to_string(), v.to_string())].into()),
                ..Default::default()
            }),
            topology_key: "zone".into(),
            ..Default::default()
        };
        Pod {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                labels: Some([("app".to_string(), app.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                affinity: Some(Affinity {
                    pod_anti_affinity: anti.map(|v| PodAntiAffinity {
                        required_during_scheduling_ignored_during_execution: Some(vec![term(v)]),
                        ..Default::default()
                    }),
                    pod_affinity: aff.map(|v| PodAffinity {
                        required_during_scheduling_ignored_during_execution: Some(vec![term(v)]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn zone(z: &str) -> BTreeMap<String, String> {
        [("zone".to_string(), z.to_string())].into()
    }

    #[test]
    fn anti_affinity_keeps_pods_apart() {
        let (za, zb) = (zone("a"), zone("b"));
        let existing = pod("web", None, None);
        let incoming = pod("web", Some("web"), None);
        let st = prepare(
            &incoming,
            vec![(&za, vec![&existing]), (&zb, vec![])].into_iter(),
        );
        assert_eq!(
            filter(&st, &za).map(|f| f.reason),
            Some(ANTI_AFFINITY.into())
        );
        assert_eq!(filter(&st, &zb), None);
    }

    #[test]
    fn existing_anti_affinity_repels() {
        let (za, zb) = (zone("a"), zone("b"));
        let existing = pod("db", Some("web"), None);
        let incoming = pod("web", None, None);
        assert!(relevant(&incoming, true));
        let st = prepare(
            &incoming,
            vec![(&za, vec![&existing]), (&zb, vec![])].into_iter(),
        );
        assert_eq!(
            filter(&st, &za).map(|f| f.reason),
            Some(EXISTING_ANTI_AFFINITY.into())
        );
        assert_eq!(filter(&st, &zb), None);
    }

    #[test]
    fn affinity_follows_matching_pods_or_starts_the_group() {
        let (za, zb) = (zone("a"), zone("b"));
        let cache = pod("cache", None, None);
        let incoming = pod("web", None, Some("cache"));
        let st = prepare(
            &incoming,
            vec![(&za, vec![&cache]), (&zb, vec![])].into_iter(),
        );
        assert_eq!(filter(&st, &za), None);
        assert_eq!(filter(&st, &zb).map(|f| f.reason), Some(AFFINITY.into()));
        // first pod of a self-affine group may go anywhere with the topology key
        let first = pod("web", None, Some("web"));
        let st = prepare(&first, vec![(&za, vec![]), (&zb, vec![])].into_iter());
        assert_eq!(filter(&st, &zb), None);
        assert!(
            filter(&st, &BTreeMap::new()).is_some(),
            "node without the key"
        );
    }
}
