//! The arithmetic behind the report: ratios between measurements, and the sizing rules that turn
//! them into pollers, shards and servers. Each rule is a small function, tested here, so the
//! report's prose never hides a computation and a new section reuses the same rules.

use super::inputs::{CheckpointSide, PairedRound, SinkPairedRound};

/// At most this many messages per SQS ReceiveMessage.
pub const SQS_BATCH: f64 = 10.0;
/// A Kinesis shard takes this many records per second written...
pub const KINESIS_WRITE_RECORDS: f64 = 1_000.0;
/// ...and this many bytes per second written...
pub const KINESIS_WRITE_BYTES: f64 = 1024.0 * 1024.0;
/// ...and serves this many bytes per second read.
pub const KINESIS_READ_BYTES: f64 = 2.0 * 1024.0 * 1024.0;
/// At most this many `GetRecords` calls per second per shard...
pub const KINESIS_READ_CALLS: f64 = 5.0;
/// ...each returning at most this many records.
pub const KINESIS_RECORDS_PER_CALL: f64 = 10_000.0;
/// Plan to run at most this share of a measured ceiling.
pub const PLANNING_HEADROOM: f64 = 0.7;
/// A confidence interval wider than this share of its median is flagged as noisy.
pub const NOISY_CI: f64 = 0.2;
/// Channel hops a message makes between sluice's stages (source → parse → mask → batcher → sink).
pub const STAGE_HOPS: f64 = 4.0;
/// The chunk size the per-message stage cost is computed at (a file chunk).
pub const COST_CHUNK: u64 = 256;

/// Whether the confidence interval `[low, high]` is wide against `median`.
pub fn is_noisy(low: f64, high: f64, median: f64) -> bool {
    (high - low) / median > NOISY_CI
}

/// The pipeline's rate over the ceiling's in each paired round, smallest first: each pair ran on
/// the same machine state, so its ratio does not carry drift between two runs minutes apart.
pub fn paired_ratios(messages: f64, ceiling_rows: f64, rounds: &[PairedRound]) -> Vec<f64> {
    sorted(
        rounds
            .iter()
            .map(|r| (messages / r.pipeline) / (ceiling_rows / r.ceiling)),
    )
}

/// The pipeline's rate with Kinesis checkpoints over `shards` shards over the plain pipeline's, in
/// each paired round that ran that shard count, smallest first (the same messages, so the inverse
/// ratio of their times).
pub fn stream_vs_pipeline(rounds: &[PairedRound], shards: u64) -> Vec<f64> {
    sorted(stream_runs(rounds, shards).map(|(r, k)| r.pipeline / k))
}

/// The same runs' rates over the ceiling's in their rounds, smallest first.
pub fn stream_vs_copy(
    messages: f64,
    ceiling_rows: f64,
    rounds: &[PairedRound],
    shards: u64,
) -> Vec<f64> {
    sorted(stream_runs(rounds, shards).map(|(r, k)| (messages / k) / (ceiling_rows / r.ceiling)))
}

/// Each round that ran the pipeline with checkpoints over `shards` shards, with that run's seconds.
fn stream_runs(
    rounds: &[PairedRound],
    shards: u64,
) -> impl Iterator<Item = (&PairedRound, f64)> + '_ {
    rounds
        .iter()
        .filter_map(move |r| seconds_over(&r.checkpoints, shards).map(|k| (r, k)))
}

/// The seconds of the side whose messages were spread over `shards` shards, if one was.
fn seconds_over(sides: &[CheckpointSide], shards: u64) -> Option<f64> {
    sides.iter().find(|k| k.shards == shards).map(|k| k.seconds)
}

/// The ledger's rate over the plain sink's in each paired round, smallest first (same batch size,
/// so the inverse ratio of their times per batch).
pub fn ledger_ratios(rounds: &[SinkPairedRound]) -> Vec<f64> {
    sorted(rounds.iter().map(|r| r.plain / r.ledger))
}

/// The same for producer keys, over the rounds that measured them.
pub fn producer_ledger_ratios(rounds: &[SinkPairedRound]) -> Vec<f64> {
    sorted(
        rounds
            .iter()
            .filter_map(|r| r.producer_ledger.map(|p| r.plain / p)),
    )
}

/// The sink's rate with Kinesis checkpoints over `shards` shards, over the plain sink's, in each
/// paired round that measured that shard count, smallest first.
pub fn checkpoint_ratios(rounds: &[SinkPairedRound], shards: u64) -> Vec<f64> {
    sorted(checkpoint_sides(rounds, shards).map(|(plain, k)| plain / k))
}

/// What the checkpoints over `shards` shards added to a batch in each paired round that measured
/// that shard count, in milliseconds, smallest first.
pub fn checkpoint_costs_ms(rounds: &[SinkPairedRound], shards: u64) -> Vec<f64> {
    sorted(checkpoint_sides(rounds, shards).map(|(plain, k)| (k - plain) * 1e3))
}

/// Seconds per batch of the plain sink and of the sink with checkpoints over `shards` shards.
fn checkpoint_sides(
    rounds: &[SinkPairedRound],
    shards: u64,
) -> impl Iterator<Item = (f64, f64)> + '_ {
    rounds
        .iter()
        .filter_map(move |r| seconds_over(&r.checkpoints, shards).map(|k| (r.plain, k)))
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values
}

/// How much bigger `larger` is than `smaller`, as a share (0.1 = 10% more).
pub fn growth(larger: f64, smaller: f64) -> f64 {
    larger / smaller - 1.0
}

/// Messages per second one core carries at `ns` nanoseconds of CPU per message.
pub fn per_core_rate(ns: f64) -> f64 {
    1e9 / ns
}

/// The most one poller carries: it waits for each receive of at most [`SQS_BATCH`] messages.
pub fn poller_rate(latency_ms: f64) -> f64 {
    SQS_BATCH / (latency_ms / 1000.0)
}

/// Pollers needed for `rate` messages per second at a receive latency.
pub fn pollers_needed(rate: f64, latency_ms: f64) -> u64 {
    (rate / poller_rate(latency_ms)).ceil() as u64
}

/// Shards a Kinesis stream needs for `rate` messages per second of `message_bytes` each, by each
/// of the shard's limits, and the number that satisfies all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShardsNeeded {
    pub by_records: u64,
    pub by_write_bytes: u64,
    pub by_read_bytes: u64,
    pub shards: u64,
}

pub fn shards_needed(rate: f64, message_bytes: f64) -> ShardsNeeded {
    let by_records = (rate / KINESIS_WRITE_RECORDS).ceil() as u64;
    let by_write_bytes = (rate * message_bytes / KINESIS_WRITE_BYTES).ceil() as u64;
    let by_read_bytes = (rate * message_bytes / KINESIS_READ_BYTES).ceil() as u64;
    ShardsNeeded {
        by_records,
        by_write_bytes,
        by_read_bytes,
        shards: by_records.max(by_write_bytes).max(by_read_bytes),
    }
}

/// Whether a shard's record limit, rather than its byte limit, decides at this message size.
pub fn record_limit_decides(message_bytes: f64) -> bool {
    message_bytes * KINESIS_WRITE_RECORDS < KINESIS_WRITE_BYTES
}

/// Messages per second one shard can be read at while it catches up: its 2 MiB/s of reads at this
/// message size, or its five calls of 10,000 records, whichever is lower.
pub fn catch_up_rate_per_shard(message_bytes: f64) -> f64 {
    (KINESIS_READ_BYTES / message_bytes).min(KINESIS_READ_CALLS * KINESIS_RECORDS_PER_CALL)
}

/// Shards one process drains at `rate` messages per second when each is written at `per_shard`.
pub fn shards_drained(rate: f64, per_shard: f64) -> f64 {
    rate / per_shard
}

/// Processes needed for `rate` when each carries `per_process` (at least one).
pub fn processes_needed(rate: f64, per_process: f64) -> u64 {
    ((rate / per_process).ceil() as u64).max(1)
}

/// What a commit record costs per batch as a fixed part plus a part per shard in the batch: the
/// least-squares line through `(shards, ms per batch)` points. One point gives no slope: it is all
/// fixed cost.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PerShardCost {
    pub fixed_ms: f64,
    pub per_shard_ms: f64,
}

pub fn per_shard_cost(points: &[(f64, f64)]) -> Option<PerShardCost> {
    let n = points.len() as f64;
    let (first, rest) = points.split_first()?;
    if rest.iter().all(|p| p.0 == first.0) {
        let mean = points.iter().map(|p| p.1).sum::<f64>() / n;
        return Some(PerShardCost {
            fixed_ms: mean,
            per_shard_ms: 0.0,
        });
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let slope = covariance / variance;
    Some(PerShardCost {
        fixed_ms: mean_y - slope * mean_x,
        per_shard_ms: slope,
    })
}

/// A rate rounded to the thousand, for the sizing tables' "this machine" column.
pub fn round_to_thousand(rate: f64) -> f64 {
    (rate / 1000.0).round() * 1000.0
}

/// What to plan with from a measured ceiling.
pub fn planned(rate: f64) -> f64 {
    PLANNING_HEADROOM * rate
}

/// CPU microseconds per message of a whole run.
pub fn cpu_us_per_message(user_seconds: f64, system_seconds: f64, messages: f64) -> f64 {
    (user_seconds + system_seconds) / messages * 1e6
}

/// Cores needed for `rate` messages per second at `us_per_message` microseconds of CPU each.
pub fn cores_needed(rate: f64, us_per_message: f64) -> f64 {
    rate * us_per_message / 1e6
}

/// The sorted, deduplicated rates a sizing table shows: fixed examples plus this machine's.
pub fn table_rates(examples: &[f64], measured: f64) -> Vec<f64> {
    let mut rates: Vec<f64> = examples
        .iter()
        .copied()
        .chain([round_to_thousand(measured)])
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    rates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_wider_than_a_fifth_of_the_median_is_noisy() {
        assert!(!is_noisy(90.0, 110.0, 100.0));
        assert!(is_noisy(85.0, 110.0, 100.0));
    }

    #[test]
    fn ledger_ratios_are_the_plain_time_over_the_ledger_time_of_each_measured_round_sorted() {
        let rounds = [
            SinkPairedRound {
                plain: 2.0,
                ledger: 4.0,
                producer_ledger: Some(8.0),
                checkpoints: Vec::new(),
            },
            SinkPairedRound {
                plain: 3.0,
                ledger: 4.0,
                producer_ledger: None,
                checkpoints: Vec::new(),
            },
            SinkPairedRound {
                plain: 1.0,
                ledger: 5.0,
                producer_ledger: Some(2.0),
                checkpoints: Vec::new(),
            },
        ];
        assert_eq!(ledger_ratios(&rounds), [0.2, 0.5, 0.75]);
        assert_eq!(producer_ledger_ratios(&rounds), [0.25, 0.5]);
        assert!(ledger_ratios(&[]).is_empty());
    }

    #[test]
    fn checkpoint_figures_compare_each_round_with_its_own_plain_sink() {
        let side = |shards, seconds| CheckpointSide { shards, seconds };
        let round = |plain, checkpoints| SinkPairedRound {
            plain,
            ledger: 1.0,
            producer_ledger: None,
            checkpoints,
        };
        let rounds = [
            round(0.004, vec![side(4, 0.008), side(64, 0.010)]),
            round(0.002, vec![side(4, 0.005)]),
            round(0.003, Vec::new()),
        ];
        assert_eq!(checkpoint_ratios(&rounds, 4), [0.4, 0.5]);
        assert_eq!(checkpoint_ratios(&rounds, 64), [0.4]);
        assert!(checkpoint_ratios(&rounds, 16).is_empty());
        let costs = checkpoint_costs_ms(&rounds, 4);
        assert_eq!(costs.len(), 2);
        assert!((costs[0] - 3.0).abs() < 1e-9 && (costs[1] - 4.0).abs() < 1e-9);
    }

    #[test]
    fn paired_ratios_compare_rates_within_each_round_and_are_sorted() {
        let rounds = [
            PairedRound {
                pipeline: 2.0,
                ceiling: 1.0,
                checkpoints: Vec::new(),
            },
            PairedRound {
                pipeline: 1.0,
                ceiling: 1.0,
                checkpoints: vec![CheckpointSide {
                    shards: 4,
                    seconds: 1.25,
                }],
            },
        ];
        // 600 messages against 600 rows: the ratio is ceiling time over pipeline time.
        assert_eq!(paired_ratios(600.0, 600.0, &rounds), [0.5, 1.0]);
        // Fewer ceiling rows in the same time: the pipeline keeps a larger share.
        assert_eq!(paired_ratios(600.0, 300.0, &rounds[1..]), [2.0]);
        // The pipeline with checkpoints, against the plain pipeline and the ceiling of its own
        // round; a round without that shard count does not count.
        assert_eq!(stream_vs_pipeline(&rounds, 4), [0.8]);
        assert_eq!(stream_vs_copy(600.0, 300.0, &rounds, 4), [1.6]);
        assert!(stream_vs_pipeline(&rounds, 64).is_empty());
    }

    #[test]
    fn growth_is_the_relative_increase() {
        assert!((growth(54.0, 50.0) - 0.08).abs() < 1e-12);
        assert!(growth(50.0, 54.0) < 0.0);
    }

    #[test]
    fn one_core_at_734_ns_carries_about_1_36_million_messages() {
        assert_eq!(per_core_rate(1000.0), 1_000_000.0);
        assert_eq!(per_core_rate(734.0).round(), 1_362_398.0);
    }

    #[test]
    fn a_poller_carries_ten_messages_per_receive_latency() {
        assert_eq!(poller_rate(50.0), 200.0);
        assert_eq!(pollers_needed(10_000.0, 50.0), 50);
        assert_eq!(pollers_needed(10_001.0, 50.0), 51);
        assert_eq!(pollers_needed(764_000.0, 20.0), 1_528);
    }

    #[test]
    fn small_messages_are_sized_by_the_record_limit() {
        let need = shards_needed(10_000.0, 154.0);
        assert_eq!(
            need,
            ShardsNeeded {
                by_records: 10,
                by_write_bytes: 2,
                by_read_bytes: 1,
                shards: 10
            }
        );
        assert!(record_limit_decides(154.0));
    }

    #[test]
    fn large_messages_are_sized_by_the_write_bytes() {
        let need = shards_needed(1_000.0, 4096.0);
        assert_eq!(need.by_records, 1);
        assert_eq!(need.by_write_bytes, 4);
        assert_eq!(need.by_read_bytes, 2);
        assert_eq!(need.shards, 4);
        assert!(!record_limit_decides(4096.0));
    }

    #[test]
    fn a_shard_catches_up_at_its_read_limit() {
        assert_eq!(catch_up_rate_per_shard(154.0).round(), 13_618.0);
        assert_eq!(
            catch_up_rate_per_shard(10.0),
            50_000.0,
            "tiny messages: five calls of 10,000 records"
        );
        assert_eq!(shards_drained(700_000.0, 1_000.0), 700.0);
        assert_eq!(processes_needed(1_000.0, 490_000.0), 1);
        assert_eq!(processes_needed(1_000_000.0, 490_000.0), 3);
    }

    #[test]
    fn checkpoint_cost_splits_into_a_fixed_part_and_a_part_per_shard() {
        let cost = per_shard_cost(&[(4.0, 0.5), (64.0, 2.3)]).unwrap();
        assert!((cost.per_shard_ms - 0.03).abs() < 1e-12);
        assert!((cost.fixed_ms - 0.38).abs() < 1e-12);
        let flat = per_shard_cost(&[(4.0, 0.5)]).unwrap();
        assert_eq!((flat.fixed_ms, flat.per_shard_ms), (0.5, 0.0));
        assert!(per_shard_cost(&[]).is_none());
    }

    #[test]
    fn planning_keeps_headroom() {
        assert!((planned(763_654.0) - 534_557.8).abs() < 1e-6);
    }

    #[test]
    fn cpu_per_message_and_cores() {
        let us = cpu_us_per_message(1.0, 0.28, 1_000_000.0);
        assert!((us - 1.28).abs() < 1e-12);
        assert!((cores_needed(100_000.0, us) - 0.128).abs() < 1e-12);
    }

    #[test]
    fn table_rates_add_the_measured_rate_rounded_once() {
        assert_eq!(
            table_rates(&[10_000.0, 100_000.0], 763_654.0),
            [10_000.0, 100_000.0, 764_000.0]
        );
        assert_eq!(
            table_rates(&[10_000.0, 100_000.0], 99_600.0),
            [10_000.0, 100_000.0]
        );
    }
}
