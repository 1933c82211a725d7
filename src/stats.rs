//! Counters and histograms shared by every stage.
//!
//! The run summary, the idle detector, the readiness probe and the Prometheus endpoint all read the
//! same values, so there is one source of truth for "how many messages are where". The metric types
//! are prometheus-client's (atomics behind an `Arc`), so recording costs an atomic add and exporting
//! needs no copying.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::source::kinesis::metrics::KinesisStats;

/// Pipeline-wide measurements. Each stage only ever adds to its own.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Messages handed to sluice by the source (redeliveries count again).
    pub received: Counter,
    pub parsed: Counter,
    pub parse_rejected: Counter,
    pub transformed: Counter,
    /// Rows committed to the target table.
    pub loaded: Counter,
    /// Dead-letter records committed.
    pub rejected: Counter,
    /// Dead letters the dead-letter queue did not take (they are in the dead-letter table only).
    pub dead_letters_not_forwarded: Counter,
    /// Messages skipped because the ledger had committed them before.
    pub duplicates: Counter,
    /// Messages whose acknowledgement (delete, checkpoint) has been attempted after commit.
    pub acknowledged: Counter,
    /// Messages handed back to the source unprocessed (shutdown).
    pub released: Counter,
    pub batches_committed: Counter,
    pub commit_retries: Counter,
    /// Source calls (SQS ReceiveMessage, Kinesis GetRecords and GetShardIterator) that failed for a
    /// passing reason (connection lost or refused, timeout, throttling) and are tried again after a
    /// backoff pause.
    pub source_retries: Counter,
    /// Seconds of those pauses, in all: how long the source waited on its endpoint.
    pub source_backoff_seconds: Counter<f64, AtomicU64>,
    /// Messages per committed transaction.
    pub batch_messages: Histogram,
    /// Messages in the last committed transaction, and the most in one since the progress line last
    /// read it ([`Stats::take_batch_sizes`]): what the self-sizing batcher chose, for the log.
    last_batch_messages: AtomicU64,
    max_batch_messages: AtomicU64,
    /// Seconds from BEGIN to COMMIT of a batch, retries excluded.
    pub commit_seconds: Histogram,
    /// Seconds from the source accepting a message to the commit of its row or dead-letter record.
    pub end_to_end_seconds: Histogram,
    /// Sink connections open and prepared.
    pub postgres_connections: Gauge,
    /// The Kinesis source's own measurements, when that source runs (exported only then).
    pub kinesis: std::sync::OnceLock<Arc<KinesisStats>>,
    /// What the source's queue reports, sampled (SQS only): the scaling signal.
    pub queue: QueueGauges,
    /// Milliseconds after `started` at which the source last delivered a message.
    last_receive_ms: AtomicU64,
    /// Milliseconds after `started` of the last commit or acknowledgement.
    last_progress_ms: AtomicU64,
    stopped_before_end: AtomicBool,
    /// Parts of the source that have not yet read up to what is there (see [`CatchingUp`]).
    catching_up: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            received: Counter::default(),
            parsed: Counter::default(),
            parse_rejected: Counter::default(),
            transformed: Counter::default(),
            loaded: Counter::default(),
            rejected: Counter::default(),
            dead_letters_not_forwarded: Counter::default(),
            duplicates: Counter::default(),
            kinesis: std::sync::OnceLock::new(),
            acknowledged: Counter::default(),
            released: Counter::default(),
            batches_committed: Counter::default(),
            commit_retries: Counter::default(),
            source_retries: Counter::default(),
            source_backoff_seconds: Counter::default(),
            batch_messages: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            last_batch_messages: AtomicU64::new(0),
            max_batch_messages: AtomicU64::new(0),
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.5, 12)),
            end_to_end_seconds: Histogram::new(exponential_buckets(0.01, 3.0, 12)),
            postgres_connections: Gauge::default(),
            queue: QueueGauges::default(),
            last_receive_ms: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
            stopped_before_end: AtomicBool::new(false),
            catching_up: AtomicU64::new(0),
        }
    }
}

/// A part of the source that is still catching up (see [`Stats::is_catching_up`]); it is caught
/// up when this is dropped, whichever way its task ends.
pub struct CatchingUp {
    stats: Arc<Stats>,
}

impl Drop for CatchingUp {
    fn drop(&mut self) {
        self.stats.catching_up.fetch_sub(1, Relaxed);
    }
}

/// The source queue's depth and arrival rate as last sampled. An autoscaler reads these to add
/// replicas before a backlog grows; they stay 0 (and `sampled` false) for sources without a queue.
#[derive(Debug, Default)]
pub struct QueueGauges {
    /// Messages waiting to be received (SQS `ApproximateNumberOfMessages`).
    pub waiting: Gauge,
    /// Messages received by some consumer and not yet deleted (`ApproximateNumberOfMessagesNotVisible`).
    pub not_visible: Gauge,
    /// Messages per second entering the queue, estimated between two samples.
    pub arrival_per_second: Gauge<f64, AtomicU64>,
    sampled: AtomicBool,
}

impl QueueGauges {
    /// Records one sample of the queue's counts.
    pub fn record(&self, waiting: i64, not_visible: i64) {
        self.waiting.set(waiting);
        self.not_visible.set(not_visible);
        self.sampled.store(true, Relaxed);
    }

    /// The last sample's waiting count, if the queue has been sampled.
    pub fn waiting_if_sampled(&self) -> Option<i64> {
        self.sampled.load(Relaxed).then(|| self.waiting.get())
    }
}

/// A consistent-enough copy of the counters, for printing. `sluice run --summary json` prints it as
/// one JSON object with these field names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Summary {
    pub received: u64,
    pub loaded: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub released: u64,
    pub acknowledged: u64,
    pub batches_committed: u64,
    /// A file source was stopped before the end of its file.
    pub stopped_before_end: bool,
}

impl std::fmt::Display for Summary {
    /// The one line `sluice run` prints on exit; scripts parse it, so its shape is fixed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sluice: received={} loaded={} rejected={} duplicates={}",
            self.received, self.loaded, self.rejected, self.duplicates
        )?;
        if self.stopped_before_end {
            f.write_str(" stopped_before_end=1")?;
        }
        Ok(())
    }
}

impl Stats {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Time since the moment `stamp` recorded (milliseconds after `started`).
    fn since(&self, stamp: &AtomicU64) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(stamp.load(Relaxed)))
    }

    /// A file source stopped before the end of its file (a signal came).
    pub fn record_stopped_before_end(&self) {
        self.stopped_before_end.store(true, Relaxed);
    }

    pub fn record_received(&self, n: usize) {
        if n > 0 {
            self.received.inc_by(n as u64);
            self.last_receive_ms.store(self.now_ms(), Relaxed);
        }
    }

    pub fn record_parsed(&self, ok: usize, rejected: usize) {
        self.parsed.inc_by(ok as u64);
        self.parse_rejected.inc_by(rejected as u64);
    }

    pub fn record_transformed(&self, n: usize) {
        self.transformed.inc_by(n as u64);
    }

    pub fn record_commit(&self, loaded: usize, rejected: usize, duplicates: usize, took: Duration) {
        self.loaded.inc_by(loaded as u64);
        self.rejected.inc_by(rejected as u64);
        self.duplicates.inc_by(duplicates as u64);
        let messages = (loaded + rejected + duplicates) as u64;
        self.last_batch_messages.store(messages, Relaxed);
        self.max_batch_messages.fetch_max(messages, Relaxed);
        self.batches_committed.inc();
        self.batch_messages.observe(messages as f64);
        self.commit_seconds.observe(took.as_secs_f64());
        self.last_progress_ms.store(self.now_ms(), Relaxed);
    }

    /// The messages of the last committed transaction, and the most in one since the previous call
    /// (0 when none committed since); resets the latter.
    pub fn take_batch_sizes(&self) -> (u64, u64) {
        let max = self.max_batch_messages.swap(0, Relaxed);
        (self.last_batch_messages.load(Relaxed), max)
    }

    pub fn record_acknowledged(&self, n: usize) {
        self.acknowledged.inc_by(n as u64);
        self.last_progress_ms.store(self.now_ms(), Relaxed);
    }

    /// A source call failed for a passing reason; the next try comes after `pause`.
    pub fn record_source_retry(&self, pause: Duration) {
        self.source_retries.inc();
        self.source_backoff_seconds.inc_by(pause.as_secs_f64());
    }

    pub fn record_released(&self, n: usize) {
        self.released.inc_by(n as u64);
    }

    /// Received but neither acknowledged nor released yet.
    pub fn in_flight(&self) -> u64 {
        let done = self.acknowledged.get() + self.released.get();
        self.received.get().saturating_sub(done)
    }

    /// How long nothing has moved: no delivery, commit or acknowledgement. With nothing in flight
    /// this is how long the source has been free to receive and found nothing; a source held back by
    /// a stalled sink delivers nothing too, but is not idle until the sink has caught up.
    pub fn idle_for(&self) -> Duration {
        self.since(&self.last_receive_ms)
            .min(self.since(&self.last_progress_ms))
    }

    /// Some part of the source has not yet read up to what is there: a source that has not yet
    /// asked, or was answered "more is behind this", is not idle however long it has delivered
    /// nothing.
    pub fn is_catching_up(&self) -> bool {
        self.catching_up.load(Relaxed) > 0
    }

    /// Marks a part of the source (a Kinesis shard reader, the source's start-up) as catching up
    /// until the returned guard is dropped.
    pub fn catching_up(self: &Arc<Self>) -> CatchingUp {
        self.catching_up.fetch_add(1, Relaxed);
        CatchingUp {
            stats: self.clone(),
        }
    }

    /// Messages are waiting but nothing has been committed or acknowledged for `limit`.
    pub fn stalled(&self, limit: Duration) -> bool {
        self.in_flight() > 0 && self.since(&self.last_progress_ms) > limit
    }

    /// Records how long ago the source accepted each message (milliseconds since the Unix epoch).
    pub fn observe_lag(&self, sent_at_ms: impl Iterator<Item = i64>) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for sent_at in sent_at_ms {
            self.end_to_end_seconds
                .observe((now_ms - sent_at).max(0) as f64 / 1000.0);
        }
    }

    pub fn summary(&self) -> Summary {
        Summary {
            received: self.received.get(),
            loaded: self.loaded.get(),
            rejected: self.rejected.get(),
            duplicates: self.duplicates.get(),
            released: self.released.get(),
            acknowledged: self.acknowledged.get(),
            batches_committed: self.batches_committed.get(),
            stopped_before_end: self.stopped_before_end.load(Relaxed),
        }
    }

    /// Registers every measurement under the `sluice_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sluice");
        let counters: [(&str, &str, &Counter); 12] = [
            (
                "messages_received",
                "Messages delivered by the source (redeliveries count again)",
                &self.received,
            ),
            (
                "messages_parsed",
                "Messages that passed parsing and validation",
                &self.parsed,
            ),
            (
                "messages_parse_rejected",
                "Messages rejected by the parse stage",
                &self.parse_rejected,
            ),
            (
                "messages_transformed",
                "Messages masked and transformed into rows",
                &self.transformed,
            ),
            (
                "rows_loaded",
                "Rows committed to the target table",
                &self.loaded,
            ),
            (
                "dead_letters",
                "Dead-letter records committed",
                &self.rejected,
            ),
            (
                "dead_letters_not_forwarded",
                "Dead letters the dead-letter queue did not take (kept in the dead-letter table only)",
                &self.dead_letters_not_forwarded,
            ),
            (
                "duplicates",
                "Messages skipped because they were committed before",
                &self.duplicates,
            ),
            (
                "messages_acknowledged",
                "Messages acknowledged at the source after commit",
                &self.acknowledged,
            ),
            (
                "messages_released",
                "Messages handed back to the source unprocessed",
                &self.released,
            ),
            (
                "batches_committed",
                "Transactions committed by the sink",
                &self.batches_committed,
            ),
            (
                "commit_retries",
                "Batch commits retried after a transient failure",
                &self.commit_retries,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register(
            "source_retries",
            "Source calls (SQS receive, Kinesis GetRecords) failed for a passing reason and retried after a backoff",
            self.source_retries.clone(),
        );
        r.register(
            "source_backoff_seconds",
            "Seconds the source waited between such retries",
            self.source_backoff_seconds.clone(),
        );
        let mut histogram =
            |name: &str, help: &str, h: &Histogram| r.register(name, help, h.clone());
        histogram(
            "batch_messages",
            "Messages per committed transaction",
            &self.batch_messages,
        );
        histogram(
            "commit_seconds",
            "Time from BEGIN to COMMIT of a batch",
            &self.commit_seconds,
        );
        histogram(
            "end_to_end_seconds",
            "Time from the source accepting a message to the commit of its row or dead-letter record",
            &self.end_to_end_seconds,
        );
        r.register(
            "postgres_connections",
            "Sink connections to PostgreSQL that are open and ready",
            self.postgres_connections.clone(),
        );
        if let Some(kinesis) = self.kinesis.get() {
            kinesis.register(r);
        }
        r.register(
            "queue_messages_waiting",
            "Messages waiting in the source queue (SQS ApproximateNumberOfMessages, sampled)",
            self.queue.waiting.clone(),
        );
        r.register(
            "queue_messages_not_visible",
            "Messages received from the source queue by any consumer and not yet deleted (sampled)",
            self.queue.not_visible.clone(),
        );
        r.register(
            "queue_arrival_per_second",
            "Messages per second entering the source queue, estimated between two samples",
            self.queue.arrival_per_second.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_has_the_documented_shape() {
        let stats = Stats::default();
        stats.record_received(5);
        stats.record_commit(3, 1, 1, Duration::from_millis(5));
        assert_eq!(
            stats.summary().to_string(),
            "sluice: received=5 loaded=3 rejected=1 duplicates=1"
        );
        assert_eq!(stats.in_flight(), 5);
        stats.record_acknowledged(4);
        stats.record_released(1);
        assert_eq!(stats.in_flight(), 0);
        let json = serde_json::to_value(stats.summary()).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"received": 5, "loaded": 3, "rejected": 1, "duplicates": 1,
                "released": 1, "acknowledged": 4, "batches_committed": 1, "stopped_before_end": false})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_means_waiting_messages_and_no_progress() {
        let stats = Stats::default();
        assert!(
            !stats.stalled(Duration::ZERO),
            "nothing in flight is not a stall"
        );
        stats.record_received(1);
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(stats.stalled(Duration::from_millis(1)));
        stats.record_acknowledged(1);
        assert!(!stats.stalled(Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_counts_from_the_last_movement() {
        let stats = Stats::default();
        stats.record_received(1);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(stats.idle_for(), Duration::from_secs(3));
        stats.record_acknowledged(1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(stats.idle_for(), Duration::from_secs(1));
    }
}
