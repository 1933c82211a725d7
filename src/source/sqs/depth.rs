//! Sampling the queue's depth: the signal an autoscaler needs to add replicas before a backlog
//! grows, and the figure the progress line shows.
//!
//! SQS says how many messages wait (`ApproximateNumberOfMessages`) and how many are received but not
//! deleted (`…NotVisible`), but not how fast they arrive. Between two samples the messages in the
//! queue changed by arrivals minus deletes, and this replica knows its own deletes (its
//! acknowledgements), so arrivals ≈ Δ(waiting + not visible) + own deletes. With one consumer that
//! is the arrival rate; with several, each replica's figure misses the others' deletes (the README
//! shows the query that sums them). A failed sample is logged and skipped: a metric must never stop
//! the pipeline.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::aws;
use crate::background::BackgroundTask;
use crate::error_chain::Chain;
use crate::stats::Stats;

/// One reading of the queue and of this replica's deletes.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    /// Waiting plus not visible.
    in_queue: i64,
    deleted: u64,
}

/// Messages per second that entered the queue between two samples (never negative: the counts are
/// approximate).
fn arrival_rate(before: &Sample, now: &Sample) -> f64 {
    let seconds = now.at.duration_since(before.at).as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    let grown = now.in_queue - before.in_queue;
    let deleted = now.deleted.saturating_sub(before.deleted) as i64;
    ((grown + deleted).max(0) as f64 / seconds * 10.0).round() / 10.0
}

/// Reads the queue's depth every `every` into `stats.queue` while the run lasts.
pub fn sampler(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    every: Duration,
    stats: Arc<Stats>,
) -> BackgroundTask {
    BackgroundTask::new("queue depth sampler", move |stop| async move {
        sample_depth(client, queue_url, every, stats, stop).await;
        Ok(())
    })
}

async fn sample_depth(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    every: Duration,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let names = [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
    ];
    let mut before: Option<Sample> = None;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let attributes = match aws::queue_attributes(&client, &queue_url, &names).await {
            Ok(attributes) => attributes,
            Err(e) => {
                tracing::warn!(queue_url, error = %Chain(&e), "cannot read the queue's depth; trying again later");
                continue;
            }
        };
        let count = |name: &QueueAttributeName| {
            attributes
                .get(name)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        let (waiting, not_visible) = (count(&names[0]), count(&names[1]));
        stats.queue.record(waiting, not_visible);
        let now = Sample {
            at: Instant::now(),
            in_queue: waiting + not_visible,
            deleted: stats.acknowledged.get(),
        };
        if let Some(before) = &before {
            stats
                .queue
                .arrival_per_second
                .set(arrival_rate(before, &now));
        }
        before = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn arrivals_are_growth_plus_own_deletes() {
        let before = Sample {
            at: Instant::now(),
            in_queue: 100,
            deleted: 0,
        };
        tokio::time::advance(Duration::from_secs(10)).await;
        let at = Instant::now();
        let grew = Sample {
            at,
            in_queue: 150,
            deleted: 250,
        };
        assert_eq!(arrival_rate(&before, &grew), 30.0, "(50 + 250) / 10 s");
        let drained = Sample {
            at,
            in_queue: 0,
            deleted: 20,
        };
        assert_eq!(arrival_rate(&before, &drained), 0.0, "never negative");
        assert_eq!(arrival_rate(&grew, &grew), 0.0, "no time, no rate");
    }
}
