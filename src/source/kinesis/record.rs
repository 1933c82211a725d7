//! The Kinesis source's commit record: each shard's checkpoint, fenced by its lease, written as the
//! last statement of the batch's transaction.
//!
//! This is what makes Kinesis exactly once without a ledger: the rows, the dead letters and "the
//! shard is committed up to here" become durable together or not at all, and a restart resumes right
//! after the checkpoint. The write succeeds only while this process still holds each shard's lease
//! at the epoch the records were read under; otherwise the committer is told which messages to drop
//! (that shard's, at that epoch), rolls back and commits the rest. The new owner reads the dropped
//! records again from the checkpoint it found. That answer also marks the claim fenced off for good
//! ([`super::lease::FencedOff`]): the records still in hand under it are dropped before their
//! batch's transaction begins instead of each costing one more transaction rolled back.
//!
//! A batch sent again after a COMMIT whose answer was lost (the connection broke after it was sent)
//! may in fact be committed: before its rows, each record is compared with its shard's committed
//! checkpoint, and one at or before it is skipped, only acknowledged. So even a retried COMMIT loads
//! nothing twice.
//!
//! A batch the database refused is committed in pieces; a shard's checkpoint then never moves past
//! a record that a later piece still holds. Batches must commit in the order they were read
//! ([`CommitRecord::ordered`]): a checkpoint never moves backwards.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::checkpoint::{self, CheckpointError};
use super::lease::{LeaseClaim, LeaseScope};
use super::metrics::KinesisStats;
use super::progress::{self, KinesisAck};
use super::sequence::SequenceNumber;
use crate::envelope::{AckToken, Meta};
use crate::sink::commit_record::{CommitRecord, InTransaction, RecordError};

/// Per-shard checkpoints as a commit record.
pub struct ShardCheckpoints {
    stats: Arc<KinesisStats>,
}

impl ShardCheckpoints {
    pub fn new(stats: Arc<KinesisStats>) -> ShardCheckpoints {
        ShardCheckpoints { stats }
    }
}

#[async_trait]
impl CommitRecord for ShardCheckpoints {
    async fn claim(&self, t: &mut InTransaction<'_, '_>) -> Result<Vec<bool>, RecordError> {
        let acks: Vec<Option<&KinesisAck>> =
            t.entries.iter().map(|e| kinesis(&e.meta.ack)).collect();
        let mut shards_by_scope: Vec<(&LeaseScope, Vec<&str>)> = Vec::new();
        for ack in acks.iter().flatten() {
            let scope = &*ack.lease.scope;
            let shard = ack.lease.shard_id.as_str();
            match shards_by_scope.iter_mut().find(|(s, _)| *s == scope) {
                Some((_, shards)) if shards.contains(&shard) => {}
                Some((_, shards)) => shards.push(shard),
                None => shards_by_scope.push((scope, vec![shard])),
            }
        }
        let mut committed: Vec<(&LeaseScope, HashMap<String, SequenceNumber>)> = Vec::new();
        for (scope, shards) in shards_by_scope {
            let found = checkpoint::committed(t.tx, t.statements, scope, &shards)
                .await
                .map_err(|e| match e {
                    CheckpointError::Db(e) => RecordError::Database(e),
                    other => RecordError::Broken(Box::new(other)),
                })?;
            committed.push((scope, found));
        }
        Ok(acks
            .iter()
            .map(|ack| {
                ack.is_none_or(|a| {
                    let scope = &*a.lease.scope;
                    committed
                        .iter()
                        .find(|(s, _)| *s == scope)
                        .and_then(|(_, found)| found.get(&a.lease.shard_id))
                        .is_none_or(|done| &a.sequence > done)
                })
            })
            .collect())
    }

    async fn seal(&self, t: &mut InTransaction<'_, '_>) -> Result<(), RecordError> {
        // The first record per shard that a later piece of the batch still holds.
        let mut held_back: HashMap<(&str, i64), &SequenceNumber> = HashMap::new();
        for ack in t.pending.iter().filter_map(|m| kinesis(&m.ack)) {
            let first = held_back
                .entry((&ack.lease.shard_id, ack.lease.epoch))
                .or_insert(&ack.sequence);
            *first = (*first).min(&ack.sequence);
        }
        let tokens = t.entries.iter().map(|e| &e.meta.ack).filter(|token| {
            kinesis(token).is_some_and(|a| {
                held_back
                    .get(&(a.lease.shard_id.as_str(), a.lease.epoch))
                    .is_none_or(|first| &a.sequence < *first)
            })
        });
        let checkpoints = progress::checkpoints(tokens);
        match checkpoint::checkpoint_all(t.tx, t.statements, &checkpoints).await {
            Ok(()) => Ok(()),
            Err(CheckpointError::Db(e)) => Err(RecordError::Database(e)),
            Err(CheckpointError::Fenced {
                shard,
                owner,
                epoch,
                holder,
                epoch_now,
            }) => {
                self.stats.fenced_commits.inc();
                tracing::warn!(
                    shard,
                    epoch,
                    holder = holder.as_deref().unwrap_or("nobody"),
                    epoch_now,
                    "shard lease moved on: its records in this batch are dropped unloaded"
                );
                let lost: Vec<Arc<LeaseClaim>> = checkpoints
                    .iter()
                    .map(|c| &c.lease)
                    .filter(|l| l.shard_id == shard && l.epoch == epoch && *l.owner == *owner)
                    .cloned()
                    .collect();
                mark_lost(&lost);
                Err(RecordError::Fenced {
                    fence: Box::new(move |meta| {
                        kinesis(&meta.ack).is_some_and(|a| lost.contains(&a.lease))
                    }),
                    cause: Box::new(CheckpointError::Fenced {
                        shard,
                        owner,
                        epoch,
                        holder,
                        epoch_now,
                    }),
                })
            }
            Err(e) => Err(RecordError::Broken(Box::new(e))),
        }
    }

    /// A record read under a claim the database has fenced off before: dropped without a
    /// transaction (see [`super::lease::FencedOff`]).
    fn fenced_off(&self, meta: &Meta) -> bool {
        kinesis(&meta.ack).is_some_and(|a| a.lease.fenced_off.is_set())
    }

    fn ordered(&self) -> bool {
        true
    }
}

/// Marks the claim the database fenced off, so the records still in hand under it are dropped
/// before their transactions. Only a claim told apart from every other of the batch is marked: two
/// claims that the answer fits alike (the same shard, owner and epoch in two lease scopes) are
/// left to be fenced off one transaction at a time, since one of them may still be held.
fn mark_lost(candidates: &[Arc<LeaseClaim>]) {
    if let Some(first) = candidates.first()
        && candidates.iter().all(|c| c == first)
    {
        first.fenced_off.set();
    }
}

/// Counts the checkpoints a committed batch wrote (called after its commit).
pub fn count_committed(stats: &KinesisStats, tokens: &[AckToken]) {
    let n = progress::checkpoints(tokens).len();
    stats.checkpoint_commits.inc_by(n as u64);
}

fn kinesis(token: &AckToken) -> Option<&KinesisAck> {
    match token {
        AckToken::Kinesis(ack) => Some(ack),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table_name::TableName;

    fn claim(stream: &str, epoch: i64) -> Arc<LeaseClaim> {
        Arc::new(LeaseClaim {
            scope: Arc::new(LeaseScope {
                table: TableName::unqualified("leases"),
                application: "app".into(),
                stream: stream.into(),
            }),
            shard_id: "shardId-000000000000".into(),
            owner: Arc::from("me"),
            epoch,
            duration: std::time::Duration::from_secs(30),
            fenced_off: Default::default(),
        })
    }

    #[test]
    fn only_a_claim_the_answer_names_alone_is_marked_and_the_mark_is_shared_by_its_clones() {
        let lost = claim("a", 3);
        let copy = Arc::new((*lost).clone());
        mark_lost(&[copy.clone(), lost.clone()]);
        assert!(lost.fenced_off.is_set() && copy.fenced_off.is_set());
        let later = claim("a", 4);
        assert!(!later.fenced_off.is_set(), "a new claim starts unmarked");
        let (one, other) = (claim("a", 5), claim("b", 5));
        mark_lost(&[one.clone(), other.clone()]);
        assert!(!one.fenced_off.is_set() && !other.fenced_off.is_set());
    }
}
