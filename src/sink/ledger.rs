//! The dedupe ledger: keys of committed messages, written in the same transaction as their rows.
//!
//! SQS delivers at least once: a crash between commit and delete, or a delete that fails, brings a
//! message back. Because its key was committed with its row, the redelivery finds the key and is
//! acknowledged without writing anything again. This is the commit record of sources that redeliver
//! ([`LedgerRecord`]).
//!
//! A key says where the message came from as well as which message it is: it is the SHA-256 of the
//! source's scope (the queue, the file) and the message's key there, as the source defines it
//! ([`LedgerKeys`]). So two queues, two deployments sharing the table, or two files never take each
//! other's messages for duplicates, and every key is 32 bytes however long the producer's key was.
//! Keys are kept for the source's retention (after that the source cannot redeliver) and pruned in
//! small slices so pruning never holds long locks.
//!
//! Where a source knows when a message was first accepted, and that time comes back with every
//! redelivery (SQS `SentTimestamp`), the key starts with that time ([`LedgerKey::ordered`]). New
//! keys then land at the end of the primary key's index, in the few pages already in memory,
//! instead of on a random page each: a random key splits a leaf every few dozen inserts and, after
//! each checkpoint, writes a full page image for the first change to each leaf, so an ordered
//! key's index entry costs about a quarter as much (`docs/profiling.md`). The time is no part of
//! the message's identity: it only orders keys, and the rest of the key is still the hash of scope
//! and identity.
//! Keys of messages without such a time (a producer's idempotency key, which its resends share
//! although they are sent at other times) stay unordered.
//!
//! Most batches hold no key seen before (a redelivery is the exception), so a batch's keys are first
//! written as all new, with one plain `INSERT` of the keys as one array inside a savepoint: that
//! pays one index entry per key and no conflict check. Only if a key turns out to be committed
//! already (the insert fails on the primary key) is the savepoint rolled back and the keys inserted
//! again `ON CONFLICT DO NOTHING`, which tells which are new. Either way, the primary key is what
//! makes two transactions holding the same key wait for each other, so exactly one of them loads
//! the message.
//!
//! Not `COPY`, although the rows go that way: COPY buffers up to 1,000 rows before writing them,
//! and PostgreSQL 15 registers the table's tuple descriptor once per buffered row in a resource
//! owner whose lookups then grow with the number already registered. For 1,000 keys of 32 bytes
//! that bookkeeping is most of the statement: 1.8–2.3 ms against 0.9–1.2 ms for the same keys
//! inserted (`docs/profiling.md`, "The ledger's statement").
//!
//! Earlier versions kept unscoped text keys (`message_key text`). Such a table is never altered: its
//! keys cannot be scoped after the fact, so sluice refuses to use it (see [`crate::sink::schema`])
//! and the default ledger is a new table, `sluice_ledger_v2`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio_postgres::Transaction;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use crate::envelope::Meta;
use crate::error_chain::Chain;
use crate::pg::Connector;
use crate::sink::commit_record::{
    CommitRecord, Entry, InTransaction, Outcome, Prepared, RecordError, Statements,
};
use crate::table_name::TableName;

/// A message's key in the ledger: SHA-256 of its source's scope and its key at that source, or
/// its order and part of that hash ([`LedgerKey::ordered`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LedgerKey(pub [u8; 32]);

impl std::fmt::Debug for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LedgerKey({})", hex::encode(self.0))
    }
}

impl LedgerKey {
    /// Hashes `parts`, each preceded by its length, so that no two different lists of parts give
    /// the same input (`["ab", "c"]` and `["a", "bc"]` differ).
    pub fn of(parts: &[&[u8]]) -> LedgerKey {
        let mut hash = Sha256::new();
        for part in parts {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        LedgerKey(hash.finalize().into())
    }

    /// This key made to sort by `order` first: `order` in big-endian, then the first 24 bytes of
    /// this key's hash, so the key keeps the ledger's 32 bytes. Two keys can only meet by chance
    /// if they share `order` too, and 192 bits of hash make that negligible even for billions of
    /// keys in one millisecond.
    pub fn ordered(self, order: u64) -> LedgerKey {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&order.to_be_bytes());
        key[8..].copy_from_slice(&self.0[..24]);
        LedgerKey(key)
    }
}

/// The keys one message is claimed under: it is new only if every one of them is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageKeys {
    pub key: LedgerKey,
    /// The key an earlier version of sluice gave the same message, claimed as well where that
    /// version may have committed it, so that upgrading does not load it twice.
    pub earlier: Option<LedgerKey>,
}

impl MessageKeys {
    pub fn only(key: LedgerKey) -> MessageKeys {
        MessageKeys { key, earlier: None }
    }
}

/// A batch's keys as the ledger's statements send them. Hashing, deduplicating and sorting a
/// thousand keys takes a few hundred microseconds, so the batcher makes them while the batch before
/// commits ([`LedgerRecord::prepare`]) rather than the transaction, which would hold its connection
/// open that much longer.
#[derive(Debug)]
pub struct ClaimKeys {
    messages: Vec<MessageKeys>,
    /// Every message's own key, then the earlier keys of those that have one.
    keys: Vec<LedgerKey>,
    /// Per key of `keys`: whether it is its first appearance there.
    first: Vec<bool>,
    /// The distinct keys in order: two transactions sharing keys take them in the same order, so
    /// they wait for each other instead of deadlocking.
    sorted: Vec<LedgerKey>,
}

impl ClaimKeys {
    pub fn new(messages: Vec<MessageKeys>) -> ClaimKeys {
        let mut keys = Vec::with_capacity(messages.len());
        keys.extend(messages.iter().map(|m| m.key));
        keys.extend(messages.iter().filter_map(|m| m.earlier));
        let mut listed = HashSet::with_capacity(keys.len());
        let first = keys.iter().map(|k| listed.insert(*k)).collect();
        let mut sorted: Vec<LedgerKey> = listed.into_iter().collect();
        sorted.sort_unstable();
        ClaimKeys {
            messages,
            keys,
            first,
            sorted,
        }
    }

    /// How many messages the keys are for.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// How a source names its messages in the ledger: the source's scope and the message's identity
/// there, for a message that is loaded or one that becomes a dead letter.
pub trait LedgerKeys: Send + Sync {
    fn keys(&self, meta: &Meta, body: &str, outcome: Outcome) -> MessageKeys;
}

/// The ledger table's statements.
pub struct Ledger {
    insert_new: String,
    insert: String,
    prune: String,
}

/// The savepoint the all-new insert is tried in, and how it is undone.
const SAVEPOINT: &str = "SAVEPOINT sluice_ledger_insert";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT sluice_ledger_insert";

impl Ledger {
    pub fn new(table: &TableName) -> Ledger {
        // The fallback is the same insert, skipping keys committed before and returning the new ones.
        let insert_new = format!("INSERT INTO {table} (scoped_key) SELECT unnest($1::bytea[])");
        Ledger {
            insert: format!("{insert_new} ON CONFLICT DO NOTHING RETURNING scoped_key"),
            insert_new,
            prune: format!(
                "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE seen_at < now() - make_interval(hours => $1) LIMIT 10000))"
            ),
        }
    }

    /// Records the keys and tells, per key in order, whether it is new. A key repeated within the
    /// same list is new only the first time.
    pub async fn record(
        &self,
        tx: &Transaction<'_>,
        statements: &mut Statements,
        keys: &[LedgerKey],
    ) -> Result<Vec<bool>, tokio_postgres::Error> {
        let claim = ClaimKeys::new(keys.iter().copied().map(MessageKeys::only).collect());
        self.record_keys(tx, statements, &claim).await
    }

    /// Records each message's keys and tells, per message in order, whether it is new: whether all
    /// of its keys are.
    pub async fn record_messages(
        &self,
        tx: &Transaction<'_>,
        statements: &mut Statements,
        messages: &[MessageKeys],
    ) -> Result<Vec<bool>, tokio_postgres::Error> {
        self.record_claim(tx, statements, &ClaimKeys::new(messages.to_vec()))
            .await
    }

    /// [`Ledger::record_messages`] with the keys made ready beforehand.
    pub async fn record_claim(
        &self,
        tx: &Transaction<'_>,
        statements: &mut Statements,
        claim: &ClaimKeys,
    ) -> Result<Vec<bool>, tokio_postgres::Error> {
        let fresh = self.record_keys(tx, statements, claim).await?;
        let (own, earlier) = fresh.split_at(claim.messages.len());
        let mut earlier = earlier.iter();
        Ok(claim
            .messages
            .iter()
            .zip(own)
            .map(|(m, &new)| match m.earlier {
                // Both are claimed whatever the first answered: each records the commit.
                Some(_) => earlier.next().is_some_and(|&e| e) && new,
                None => new,
            })
            .collect())
    }

    /// Tells, per key of `claim` in order, whether it is new.
    async fn record_keys(
        &self,
        tx: &Transaction<'_>,
        statements: &mut Statements,
        claim: &ClaimKeys,
    ) -> Result<Vec<bool>, tokio_postgres::Error> {
        if claim.keys.is_empty() || self.insert_all_new(tx, statements, &claim.sorted).await? {
            return Ok(claim.first.clone());
        }
        let statement = statements.get(tx, &self.insert).await?;
        let bytes: Vec<&[u8]> = claim.keys.iter().map(|k| k.0.as_slice()).collect();
        let rows = tx.query(&statement, &[&bytes]).await?;
        let mut inserted: HashSet<&[u8]> = rows.iter().map(|r| r.get::<_, &[u8]>(0)).collect();
        Ok(claim
            .keys
            .iter()
            .map(|k| inserted.remove(k.0.as_slice()))
            .collect())
    }

    /// Writes `keys` with one insert, as if none were in the ledger yet; true if so. If one was (the
    /// primary key refuses it), the insert is undone and false returned.
    async fn insert_all_new(
        &self,
        tx: &Transaction<'_>,
        statements: &mut Statements,
        keys: &[LedgerKey],
    ) -> Result<bool, tokio_postgres::Error> {
        let statement = statements.get(tx, &self.insert_new).await?;
        let bytes: Vec<&[u8]> = keys.iter().map(|k| k.0.as_slice()).collect();
        let params: [&(dyn ToSql + Sync); 1] = [&bytes];
        // The savepoint and the insert go out together: one round trip for both.
        let savepoint = tx.batch_execute(SAVEPOINT);
        let inserted = tx.execute(&statement, &params);
        match futures::join!(savepoint, inserted) {
            (Ok(()), Ok(_)) => Ok(true),
            (Ok(()), Err(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tx.batch_execute(ROLLBACK_TO_SAVEPOINT).await?;
                Ok(false)
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// Deletes keys older than `retention`, slice by slice; returns how many went.
    pub async fn prune(
        &self,
        client: &tokio_postgres::Client,
        retention_hours: i32,
    ) -> Result<u64, tokio_postgres::Error> {
        let mut total = 0;
        loop {
            let n = client.execute(&self.prune, &[&retention_hours]).await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }
}

/// The ledger as a commit record: each message's key is claimed before the rows are written.
pub struct LedgerRecord {
    ledger: Ledger,
    keys: Arc<dyn LedgerKeys>,
}

impl LedgerRecord {
    pub fn new(table: &TableName, keys: Arc<dyn LedgerKeys>) -> LedgerRecord {
        LedgerRecord {
            ledger: Ledger::new(table),
            keys,
        }
    }

    fn claim_keys<'a>(&self, entries: impl Iterator<Item = Entry<'a>>) -> ClaimKeys {
        ClaimKeys::new(
            entries
                .map(|e| self.keys.keys(e.meta, e.body, e.outcome))
                .collect(),
        )
    }
}

#[async_trait]
impl CommitRecord for LedgerRecord {
    fn prepare<'a>(&self, entries: &mut dyn Iterator<Item = Entry<'a>>) -> Option<Prepared> {
        Some(Box::new(self.claim_keys(entries)))
    }

    async fn claim(&self, t: &mut InTransaction<'_, '_>) -> Result<Vec<bool>, RecordError> {
        let prepared = t
            .prepared
            .and_then(|p| p.downcast_ref::<ClaimKeys>())
            .filter(|claim| claim.len() == t.entries.len());
        let made;
        let claim = match prepared {
            Some(claim) => claim,
            None => {
                made = self.claim_keys(t.entries.iter().copied());
                &made
            }
        };
        Ok(self.ledger.record_claim(t.tx, t.statements, claim).await?)
    }
}

/// Prunes at start and then hourly, on its own connection, until `stop`.
pub async fn prune_periodically(
    ledger: Ledger,
    connector: Connector,
    retention_hours: i32,
    stop: CancellationToken,
) -> Result<(), crate::background::BackgroundError> {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        let outcome = async {
            let client = connector.connect("sluice-ledger-pruner").await?;
            ledger
                .prune(&client, retention_hours)
                .await
                .map_err(|e| PruneError::Prune(crate::pg::PgError(e)))
        };
        tokio::select! {
            result = outcome => match result {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "pruned the dedupe ledger"),
                Err(e) => tracing::warn!(error = %Chain(&e), "pruning the dedupe ledger failed; will try again"),
            },
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum PruneError {
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error("deleting old keys")]
    Prune(#[source] crate::pg::PgError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_delimited_by_their_lengths() {
        assert_ne!(LedgerKey::of(&[b"ab", b"c"]), LedgerKey::of(&[b"a", b"bc"]));
        assert_eq!(LedgerKey::of(&[b"q", b"k"]), LedgerKey::of(&[b"q", b"k"]));
    }

    #[test]
    fn ordered_keys_sort_by_their_order_first() {
        let early = LedgerKey::of(&[b"q", b"zzz"]).ordered(1_700_000_000_000);
        let late = LedgerKey::of(&[b"q", b"aaa"]).ordered(1_700_000_000_001);
        assert!(early < late);
        assert_eq!(
            early,
            LedgerKey::of(&[b"q", b"zzz"]).ordered(1_700_000_000_000)
        );
        assert_ne!(
            early,
            LedgerKey::of(&[b"q", b"zzy"]).ordered(1_700_000_000_000)
        );
        assert_ne!(early, LedgerKey::of(&[b"q", b"zzz"]));
    }
}
