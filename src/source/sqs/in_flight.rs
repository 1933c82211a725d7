//! Bookkeeping of SQS messages received but not yet acknowledged.
//!
//! Two jobs: bound how many messages sluice holds at once (a poller reserves room before it receives,
//! so a stalled sink stops the receives instead of growing memory or letting visibility timeouts
//! expire en masse), and remember when each message would become visible again, so the extender can
//! push that back while the message waits in the pipeline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

pub struct InFlight {
    room: Semaphore,
    /// Receipt handle → when SQS will hand the message out again if we do nothing.
    visible_again: Mutex<HashMap<String, Instant>>,
}

impl InFlight {
    pub fn new(max_in_flight: usize) -> InFlight {
        InFlight {
            room: Semaphore::new(max_in_flight),
            visible_again: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `n` more messages may be held.
    pub async fn reserve(&self, n: u32) {
        if let Ok(permit) = self.room.acquire_many(n).await {
            permit.forget();
        }
    }

    /// Gives back room that a receive did not fill.
    pub fn unreserve(&self, n: usize) {
        self.room.add_permits(n);
    }

    /// Starts tracking received messages; returns how many were not tracked already. A handle seen
    /// twice (one message handed to two receives) occupies room once, so the receiver must give back
    /// the room it reserved for the repeat.
    pub fn track<'a>(
        &self,
        handles: impl Iterator<Item = &'a str>,
        visible_again: Instant,
    ) -> usize {
        let mut map = self.lock();
        handles
            .filter(|handle| map.insert((*handle).to_owned(), visible_again).is_none())
            .count()
    }

    /// Forgets acknowledged (or released) messages and frees their room.
    pub fn finish<'a>(&self, handles: impl Iterator<Item = &'a str>) -> usize {
        let removed = {
            let mut map = self.lock();
            handles.filter(|h| map.remove(*h).is_some()).count()
        };
        self.room.add_permits(removed);
        removed
    }

    /// Messages that become visible within `margin` of `now`.
    pub fn due(&self, now: Instant, margin: Duration) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, at)| at.saturating_duration_since(now) <= margin)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Records a successful visibility extension (ignoring messages acknowledged meanwhile).
    pub fn extended(&self, handles: &[String], visible_again: Instant) {
        let mut map = self.lock();
        for handle in handles {
            if let Some(at) = map.get_mut(handle) {
                *at = visible_again;
            }
        }
    }

    /// Every handle still held.
    pub fn handles(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // The map stays consistent even if a holder panicked: every operation is a single insert or
        // remove.
        self.visible_again.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_is_freed_only_by_finishing_tracked_messages() {
        let f = InFlight::new(3);
        f.reserve(3).await;
        let now = Instant::now();
        assert_eq!(
            f.track(["a", "b", "a"].into_iter(), now + Duration::from_secs(30)),
            2,
            "a repeated handle is tracked once"
        );
        f.unreserve(1);
        assert_eq!(f.room.available_permits(), 1);
        assert_eq!(f.finish(["a", "zzz"].into_iter()), 1);
        assert_eq!(f.room.available_permits(), 2);
        assert_eq!(
            f.finish(["a"].into_iter()),
            0,
            "finishing twice frees nothing"
        );
        assert_eq!(f.handles(), vec!["b".to_owned()]);
    }

    #[test]
    fn due_lists_messages_close_to_visibility() {
        let f = InFlight::new(10);
        let now = Instant::now();
        f.track(["soon"].into_iter(), now + Duration::from_secs(5));
        f.track(["later"].into_iter(), now + Duration::from_secs(50));
        assert_eq!(f.due(now, Duration::from_secs(10)), vec!["soon".to_owned()]);
        f.extended(&["soon".to_owned()], now + Duration::from_secs(60));
        assert!(f.due(now, Duration::from_secs(10)).is_empty());
    }
}
