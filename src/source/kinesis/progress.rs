//! What a batch's Kinesis messages say about each shard's checkpoint.
//!
//! Every message read from Kinesis carries a [`KinesisAck`]: the lease it was read under and its
//! record's sequence number. When a batch commits, the checkpoint of each shard in it becomes the
//! furthest record whose messages are all in this batch or an earlier one. A KPL aggregate is one
//! record but many messages, and only its last message [`completes_record`](KinesisAck::completes_record):
//! should an aggregate ever be split across two batches, the first batch does not checkpoint it, so a
//! crash in between repeats part of it rather than losing the rest. (The reader hands whole
//! `GetRecords` pages over as one chunk, so in practice an aggregate is never split.)

use std::collections::HashMap;
use std::sync::Arc;

use super::checkpoint::ShardCheckpoint;
use super::lease::LeaseClaim;
use super::sequence::SequenceNumber;
use crate::envelope::AckToken;

/// The acknowledgement data of a message read from a Kinesis shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisAck {
    /// The lease the record was read under; its owner and epoch fence the checkpoint.
    pub lease: Arc<LeaseClaim>,
    /// The Kinesis record's sequence number (shared by all user records of an aggregate).
    pub sequence: SequenceNumber,
    /// The message's place among the user records of its KPL aggregate (0 for a plain record).
    pub user_record: usize,
    /// This is the last message made from its record, so committing it covers the whole record.
    pub completes_record: bool,
    /// Its record is the last of a closed shard: committing it finishes the shard.
    pub ends_shard: bool,
}

impl KinesisAck {
    /// Where the message stands in its shard: a batch that holds it must hold every message of the
    /// shard before it too (or they are committed already), or its checkpoint would pass them.
    pub fn order(&self) -> (&SequenceNumber, usize) {
        (&self.sequence, self.user_record)
    }
}

/// The checkpoints a committed batch writes: per shard (and lease epoch), the furthest completed
/// record, finished if that record ended the shard. Messages of other sources are ignored.
pub fn checkpoints<'a>(tokens: impl IntoIterator<Item = &'a AckToken>) -> Vec<ShardCheckpoint> {
    // Keyed by lease scope, shard and epoch: records read under an older epoch of the same shard
    // are checkpointed (and fenced) under that epoch.
    let mut furthest: HashMap<(&str, &str, &str, i64), &KinesisAck> = HashMap::new();
    for token in tokens {
        let AckToken::Kinesis(ack) = token else {
            continue;
        };
        if !ack.completes_record {
            continue;
        }
        let key = lease_key(&ack.lease);
        let slot = furthest.entry(key).or_insert(ack);
        if (&ack.sequence, ack.ends_shard) > (&slot.sequence, slot.ends_shard) {
            *slot = ack;
        }
    }
    let mut out: Vec<ShardCheckpoint> = furthest
        .into_values()
        .map(|ack| ShardCheckpoint {
            lease: ack.lease.clone(),
            sequence: ack.sequence.clone(),
            finished: ack.ends_shard,
        })
        .collect();
    out.sort_by(|a, b| lease_key(&a.lease).cmp(&lease_key(&b.lease)));
    out
}

/// Application, stream, shard and epoch of a lease.
fn lease_key(lease: &LeaseClaim) -> (&str, &str, &str, i64) {
    (
        &lease.scope.application,
        &lease.scope.stream,
        &lease.shard_id,
        lease.epoch,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kinesis::lease::LeaseScope;
    use crate::table_name::TableName;

    fn lease(shard: &str) -> Arc<LeaseClaim> {
        Arc::new(LeaseClaim {
            scope: Arc::new(LeaseScope {
                table: TableName::unqualified("leases"),
                application: "app".into(),
                stream: "s".into(),
            }),
            shard_id: shard.into(),
            owner: Arc::from("me"),
            epoch: 3,
            duration: std::time::Duration::from_secs(30),
        })
    }

    fn ack(lease: &Arc<LeaseClaim>, sequence: &str, completes: bool, ends: bool) -> AckToken {
        AckToken::Kinesis(KinesisAck {
            lease: lease.clone(),
            sequence: SequenceNumber::parse(sequence).expect("valid"),
            user_record: 0,
            completes_record: completes,
            ends_shard: ends,
        })
    }

    #[test]
    fn each_shard_checkpoints_its_furthest_complete_record() {
        let (a, b) = (lease("a"), lease("b"));
        let tokens = [
            ack(&a, "9", true, false),
            ack(&b, "100", true, false),
            ack(&a, "10", true, false),
            AckToken::None,
            ack(&a, "11", false, false),
        ];
        let got: Vec<(String, String, bool)> = checkpoints(&tokens)
            .into_iter()
            .map(|c| (c.lease.shard_id.clone(), c.sequence.to_string(), c.finished))
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), "10".into(), false),
                ("b".into(), "100".into(), false)
            ],
            "11 is an aggregate only partly in this batch: not checkpointed"
        );
    }

    #[test]
    fn the_shards_last_record_finishes_it() {
        let a = lease("a");
        let tokens = [
            ack(&a, "5", true, false),
            ack(&a, "6", false, false),
            ack(&a, "6", true, true),
        ];
        let got = checkpoints(&tokens);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].sequence.as_str(), "6");
        assert!(got[0].finished);
    }

    #[test]
    fn records_read_under_two_epochs_of_one_shard_are_checkpointed_under_each() {
        let old = lease("a");
        let new = Arc::new(LeaseClaim {
            epoch: 4,
            ..(*old).clone()
        });
        let tokens = [ack(&old, "5", true, false), ack(&new, "9", true, false)];
        let got: Vec<(i64, String)> = checkpoints(&tokens)
            .into_iter()
            .map(|c| (c.lease.epoch, c.sequence.to_string()))
            .collect();
        assert_eq!(got, [(3, "5".into()), (4, "9".into())]);
    }

    #[test]
    fn a_batch_of_other_sources_checkpoints_nothing() {
        let tokens = [
            AckToken::None,
            AckToken::Sqs {
                receipt_handle: "r".into(),
            },
        ];
        assert!(checkpoints(&tokens).is_empty());
    }
}
