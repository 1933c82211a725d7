//! Counters shared by every stage: the run summary, the idle detector and the metrics endpoint all
//! read the same atomics, so there is one source of truth for "how many messages are where".

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Pipeline-wide counters. Each stage only ever adds to its own.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Messages handed to sluice by the source (redeliveries count again).
    pub received: AtomicU64,
    pub parsed: AtomicU64,
    pub parse_rejected: AtomicU64,
    pub transformed: AtomicU64,
    /// Rows committed to the target table.
    pub loaded: AtomicU64,
    /// Dead-letter records committed.
    pub rejected: AtomicU64,
    /// Messages skipped because the ledger had committed them before.
    pub duplicates: AtomicU64,
    /// Messages whose acknowledgement (delete, checkpoint) has been attempted after commit.
    pub acknowledged: AtomicU64,
    /// Messages handed back to the source unprocessed (shutdown).
    pub released: AtomicU64,
    pub batches_committed: AtomicU64,
    pub commit_retries: AtomicU64,
    /// Milliseconds after `started` at which the source last delivered a message.
    last_receive_ms: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            received: AtomicU64::new(0),
            parsed: AtomicU64::new(0),
            parse_rejected: AtomicU64::new(0),
            transformed: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            released: AtomicU64::new(0),
            batches_committed: AtomicU64::new(0),
            commit_retries: AtomicU64::new(0),
            last_receive_ms: AtomicU64::new(0),
        }
    }
}

/// A consistent-enough copy of the counters, for printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub received: u64,
    pub loaded: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub released: u64,
}

impl std::fmt::Display for Summary {
    /// The one line `sluice run` prints on exit; scripts parse it, so its shape is fixed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sluice: received={} loaded={} rejected={} duplicates={}",
            self.received, self.loaded, self.rejected, self.duplicates
        )
    }
}

impl Stats {
    pub fn record_received(&self, n: usize) {
        if n > 0 {
            self.received.fetch_add(n as u64, Relaxed);
            self.last_receive_ms
                .store(self.started.elapsed().as_millis() as u64, Relaxed);
        }
    }

    pub fn record_parsed(&self, ok: usize, rejected: usize) {
        self.parsed.fetch_add(ok as u64, Relaxed);
        self.parse_rejected.fetch_add(rejected as u64, Relaxed);
    }

    pub fn record_transformed(&self, n: usize) {
        self.transformed.fetch_add(n as u64, Relaxed);
    }

    pub fn record_commit(&self, loaded: usize, rejected: usize, duplicates: usize) {
        self.loaded.fetch_add(loaded as u64, Relaxed);
        self.rejected.fetch_add(rejected as u64, Relaxed);
        self.duplicates.fetch_add(duplicates as u64, Relaxed);
        self.batches_committed.fetch_add(1, Relaxed);
    }

    pub fn record_acknowledged(&self, n: usize) {
        self.acknowledged.fetch_add(n as u64, Relaxed);
    }

    pub fn record_released(&self, n: usize) {
        self.released.fetch_add(n as u64, Relaxed);
    }

    /// Received but neither acknowledged nor released yet.
    pub fn in_flight(&self) -> u64 {
        let done = self.acknowledged.load(Relaxed) + self.released.load(Relaxed);
        self.received.load(Relaxed).saturating_sub(done)
    }

    /// How long the source has delivered nothing.
    pub fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_receive_ms.load(Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub fn summary(&self) -> Summary {
        Summary {
            received: self.received.load(Relaxed),
            loaded: self.loaded.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            released: self.released.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_has_the_documented_shape() {
        let stats = Stats::default();
        stats.record_received(5);
        stats.record_commit(3, 1, 1);
        assert_eq!(
            stats.summary().to_string(),
            "sluice: received=5 loaded=3 rejected=1 duplicates=1"
        );
        assert_eq!(stats.in_flight(), 5);
        stats.record_acknowledged(4);
        stats.record_released(1);
        assert_eq!(stats.in_flight(), 0);
    }
}
