//! The Kinesis source's own measurements, exported beside the pipeline's under `sluice_kinesis_`.
//!
//! They answer the questions an operator of a shared stream asks: does this replica hold its share
//! (leases held), is any shard falling behind (milliseconds behind the tip, per shard, as GetRecords
//! reports it), are checkpoints advancing (checkpoint commits), and are replicas fighting over shards
//! (fenced-off commits: each one is a batch rolled back because its lease had moved on).

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a per-shard series.
type ShardLabels = Vec<(&'static str, String)>;

#[derive(Debug, Default)]
pub struct KinesisStats {
    /// Shard leases this process holds now.
    pub leases_held: Gauge,
    /// Per shard read here: `MillisBehindLatest` of its last GetRecords.
    pub millis_behind: Family<ShardLabels, Gauge>,
    /// Shard checkpoints committed (one per shard per committed batch).
    pub checkpoint_commits: Counter,
    /// Transactions rolled back because a shard's lease had moved to another owner or epoch.
    pub fenced_commits: Counter,
    /// The same figures as `millis_behind`, readable: a metric family cannot be read back, and the
    /// progress line shows the shard furthest behind.
    behind: Mutex<HashMap<String, i64>>,
}

impl KinesisStats {
    pub fn set_millis_behind(&self, shard: &str, millis: i64) {
        self.millis_behind.get_or_create(&labels(shard)).set(millis);
        self.behind_by_shard().insert(shard.to_owned(), millis);
    }

    /// Forgets a shard this process no longer reads, so a stale figure is not exported.
    pub fn forget_shard(&self, shard: &str) {
        self.millis_behind.remove(&labels(shard));
        self.behind_by_shard().remove(shard);
    }

    /// How far behind the tip the furthest shard read here is, if any shard is read.
    pub fn max_millis_behind(&self) -> Option<i64> {
        self.behind_by_shard().values().copied().max()
    }

    fn behind_by_shard(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // A panic elsewhere while holding it leaves plain numbers, still good to read.
        self.behind
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kinesis");
        r.register(
            "leases_held",
            "Kinesis shard leases held by this process",
            self.leases_held.clone(),
        );
        r.register(
            "millis_behind_latest",
            "Milliseconds the shard's reader is behind the tip of the shard (MillisBehindLatest)",
            self.millis_behind.clone(),
        );
        r.register(
            "checkpoint_commits",
            "Shard checkpoints committed with their batch",
            self.checkpoint_commits.clone(),
        );
        r.register(
            "fenced_commits",
            "Transactions rolled back because a shard's lease had moved on",
            self.fenced_commits.clone(),
        );
    }
}

fn labels(shard: &str) -> ShardLabels {
    vec![("shard", shard.to_owned())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figures_are_exported_per_shard_and_a_forgotten_shard_goes() {
        let stats = KinesisStats::default();
        stats.leases_held.set(2);
        stats.set_millis_behind("shardId-000000000001", 1500);
        stats.set_millis_behind("shardId-000000000002", 0);
        stats.checkpoint_commits.inc_by(3);
        stats.fenced_commits.inc();
        assert_eq!(stats.max_millis_behind(), Some(1500));
        stats.forget_shard("shardId-000000000002");
        let mut registry = Registry::default();
        stats.register(registry.sub_registry_with_prefix("sluice"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "sluice_kinesis_leases_held 2",
            "sluice_kinesis_millis_behind_latest{shard=\"shardId-000000000001\"} 1500",
            "sluice_kinesis_checkpoint_commits_total 3",
            "sluice_kinesis_fenced_commits_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(!text.contains("shardId-000000000002"), "{text}");
    }
}
