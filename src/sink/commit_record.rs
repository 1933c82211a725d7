//! A source's commit record: what a batch writes for its source in the batch's own transaction.
//!
//! A restart must neither lose nor repeat a message, so whatever a source needs to know after a
//! crash is committed atomically with the rows and dead letters it is about: for SQS, the messages'
//! keys in the dedupe ledger (a redelivery finds its key and is skipped); for Kinesis, each shard's
//! checkpoint, fenced by the lease it was read under; for a file, its identity and the position
//! committed. Each source brings its [`CommitRecord`]; the committer runs it at fixed points of the
//! transaction and never interprets it, and the stages never see it.
//!
//! The points, in transaction order:
//! 1. [`CommitRecord::claim`], before the rows: records the messages and says which are new. A
//!    message committed before is skipped (only acknowledged). The dedupe ledger claims here: its
//!    insert is what makes two committers that hold the same message wait for each other.
//! 2. The rows (binary COPY) and dead-letter records.
//! 3. [`CommitRecord::seal`], the last write before COMMIT: where the source resumes after this transaction
//!    (checkpoints, positions). A batch the database refused is split and committed in pieces; a
//!    piece's seal is told which messages of its batch later pieces still hold, so a position never
//!    moves past a message that is not committed yet.
//!
//! Either point may answer that the source fenced the commit off (a Kinesis lease moved to another
//! process): the committer then rolls the whole transaction back, drops the messages the fence names
//! without loading or acknowledging them (their new owner reads them again) and commits the rest.
//! Such an answer is final for the messages it names and for those the source reads after them
//! under the same claim, so before each transaction the committer asks
//! [`CommitRecord::fenced_off`] and drops them the same way without a transaction: a process that
//! lost a lease does not pay one rolled-back transaction per batch still in hand for it.
//! A record whose positions must advance in delivery order says so with [`CommitRecord::ordered`]:
//! its batches then commit in delivery order, each transaction waiting for the one before to commit
//! between its rows and its seal ([`super::commit_order`]). Such a record's claim runs before that
//! wait, while an earlier batch's transaction may still be open: it must take no lock that
//! transaction could wait for (a claim that does waits for the turn first:
//! [`CommitRecord::claim_in_turn`]), and what it reads may be outdated by the seal, which must lock
//! and check what the claim relied on.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use tokio_postgres::{Statement, Transaction};

use crate::envelope::Meta;

/// What becomes of a message in this transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It is loaded as a row.
    Row,
    /// It is stored as a dead letter.
    DeadLetter,
}

/// One message of a transaction, as its commit record sees it.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub meta: &'a Meta,
    /// The body as the source delivered it.
    pub body: &'a str,
    pub outcome: Outcome,
}

/// Prepared statements of one connection, by their SQL text: a record asks for its statements
/// here, and each is prepared once per connection instead of once per batch.
#[derive(Default)]
pub struct Statements {
    prepared: HashMap<String, Statement>,
}

impl Statements {
    /// `sql`, prepared on this connection (now, if it was not yet).
    pub async fn get(
        &mut self,
        tx: &Transaction<'_>,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = tx.prepare(sql).await?;
        self.prepared.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

/// What a record works out for a batch before its transaction ([`CommitRecord::prepare`]), kept
/// with the batch; only the record that made it reads it back.
pub type Prepared = Box<dyn Any + Send + Sync>;

/// Which messages a fenced-off commit must drop: those for which it returns true.
pub type Fence = Box<dyn Fn(&Meta) -> bool + Send + Sync>;

/// Why a commit record could not be written.
#[derive(thiserror::Error)]
pub enum RecordError {
    /// The database failed; the committer treats it like any failure of the transaction (retry,
    /// split, or stop).
    #[error("writing the commit record")]
    Database(#[source] tokio_postgres::Error),
    /// The source no longer lets this process commit some of the messages: roll back, drop the
    /// messages `fence` names, go on with the rest.
    #[error("the commit is fenced off")]
    Fenced {
        fence: Fence,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// What the claim read changed before the seal (another process committed some of the same
    /// messages): the committer rolls back and tries the transaction again, whose claim then sees
    /// the change.
    #[error("the commit record changed since the claim")]
    Outdated(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The record cannot be written and retrying cannot cure it (a checkpoint that would move
    /// backwards): the committer stops without committing or acknowledging.
    #[error("the commit record cannot be written")]
    Broken(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl fmt::Debug for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Database(e) => f.debug_tuple("Database").field(e).finish(),
            RecordError::Fenced { cause, .. } => {
                f.debug_struct("Fenced").field("cause", cause).finish()
            }
            RecordError::Outdated(cause) => f.debug_tuple("Outdated").field(cause).finish(),
            RecordError::Broken(cause) => f.debug_tuple("Broken").field(cause).finish(),
        }
    }
}

impl From<tokio_postgres::Error> for RecordError {
    fn from(e: tokio_postgres::Error) -> Self {
        RecordError::Database(e)
    }
}

/// A batch's transaction, as its commit record sees it.
pub struct InTransaction<'a, 't> {
    pub tx: &'a Transaction<'t>,
    /// Prepared statements of this connection, for the record's own SQL.
    pub statements: &'a mut Statements,
    /// The messages this transaction commits: the rows', then the dead letters'.
    pub entries: &'a [Entry<'a>],
    /// What [`CommitRecord::prepare`] made for these entries, if it made anything.
    pub prepared: Option<&'a (dyn Any + Send + Sync)>,
    /// At the seal, what the claim answered for each entry (true: new, written in this
    /// transaction); empty at the claim.
    pub fresh: &'a [bool],
    /// Messages of the same batch that later transactions will commit (a batch split around a row
    /// the database refused), which a position must not move past.
    pub pending: &'a [&'a Meta],
    /// Messages of the same batch that earlier transactions committed (the pieces of a split batch
    /// before this one), which a position may move past.
    pub committed: &'a [&'a Meta],
}

/// What a source writes in every batch's transaction (see the module's description).
#[async_trait]
pub trait CommitRecord: Send + Sync {
    /// Outside any transaction, once per batch (the batcher calls it while the batch before
    /// commits): whatever the claim can work out ahead from the entries alone, so that the
    /// transaction, which holds a connection, does not wait for it. Dropped if the batch changes.
    /// By default nothing, without looking at the entries.
    fn prepare<'a>(&self, _entries: &mut dyn Iterator<Item = Entry<'a>>) -> Option<Prepared> {
        None
    }

    /// Before the rows: records the entries and tells, per entry in order, whether it is new (load
    /// or store it) or was committed before (skip it). An entry repeated within the list is new at
    /// most once. By default every message is new.
    async fn claim(&self, t: &mut InTransaction<'_, '_>) -> Result<Vec<bool>, RecordError> {
        Ok(vec![true; t.entries.len()])
    }

    /// Last write before COMMIT: where the source resumes once the entries are committed. By
    /// default nothing.
    async fn seal(&self, _t: &mut InTransaction<'_, '_>) -> Result<(), RecordError> {
        Ok(())
    }

    /// Asked before each transaction: whether the source already knows that `meta` cannot be
    /// committed by this process, because an earlier transaction's answer fenced it off. The
    /// committer then drops it as it drops what a [`RecordError::Fenced`] names (unloaded, never
    /// acknowledged), without a transaction for it. Only what a fence reported may be named here,
    /// never a guess: a message dropped while the source would still take it is lost. By default
    /// nothing.
    fn fenced_off(&self, _meta: &Meta) -> bool {
        false
    }

    /// Whether batches must commit in the order the source delivered them.
    fn ordered(&self) -> bool {
        false
    }

    /// For an ordered record: whether the claim, too, must wait for the batch's turn. A claim that
    /// takes locks another process's transaction may wait for (the dedupe ledger's keys: two runs
    /// of one file claim the same lines) must, or a batch waiting for its turn while holding them
    /// could close a circle of waits that PostgreSQL cannot see (the turn is not a database lock),
    /// and every process in it would stall. Such batches overlap less: only their encoding.
    fn claim_in_turn(&self) -> bool {
        false
    }
}

/// For sources with nothing to record: a file without dedupe, the in-memory source.
pub struct NoCommitRecord;

#[async_trait]
impl CommitRecord for NoCommitRecord {}
