//! The fenced checkpoint write, made inside the sink's transaction.
//!
//! A shard's checkpoint is written in the same transaction as that shard's rows and dead letters, so
//! after any crash the table and the checkpoint agree: a restart resumes right after what was
//! committed, with no gap and no duplicate, and no dedupe ledger is needed. The write is fenced: it
//! updates the row only while it still shows the owner and epoch the records were read under. If a
//! rebalance or an expiry gave the shard to another process meanwhile, nothing matches, the caller
//! gets [`CheckpointError::Fenced`] and rolls the whole transaction back; the new owner reads those
//! records again from the checkpoint it found. The update's row lock also orders a commit against a
//! concurrent take-over: whichever comes second sees the other's result.
//!
//! That lock must not outlive a stopped process. A process frozen (SIGSTOP, a long pause, a network
//! partition) between its checkpoint write and its COMMIT would otherwise keep the row locked for as
//! long as it stays frozen, and every take-over of the shard would wait on it. So the transaction
//! tells PostgreSQL to end the session if it sits idle that long: a third of the lease duration
//! (the keeper's renewal interval), far beyond the milliseconds a running committer needs between
//! its last statements, and short enough that a take-over waits at most one round longer.
//!
//! Checkpoints only move forward, compared as numbers by PostgreSQL (`numeric`). Rows are locked in
//! shard order first, so two transactions checkpointing overlapping shards cannot deadlock. The
//! caller must commit a shard's batches in the order they were read: a later batch committed first
//! would make the earlier one a step backwards, which is refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{GenericClient, Transaction};

use crate::sink::commit_record::Statements;

use super::lease::{LeaseClaim, LeaseScope};
use super::sequence::SequenceNumber;

/// What a batch commits for one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardCheckpoint {
    pub lease: Arc<LeaseClaim>,
    /// The last record of the shard whose messages are all in this batch or committed before.
    pub sequence: SequenceNumber,
    /// That record is the shard's last: the shard is read to its end.
    pub finished: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The lease moved on: roll the transaction back and drop the shard's records in hand.
    #[error(
        "shard {shard}: lease now held by {} at epoch {epoch_now}, not by {owner} at epoch {epoch}; the commit is fenced off",
        holder.as_deref().unwrap_or("nobody")
    )]
    Fenced {
        shard: String,
        owner: String,
        epoch: i64,
        holder: Option<String>,
        epoch_now: i64,
    },
    /// The checkpoint is already past this one: the batches of a shard were committed out of order.
    #[error("shard {shard}: checkpoint {committed} is already past {attempted}")]
    Backwards {
        shard: String,
        committed: String,
        attempted: String,
    },
    /// A shard's end was reported before all its records were committed.
    #[error(
        "shard {shard}: checkpoint {committed:?} has not reached the last record read, {expected:?}"
    )]
    NotCaughtUp {
        shard: String,
        committed: Option<String>,
        expected: Option<String>,
    },
    #[error("shard {shard}: no lease row for it")]
    Unknown { shard: String },
    /// The stored checkpoint is not a sequence number (the table was edited by hand).
    #[error("shard {shard}: the stored checkpoint {stored:?} is not a sequence number")]
    Unreadable { shard: String, stored: String },
    #[error("checkpoint: {}", crate::pg::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

impl CheckpointError {
    /// The lease moved to another owner (or epoch): the batch must be rolled back and its records of
    /// this shard dropped, not retried.
    pub fn is_fenced(&self) -> bool {
        matches!(self, CheckpointError::Fenced { .. })
    }
}

/// Moves one shard's checkpoint to `sequence` (and marks it finished), fenced by `lease`.
pub async fn checkpoint(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    lease: &Arc<LeaseClaim>,
    sequence: &SequenceNumber,
    finished: bool,
) -> Result<(), CheckpointError> {
    let one = ShardCheckpoint {
        lease: lease.clone(),
        sequence: sequence.clone(),
        finished,
    };
    checkpoint_all(tx, statements, std::slice::from_ref(&one)).await
}

/// Writes every checkpoint of a batch, one statement per lease table, all fenced. Fails on the
/// first shard that does not match; the caller then rolls back. Several entries for one shard are
/// reduced to the furthest. The statements are prepared once per connection (`statements`): they
/// run in every batch's transaction.
pub async fn checkpoint_all(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    checkpoints: &[ShardCheckpoint],
) -> Result<(), CheckpointError> {
    if let Some(limit) = lock_idle_limit(checkpoints) {
        // `SET LOCAL` takes no bind parameters; its function form does, and can be prepared.
        let set = statements
            .get(
                tx,
                "SELECT set_config('idle_in_transaction_session_timeout', $1, true)",
            )
            .await?;
        tx.execute(&set, &[&limit.as_millis().to_string()]).await?;
    }
    for (scope, entries) in by_scope(checkpoints) {
        write_scope(tx, statements, &scope, &entries).await?;
    }
    Ok(())
}

/// How long the transaction may wait on its client once it holds lease rows: a third of the
/// shortest lease among `checkpoints` (at least 100 ms), `None` when it locks none.
fn lock_idle_limit(checkpoints: &[ShardCheckpoint]) -> Option<Duration> {
    let shortest = checkpoints.iter().map(|c| c.lease.duration).min()?;
    Some((shortest / 3).max(Duration::from_millis(100)))
}

/// Entries grouped by lease scope, one per shard (the furthest), in shard order.
fn by_scope(checkpoints: &[ShardCheckpoint]) -> Vec<(Arc<LeaseScope>, Vec<&ShardCheckpoint>)> {
    let mut groups: Vec<(Arc<LeaseScope>, BTreeMap<&str, &ShardCheckpoint>)> = Vec::new();
    for entry in checkpoints {
        let scope = &entry.lease.scope;
        let index = match groups.iter().position(|(s, _)| s == scope) {
            Some(i) => i,
            None => {
                groups.push((scope.clone(), BTreeMap::new()));
                groups.len() - 1
            }
        };
        let shards = &mut groups[index].1;
        let slot = shards.entry(entry.lease.shard_id.as_str()).or_insert(entry);
        if (&entry.sequence, entry.finished) > (&slot.sequence, slot.finished) {
            *slot = entry;
        }
    }
    groups
        .into_iter()
        .map(|(scope, shards)| (scope, shards.into_values().collect()))
        .collect()
}

async fn write_scope(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    scope: &LeaseScope,
    entries: &[&ShardCheckpoint],
) -> Result<(), CheckpointError> {
    let t = &scope.table;
    let shards: Vec<&str> = entries.iter().map(|e| e.lease.shard_id.as_str()).collect();
    let owners: Vec<&str> = entries.iter().map(|e| &*e.lease.owner).collect();
    let epochs: Vec<i64> = entries.iter().map(|e| e.lease.epoch).collect();
    let sequences: Vec<&str> = entries.iter().map(|e| e.sequence.as_str()).collect();
    let finished: Vec<bool> = entries.iter().map(|e| e.finished).collect();
    let lock = format!(
        "SELECT 1 FROM {t} WHERE application = $1 AND stream = $2 AND shard_id = ANY($3)
         ORDER BY shard_id FOR UPDATE"
    );
    let lock = statements.get(tx, &lock).await?;
    tx.execute(&lock, &[&scope.application, &scope.stream, &shards])
        .await?;
    let update = format!(
        "UPDATE {t} AS l SET checkpoint = c.sequence::numeric, finished = l.finished OR c.finished,
             updated_at = now()
         FROM unnest($3::text[], $4::text[], $5::int8[], $6::text[], $7::bool[])
              AS c(shard_id, owner, epoch, sequence, finished)
         WHERE l.application = $1 AND l.stream = $2 AND l.shard_id = c.shard_id
           AND l.owner = c.owner AND l.epoch = c.epoch
           AND (l.checkpoint IS NULL OR l.checkpoint <= c.sequence::numeric)
         RETURNING l.shard_id"
    );
    let update = statements.get(tx, &update).await?;
    let rows = tx
        .query(
            &update,
            &[
                &scope.application,
                &scope.stream,
                &shards,
                &owners,
                &epochs,
                &sequences,
                &finished,
            ],
        )
        .await?;
    if rows.len() == entries.len() {
        return Ok(());
    }
    let written: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    match entries
        .iter()
        .find(|e| !written.contains(&e.lease.shard_id))
    {
        Some(missed) => Err(diagnose(tx, &missed.lease, Some(&missed.sequence)).await),
        None => Ok(()),
    }
}

/// The checkpoints committed so far for `shards` of `scope` (shards without one are left out). Read
/// without a lock: only this lease holder moves them, its batches commit one after another, and a
/// take-over meanwhile fences this transaction's own checkpoint write.
pub async fn committed(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    scope: &LeaseScope,
    shards: &[&str],
) -> Result<HashMap<String, SequenceNumber>, CheckpointError> {
    let sql = format!(
        "SELECT shard_id, checkpoint::text FROM {t}
         WHERE application = $1 AND stream = $2 AND shard_id = ANY($3) AND checkpoint IS NOT NULL",
        t = scope.table
    );
    let select = statements.get(tx, &sql).await?;
    let rows = tx
        .query(&select, &[&scope.application, &scope.stream, &shards])
        .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let shard: String = row.get(0);
        let text: String = row.get(1);
        let sequence = SequenceNumber::parse(&text).map_err(|_| CheckpointError::Unreadable {
            shard: shard.clone(),
            stored: text.clone(),
        })?;
        found.insert(shard, sequence);
    }
    Ok(found)
}

/// Marks a shard finished when its end was seen after its last record was delivered (an empty
/// last page): the checkpoint must already be `last_read`, the last record read from the shard
/// (`None` if it had none), so nothing read is left uncommitted. Fenced like [`checkpoint`]. May run
/// in its own transaction: it writes no rows of its own.
pub async fn finish(
    client: &impl GenericClient,
    lease: &LeaseClaim,
    last_read: Option<&SequenceNumber>,
) -> Result<(), CheckpointError> {
    let scope = &lease.scope;
    let sql = format!(
        "UPDATE {t} SET finished = true, updated_at = now()
         WHERE application = $1 AND stream = $2 AND shard_id = $3 AND owner = $4 AND epoch = $5
           AND checkpoint IS NOT DISTINCT FROM $6::text::numeric",
        t = scope.table
    );
    let expected = last_read.map(SequenceNumber::as_str);
    let n = client
        .execute(
            &sql,
            &[
                &scope.application,
                &scope.stream,
                &lease.shard_id,
                &&*lease.owner,
                &lease.epoch,
                &expected,
            ],
        )
        .await?;
    if n == 1 {
        return Ok(());
    }
    match diagnose(client, lease, None).await {
        CheckpointError::Backwards {
            shard, committed, ..
        } => Err(CheckpointError::NotCaughtUp {
            shard,
            committed: Some(committed).filter(|c| !c.is_empty()),
            expected: expected.map(str::to_owned),
        }),
        other => Err(other),
    }
}

/// Why a fenced write matched nothing.
async fn diagnose(
    client: &impl GenericClient,
    lease: &LeaseClaim,
    attempted: Option<&SequenceNumber>,
) -> CheckpointError {
    let scope = &lease.scope;
    let sql = format!(
        "SELECT owner, epoch, coalesce(checkpoint::text, '') FROM {t}
         WHERE application = $1 AND stream = $2 AND shard_id = $3",
        t = scope.table
    );
    let row = match client
        .query_opt(&sql, &[&scope.application, &scope.stream, &lease.shard_id])
        .await
    {
        Ok(row) => row,
        Err(e) => return CheckpointError::Db(e),
    };
    let Some(row) = row else {
        return CheckpointError::Unknown {
            shard: lease.shard_id.clone(),
        };
    };
    let holder: Option<String> = row.get(0);
    let epoch_now: i64 = row.get(1);
    if holder.as_deref() != Some(&*lease.owner) || epoch_now != lease.epoch {
        return CheckpointError::Fenced {
            shard: lease.shard_id.clone(),
            owner: lease.owner.to_string(),
            epoch: lease.epoch,
            holder,
            epoch_now,
        };
    }
    CheckpointError::Backwards {
        shard: lease.shard_id.clone(),
        committed: row.get(2),
        attempted: attempted.map(|s| s.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table_name::TableName;

    fn lease(stream: &str, shard: &str) -> Arc<LeaseClaim> {
        Arc::new(LeaseClaim {
            scope: Arc::new(LeaseScope {
                table: TableName::unqualified("leases"),
                application: "app".into(),
                stream: stream.into(),
            }),
            shard_id: shard.into(),
            owner: Arc::from("me"),
            epoch: 1,
            duration: std::time::Duration::from_secs(30),
            fenced_off: Default::default(),
        })
    }

    fn entry(lease: &Arc<LeaseClaim>, sequence: &str, finished: bool) -> ShardCheckpoint {
        ShardCheckpoint {
            lease: lease.clone(),
            sequence: SequenceNumber::parse(sequence).expect("valid"),
            finished,
        }
    }

    #[test]
    fn a_commit_may_sit_idle_a_third_of_its_shortest_lease() {
        let (a, mut b) = (lease("a", "s0"), (*lease("a", "s1")).clone());
        b.duration = std::time::Duration::from_secs(3);
        let b = Arc::new(b);
        let both = [entry(&a, "1", false), entry(&b, "2", false)];
        assert_eq!(lock_idle_limit(&both), Some(Duration::from_secs(1)));
        let mut brief = (*a).clone();
        brief.duration = Duration::from_millis(90);
        let brief = [entry(&Arc::new(brief), "1", false)];
        assert_eq!(lock_idle_limit(&brief), Some(Duration::from_millis(100)));
        assert_eq!(lock_idle_limit(&[]), None, "no lease rows, no limit");
    }

    #[test]
    fn entries_are_grouped_by_stream_and_reduced_to_the_furthest_per_shard() {
        let (a1, a0, b0) = (lease("a", "s1"), lease("a", "s0"), lease("b", "s0"));
        let input = [
            entry(&a1, "100", false),
            entry(&b0, "7", false),
            entry(&a1, "99", false),
            entry(&a0, "5", false),
            entry(&a1, "1000", true),
        ];
        let groups = by_scope(&input);
        assert_eq!(groups.len(), 2);
        let (scope, entries) = &groups[0];
        assert_eq!(scope.stream, "a");
        let got: Vec<(&str, &str, bool)> = entries
            .iter()
            .map(|e| (e.lease.shard_id.as_str(), e.sequence.as_str(), e.finished))
            .collect();
        assert_eq!(got, [("s0", "5", false), ("s1", "1000", true)]);
        assert_eq!(groups[1].1.len(), 1);
    }
}
