//! The progress line: while a run lasts, one log line at a fixed interval
//! (`log.progress_interval_seconds`) with each stage's rate over the interval, the queue's depth
//! when the source samples it, the commits made, and the sizes of the batches the self-sizing
//! batcher chose over the interval (mean, last, largest), as `sluice_batch_messages` shows them.
//!
//! Metrics answer the same questions for whoever scrapes them; the progress line is for whoever only
//! has the log (a terminal, `kubectl logs`, a backfill run by hand). It reads the shared [`Stats`],
//! so it adds nothing to the hot path.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::background::BackgroundTask;
use crate::stats::Stats;

/// The counters the progress line compares between two ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    at: Instant,
    received: u64,
    parsed: u64,
    transformed: u64,
    loaded: u64,
    dead_letters: u64,
    duplicates: u64,
    commits: u64,
    /// Messages in the last transaction committed, and the most in one since the previous reading.
    last_batch: u64,
    max_batch: u64,
}

impl Counts {
    fn read(stats: &Stats) -> Counts {
        let (last_batch, max_batch) = stats.take_batch_sizes();
        Counts {
            at: Instant::now(),
            received: stats.received.get(),
            parsed: stats.parsed.get(),
            transformed: stats.transformed.get(),
            loaded: stats.loaded.get(),
            dead_letters: stats.rejected.get(),
            duplicates: stats.duplicates.get(),
            commits: stats.batches_committed.get(),
            last_batch,
            max_batch,
        }
    }
}

/// Messages per second of each stage between two readings, rounded to a tenth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub received: f64,
    pub parsed: f64,
    pub transformed: f64,
    pub loaded: f64,
    pub dead_letters: f64,
    /// Transactions committed in the interval (not a rate: a count reads better at this scale).
    pub commits: u64,
    /// Sizes of the batches committed in the interval, if any was.
    pub batches: Option<BatchSizes>,
}

/// Messages per committed transaction over an interval (rows, dead letters and skipped duplicates
/// alike, as `sluice_batch_messages` counts them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSizes {
    /// Mean, rounded to a tenth.
    pub mean: f64,
    /// The last batch committed.
    pub last: u64,
    /// The largest batch committed.
    pub max: u64,
}

fn rates(before: &Counts, now: &Counts) -> Rates {
    let seconds = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| (b.saturating_sub(a) as f64 / seconds * 10.0).round() / 10.0;
    Rates {
        received: rate(before.received, now.received),
        parsed: rate(before.parsed, now.parsed),
        transformed: rate(before.transformed, now.transformed),
        loaded: rate(before.loaded, now.loaded),
        dead_letters: rate(before.dead_letters, now.dead_letters),
        commits: now.commits.saturating_sub(before.commits),
        batches: batch_sizes(before, now),
    }
}

fn batch_sizes(before: &Counts, now: &Counts) -> Option<BatchSizes> {
    let commits = now.commits.saturating_sub(before.commits);
    if commits == 0 {
        return None;
    }
    let messages = |c: &Counts| c.loaded + c.dead_letters + c.duplicates;
    let total = messages(now).saturating_sub(messages(before));
    Some(BatchSizes {
        mean: (total as f64 / commits as f64 * 10.0).round() / 10.0,
        last: now.last_batch,
        max: now.max_batch,
    })
}

/// Logs a progress line every `every` until the run stops it.
pub fn task(stats: Arc<Stats>, every: Duration) -> BackgroundTask {
    BackgroundTask::new("progress line", move |stop: CancellationToken| async move {
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = Counts::read(&stats);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            let now = Counts::read(&stats);
            log(&stats, &rates(&before, &now), &now);
            before = now;
        }
    })
}

fn log(stats: &Stats, r: &Rates, now: &Counts) {
    // The backlog as the source knows it: the SQS queue's depth, or the Kinesis shard furthest
    // behind the tip (each field printed only when there is a figure).
    let shard_lag_ms_max = stats.kinesis.get().and_then(|k| k.max_millis_behind());
    // The batch sizes only when something was committed in the interval.
    let batch_mean = r.batches.map(|b| b.mean);
    let batch_last = r.batches.map(|b| b.last);
    let batch_max = r.batches.map(|b| b.max);
    tracing::info!(
        received_per_s = r.received,
        parsed_per_s = r.parsed,
        transformed_per_s = r.transformed,
        loaded_per_s = r.loaded,
        dead_letters_per_s = r.dead_letters,
        commits = r.commits,
        commits_total = now.commits,
        batch_mean,
        batch_last,
        batch_max,
        in_flight = stats.in_flight(),
        queue_waiting = stats.queue.waiting_if_sampled(),
        shard_lag_ms_max,
        "progress"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rates_are_per_second_over_the_interval() {
        let stats = Stats::default();
        let before = Counts::read(&stats);
        stats.record_received(40);
        stats.record_parsed(35, 5);
        stats.record_transformed(35);
        stats.record_commit(30, 5, 0, Duration::from_millis(3));
        stats.record_commit(3, 0, 0, Duration::from_millis(3));
        tokio::time::advance(Duration::from_secs(3)).await;
        let now = Counts::read(&stats);
        assert_eq!(
            rates(&before, &now),
            Rates {
                received: 13.3,
                parsed: 11.7,
                transformed: 11.7,
                loaded: 11.0,
                dead_letters: 1.7,
                commits: 2,
                batches: Some(BatchSizes {
                    mean: 19.0,
                    last: 3,
                    max: 35,
                }),
            }
        );
        assert_eq!(
            rates(&now, &now).received,
            0.0,
            "no time, no division by zero"
        );
        assert_eq!(rates(&now, &now).batches, None, "no commit, no batch sizes");
    }

    #[tokio::test(start_paused = true)]
    async fn batch_sizes_cover_the_interval_since_the_last_line() {
        let stats = Stats::default();
        stats.record_commit(5, 0, 0, Duration::from_millis(1));
        let first = Counts::read(&stats);
        // Duplicates count: the ledger skipped them, but the batcher chose them.
        stats.record_commit(900, 50, 50, Duration::from_millis(9));
        stats.record_commit(9_000, 0, 0, Duration::from_millis(30));
        stats.record_commit(1, 0, 0, Duration::from_millis(1));
        tokio::time::advance(Duration::from_secs(10)).await;
        let second = Counts::read(&stats);
        assert_eq!(
            rates(&first, &second).batches,
            Some(BatchSizes {
                mean: 3_333.7,
                last: 1,
                max: 9_000,
            })
        );
        // The largest of the earlier interval does not linger into the next one.
        stats.record_commit(7, 0, 0, Duration::from_millis(1));
        let third = Counts::read(&stats);
        assert_eq!(
            rates(&second, &third).batches,
            Some(BatchSizes {
                mean: 7.0,
                last: 7,
                max: 7,
            })
        );
    }
}
