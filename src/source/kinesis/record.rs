//! The Kinesis source's commit record: each shard's checkpoint, fenced by its lease, written as the
//! last statement of the batch's transaction.
//!
//! This is what makes Kinesis exactly once without a ledger: the rows, the dead letters and "the
//! shard is committed up to here" become durable together or not at all, and a restart resumes right
//! after the checkpoint. The write succeeds only while this process still holds each shard's lease
//! at the epoch the records were read under; otherwise the committer is told which messages to drop
//! (that shard's, at that epoch), rolls back and commits the rest. The new owner reads the dropped
//! records again from the checkpoint it found.
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
use super::lease::LeaseScope;
use super::metrics::KinesisStats;
use super::progress::{self, KinesisAck};
use super::sequence::SequenceNumber;
use crate::envelope::AckToken;
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
            let found = checkpoint::committed(t.tx, scope, &shards)
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
        match checkpoint::checkpoint_all(t.tx, &progress::checkpoints(tokens)).await {
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
                let fenced = (shard.clone(), epoch);
                Err(RecordError::Fenced {
                    fence: Box::new(move |meta| {
                        kinesis(&meta.ack).is_some_and(|a| {
                            a.lease.shard_id == fenced.0 && a.lease.epoch == fenced.1
                        })
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

    fn ordered(&self) -> bool {
        true
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
