//! The scheduling queue: active pods by priority (then FIFO), a backoff heap for pods that
//! failed recently, and the unschedulable set that cluster changes move back.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

/// Where a queued pod is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    Backoff(Instant),
    /// Failed for lack of a fitting node: waits for a cluster change (or the flush interval).
    Unschedulable {
        since: Instant,
        until: Instant,
    },
    /// Popped and being scheduled or bound.
    InFlight,
}

#[derive(Debug)]
struct Entry {
    pod: Arc<Pod>,
    attempts: u32,
    seq: u64,
    priority: i32,
    state: State,
}

/// Backoff parameters.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First backoff.
    pub initial: Duration,
    /// Upper bound.
    pub max: Duration,
}

impl Backoff {
    /// initial × 2^(attempts−1), capped at max.
    pub fn after(&self, attempts: u32) -> Duration {
        let shift = attempts.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << shift).min(self.max)
    }
}

/// The queue of pods waiting for a node.
#[derive(Debug)]
pub struct Queue {
    entries: HashMap<String, Entry>,
    active: BinaryHeap<(i32, Reverse<u64>, String)>,
    backoff_heap: BinaryHeap<Reverse<(Instant, u64, String)>>,
    seq: u64,
    backoff: Backoff,
}

fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// Whether an update changes what scheduling looks at (spec or labels, not status).
fn relevant_change(old: &Pod, new: &Pod) -> bool {
    old.spec != new.spec || old.metadata.labels != new.metadata.labels
}

impl Queue {
    /// An empty queue.
    pub fn new(backoff: Backoff) -> Self {
        Queue {
            entries: HashMap::new(),
            active: BinaryHeap::new(),
            backoff_heap: BinaryHeap::new(),
            seq: 0,
            backoff,
        }
    }

    /// Number of pods known to the queue (any state).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no pod waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push_active(&mut self, key: &str) {
        self.seq += 1;
        if let Some(e) = self.entries.get_mut(key) {
            e.state = State::Active;
            e.seq = self.seq;
            self.active
                .push((e.priority, Reverse(self.seq), key.to_string()));
        }
    }

    fn push_backoff(&mut self, key: &str, until: Instant) {
        self.seq += 1;
        if let Some(e) = self.entries.get_mut(key) {
            e.state = State::Backoff(until);
            e.seq = self.seq;
            self.backoff_heap
                .push(Reverse((until, self.seq, key.to_string())));
        }
    }

    /// Adds a new pending pod or updates a queued one. An unschedulable pod whose spec or labels
    /// changed is retried (after its backoff).
    pub fn add_or_update(&mut self, key: &str, pod: Arc<Pod>, now: Instant) {
        match self.entries.get_mut(key) {
            None => {
                self.entries.insert(
                    key.to_string(),
                    Entry {
                        priority: priority(&pod),
                        pod,
                        attempts: 0,
                        seq: 0,
                        state: State::Active,
                    },
                );
                self.push_active(key);
            }
            Some(e) => {
                let changed = relevant_change(&e.pod, &pod);
                e.pod = pod;
                if let (true, State::Unschedulable { until, .. }) = (changed, e.state) {
                    if until <= now {
                        self.push_active(key);
                    } else {
                        self.push_backoff(key, until);
                    }
                }
            }
        }
    }

    /// Forgets a pod (deleted, bound, or no longer ours).
    pub fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Whether the pod is being scheduled or bound right now.
    pub fn in_flight(&self, key: &str) -> bool {
        self.entries
            .get(key)
            .is_some_and(|e| e.state == State::InFlight)
    }

    /// Moves pods whose backoff expired to the active heap; returns the next expiry, if any.
    pub fn flush_backoff(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse((until, seq, key))) = self.backoff_heap.peek().cloned() {
            let valid = self
                .entries
                .get(&key)
                .is_some_and(|e| e.seq == seq && e.state == State::Backoff(until));
            if !valid {
                self.backoff_heap.pop();
                continue;
            }
            if until > now {
                return Some(until);
            }
            self.backoff_heap.pop();
            self.push_active(&key);
        }
        None
    }

    /// Takes the highest-priority, oldest active pod and marks it in flight.
    pub fn pop(&mut self) -> Option<(String, Arc<Pod>)> {
        while let Some((_, Reverse(seq), key)) = self.active.pop() {
            if let Some(e) = self.entries.get_mut(&key)
                && e.seq == seq
                && e.state == State::Active
            {
                e.state = State::InFlight;
                return Some((key, e.pod.clone()));
            }
        }
        None
    }

    /// The pod could not be placed: it waits for a cluster change; its backoff grows.
    pub fn unschedulable(&mut self, key: &str, now: Instant) {
        let backoff = self.backoff;
        if let Some(e) = self.entries.get_mut(key) {
            e.attempts += 1;
            e.state = State::Unschedulable {
                since: now,
                until: now + backoff.after(e.attempts),
            };
        }
    }

    /// Scheduling or binding failed for another reason (API error): retry after backoff.
    pub fn error(&mut self, key: &str, now: Instant) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.attempts += 1;
        let until = now + self.backoff.after(e.attempts);
        self.push_backoff(key, until);
    }

    /// A cluster change may make unschedulable pods fit: move them to backoff or active.
    /// `only` limits the move to pods for which the predicate holds.
    pub fn move_unschedulable(&mut self, now: Instant) -> usize {
        let keys: Vec<(String, Instant)> = self
            .entries
            .iter()
            .filter_map(|(k, e)| match e.state {
                State::Unschedulable { until, .. } => Some((k.clone(), until)),
                _ => None,
            })
            .collect();
        for (k, until) in &keys {
            if *until <= now {
                self.push_active(k);
            } else {
                self.push_backoff(k, *until);
            }
        }
        keys.len()
    }

    /// Retries pods that stayed unschedulable longer than `max` even without a cluster change.
    pub fn flush_unschedulable(&mut self, now: Instant, max: Duration) {
        let keys: Vec<String> = self
            .entries
            .iter()
            .filter_map(|(k, e)| match e.state {
                State::Unschedulable { since, .. } if now.duration_since(since) >= max => {
                    Some(k.clone())
                }
                _ => None,
            })
            .collect();
        for k in keys {
            self.push_active(&k);
        }
    }

    /// Whether any pod is ready to be popped.
    pub fn has_active(&self) -> bool {
        !self.active.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn pod(prio: i32) -> Arc<Pod> {
        Arc::new(Pod {
            spec: Some(PodSpec {
                priority: Some(prio),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn q() -> Queue {
        Queue::new(Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        })
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = q();
        let now = Instant::now();
        q.add_or_update("a", pod(0), now);
        q.add_or_update("b", pod(10), now);
        q.add_or_update("c", pod(0), now);
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|(k, _)| k)).collect();
        assert_eq!(order, vec!["b", "a", "c"]);
        assert!(q.in_flight("a"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        assert_eq!(b.after(1), Duration::from_secs(1));
        assert_eq!(b.after(3), Duration::from_secs(4));
        assert_eq!(b.after(9), Duration::from_secs(10));
    }

    #[test]
    fn unschedulable_waits_for_a_cluster_change() {
        let mut q = q();
        let now = Instant::now();
        q.add_or_update("a", pod(0), now);
        q.pop();
        q.unschedulable("a", now);
        assert!(q.pop().is_none());
        // a status-only update does not retry it
        q.add_or_update("a", pod(0), now);
        assert!(q.pop().is_none());
        assert_eq!(q.flush_backoff(now + Duration::from_secs(5)), None);
        assert!(q.pop().is_none(), "no cluster change yet");
        // a node appears: back after its 1 s backoff
        assert_eq!(q.move_unschedulable(now), 1);
        assert!(q.pop().is_none(), "still backing off");
        q.flush_backoff(now + Duration::from_secs(2));
        assert_eq!(q.pop().map(|(k, _)| k).as_deref(), Some("a"));
    }

    #[test]
    fn spec_change_retries_and_flush_retries() {
        let mut q = q();
        let now = Instant::now();
        q.add_or_update("a", pod(0), now);
        q.pop();
        q.unschedulable("a", now);
        q.add_or_update("a", pod(5), now + Duration::from_secs(2));
        assert!(q.pop().is_some(), "changed spec after backoff: active");
        q.unschedulable("a", now);
        q.flush_unschedulable(now + Duration::from_secs(61), Duration::from_secs(60));
        assert!(q.pop().is_some());
    }

    #[test]
    fn errors_back_off() {
        let mut q = q();
        let now = Instant::now();
        q.add_or_update("a", pod(0), now);
        q.pop();
        q.error("a", now);
        assert!(q.pop().is_none());
        assert!(q.flush_backoff(now).is_some());
        q.flush_backoff(now + Duration::from_millis(1001));
        assert!(q.pop().is_some());
        q.remove("a");
        assert!(q.is_empty());
    }
}
