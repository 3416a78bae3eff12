//! Automatic compaction: a background task notes (time, revision) checkpoints and compacts
//! history older than the window. It holds only a weak reference and stops when the store drops.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::{Revision, Store};

/// How often the compactor wakes up for a given window.
pub(crate) fn tick_for(window: Duration) -> Duration {
    (window / 5).clamp(Duration::from_millis(10), Duration::from_secs(30))
}

/// The revision to compact to: the newest checkpoint at least `window` old. Older checkpoints
/// are dropped from the queue.
pub(crate) fn due_revision(
    checkpoints: &mut VecDeque<(Instant, Revision)>,
    now: Instant,
    window: Duration,
) -> Option<Revision> {
    let mut due = None;
    while let Some(&(at, rev)) = checkpoints.front() {
        if now.saturating_duration_since(at) >= window {
            due = Some(rev);
            checkpoints.pop_front();
        } else {
            break;
        }
    }
    due
}

/// Starts the compactor for `store` if a tokio runtime is available.
pub(crate) fn spawn(store: &Arc<dyn Store>, window: Duration) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no tokio runtime: automatic store compaction is off");
        return;
    };
    let weak: Weak<dyn Store> = Arc::downgrade(store);
    handle.spawn(run(weak, window));
}

async fn run(weak: Weak<dyn Store>, window: Duration) {
    let tick = tick_for(window);
    let mut checkpoints: VecDeque<(Instant, Revision)> = VecDeque::new();
    loop {
        {
            let Some(store) = weak.upgrade() else { return };
            match store.current_revision().await {
                Ok(rev) => {
                    if checkpoints.back().is_none_or(|&(_, last)| last != rev) {
                        checkpoints.push_back((Instant::now(), rev));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "compactor: cannot read the current revision"),
            }
            if let Some(rev) = due_revision(&mut checkpoints, Instant::now(), window)
                && rev > 0
            {
                match store.compact(rev).await {
                    Ok(()) => tracing::debug!(revision = rev, "compacted store history"),
                    Err(e) => {
                        tracing::warn!(error = %e, revision = rev, "compactor: compaction failed")
                    }
                }
            }
        }
        tokio::time::sleep(tick).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_revision_picks_newest_old_enough_checkpoint() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut q: VecDeque<_> = [
            (t0, 5),
            (t0 + Duration::from_secs(3), 9),
            (t0 + Duration::from_secs(8), 20),
        ]
        .into();
        assert_eq!(due_revision(&mut q, t0 + Duration::from_secs(5), w), None);
        assert_eq!(
            due_revision(&mut q, t0 + Duration::from_secs(14), w),
            Some(9)
        );
        assert_eq!(q.len(), 1);
        assert_eq!(
            due_revision(&mut q, t0 + Duration::from_secs(30), w),
            Some(20)
        );
        assert!(q.is_empty());
    }

    #[test]
    fn tick_is_clamped() {
        assert_eq!(
            tick_for(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
        assert_eq!(tick_for(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(tick_for(Duration::from_secs(10)), Duration::from_secs(2));
    }
}
