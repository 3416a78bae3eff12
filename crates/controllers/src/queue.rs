//! A de-duplicating work queue of object keys (`ns/name`), with delayed re-queues, drained by
//! one worker per controller so that one key is never reconciled twice at once.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// The queue; clones share it.
#[derive(Clone, Default)]
pub struct Queue {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Queue {
    /// Adds `key` unless it is already waiting.
    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        let mut s = match self.inner.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if s.set.insert(key.clone()) {
            s.order.push_back(key);
            drop(s);
            self.inner.notify.notify_one();
        }
    }

    /// Adds `key` after `delay`.
    pub fn add_after(&self, key: impl Into<String>, delay: Duration) {
        let key = key.into();
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    fn pop(&self) -> Option<String> {
        let mut s = match self.inner.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let k = s.order.pop_front()?;
        s.set.remove(&k);
        Some(k)
    }

    /// Waits for the next key.
    pub async fn next(&self) -> String {
        loop {
            let notified = self.inner.notify.notified();
            if let Some(k) = self.pop() {
                return k;
            }
            notified.await;
        }
    }

    /// Runs `reconcile` for every key forever. `Ok(Some(d))` re-queues the key after `d`; an
    /// error re-queues it after a back-off.
    pub async fn work<F, Fut>(&self, name: &'static str, reconcile: F)
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Option<Duration>, crate::ControllerError>>,
    {
        loop {
            let key = self.next().await;
            match reconcile(key.clone()).await {
                Ok(Some(d)) => self.add_after(key, d),
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(controller = name, %key, error = %e, "reconcile failed; retrying");
                    self.add_after(key, Duration::from_millis(500));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dedups_and_orders() {
        let q = Queue::default();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.next().await, "a");
        assert_eq!(q.next().await, "b");
        q.add_after("c", Duration::from_millis(10));
        assert_eq!(q.next().await, "c");
    }
}
