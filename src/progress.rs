//! The progress line: while a run lasts, one log line at a fixed interval
//! (`log.progress_interval_seconds`) with each stage's rate over the interval, the queue's depth
//! when the source samples it, and the commits made.
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
    commits: u64,
}

impl Counts {
    fn read(stats: &Stats) -> Counts {
        Counts {
            at: Instant::now(),
            received: stats.received.get(),
            parsed: stats.parsed.get(),
            transformed: stats.transformed.get(),
            loaded: stats.loaded.get(),
            dead_letters: stats.rejected.get(),
            commits: stats.batches_committed.get(),
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
    }
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
    tracing::info!(
        received_per_s = r.received,
        parsed_per_s = r.parsed,
        transformed_per_s = r.transformed,
        loaded_per_s = r.loaded,
        dead_letters_per_s = r.dead_letters,
        commits = r.commits,
        commits_total = now.commits,
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
            }
        );
        assert_eq!(
            rates(&now, &now).received,
            0.0,
            "no time, no division by zero"
        );
    }
}
