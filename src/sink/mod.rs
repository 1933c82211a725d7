//! The PostgreSQL side: batching, encoding, committing, and the tables involved.
//!
//! A [`Committer`] commits one batch at a time, each in one transaction together with its source's
//! [`commit_record`]. The pipeline runs several of them side by side on one queue of batches
//! ([`run_committer`]) and hands what they committed to the source's acknowledger: the order
//! "commit, then acknowledge" lives here, whoever the committer is, and so does the order of
//! sources whose batches must commit as delivered ([`commit_order`]). [`PgCopySink`] is the committer
//! of the daemon; tests of the pipeline's delivery rules put a fake in its place.

pub mod batch;
pub mod commit_order;
pub mod commit_record;
pub mod copy_encode;
pub mod dead_letter;
pub mod dead_letter_queue;
pub mod errors;
pub mod ledger;
pub mod postgres;
pub mod schema;

use std::sync::Arc;
use std::time::Duration;

use crate::background::BackgroundTask;
use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::aws;
use crate::config::Config;
use crate::envelope::AckToken;
use crate::pg::{ConnectError, Connector, PgError};
use crate::stats::Stats;
use batch::Batch;
use commit_order::{BatchQueue, Turn};
use commit_record::CommitRecord;
use dead_letter_queue::DeadLetterQueue;
use ledger::Ledger;
use postgres::{PgCopySink, PgCopySinkBuilder, SinkSettings};
use schema::SchemaError;

/// Why the sink stopped (transient trouble is retried inside it and never surfaces here).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("PostgreSQL schema")]
    Schema(#[from] SchemaError),
    #[error("cannot prepare the sink's statements")]
    Prepare(#[source] PgError),
    #[error("PostgreSQL refused the batch")]
    Refused(#[source] PgError),
    #[error("PostgreSQL refused dead-letter records")]
    DeadLettersRefused(#[source] PgError),
    #[error("the acknowledger stopped")]
    AcknowledgerStopped,
    #[error("the source's commit record")]
    Record(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    OutOfTurn(#[from] commit_order::OutOfTurn),
}

/// What one committed transaction held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitCounts {
    pub loaded: usize,
    pub rejected: usize,
    pub duplicates: usize,
}

/// A batch, or a piece of one, committed in one transaction.
pub struct Committed {
    pub batch: Batch,
    pub counts: CommitCounts,
    /// From BEGIN to COMMIT of the transaction that succeeded.
    pub took: Duration,
}

/// What became of a batch: the pieces committed, and how many messages a fenced-off commit
/// dropped (neither loaded nor acknowledged: their source hands them out again).
#[derive(Default)]
pub struct Commit {
    pub committed: Vec<Committed>,
    pub dropped: usize,
}

/// Commits batches, one transaction each, with their source's commit record.
#[async_trait]
pub trait Committer: Send {
    /// Commits `batch` (rows, dead letters and `record`) and returns what was committed. Transient
    /// failures are retried inside; an error means nothing more can be committed. Each transaction
    /// waits for `turn` before its commit record's seal and its COMMIT, never earlier.
    async fn commit(
        &mut self,
        batch: Batch,
        record: &dyn CommitRecord,
        turn: &mut Turn,
    ) -> Result<Commit, SinkError>;

    /// Runs while the committer waits for a batch, and is dropped when one comes: a committer with
    /// a connection notices here that it was lost (so the readiness probe stops counting it) and
    /// opens a new one, so a daemon idle through a database restart is ready again without
    /// waiting for traffic. Never returns.
    async fn keep_connected(&mut self) -> std::convert::Infallible {
        std::future::pending().await
    }
}

/// The queue of batches the committers of one pipeline take from.
pub type SharedBatches = Arc<tokio::sync::Mutex<BatchQueue>>;

/// A committer task: commits batches until the queue closes, and hands each committed piece's
/// acknowledgement tokens on, only after its commit; then passes the batch's turn.
pub async fn run_committer(
    mut committer: Box<dyn Committer>,
    record: Arc<dyn CommitRecord>,
    input: SharedBatches,
    committed: mpsc::Sender<Vec<AckToken>>,
    stats: Arc<Stats>,
) -> Result<(), SinkError> {
    loop {
        let next = tokio::select! {
            next = async { input.lock().await.next().await } => next,
            never = committer.keep_connected() => match never {},
        };
        let Some((batch, mut turn)) = next else {
            return Ok(());
        };
        let commit = committer.commit(batch, &*record, &mut turn).await?;
        stats.record_released(commit.dropped);
        for done in commit.committed {
            let c = done.counts;
            stats.record_commit(c.loaded, c.rejected, c.duplicates, done.took);
            stats.observe_lag(done.batch.sent_at_ms());
            // Only the tokens travel on: the rows are dropped here, so a committed batch does not
            // hold memory while it waits for its acknowledgement.
            if committed.send(done.batch.into_ack_tokens()).await.is_err() {
                return Err(SinkError::AcknowledgerStopped);
            }
        }
        turn.pass();
    }
}

/// The sink of one pipeline: its committers, connected and prepared, and the ledger's upkeep.
pub struct Sink {
    pub committers: Vec<Box<dyn Committer>>,
    ledger_pruning: Option<LedgerPruning>,
}

struct LedgerPruning {
    ledger: Ledger,
    connector: Connector,
    retention_hours: i32,
}

impl Sink {
    /// A sink of the given committers, with no ledger to prune.
    pub fn of(committers: Vec<Box<dyn Committer>>) -> Sink {
        Sink {
            committers,
            ledger_pruning: None,
        }
    }

    /// The background task that prunes the ledger, if there is one to prune.
    pub fn ledger_pruning(&mut self) -> Option<BackgroundTask> {
        let p = self.ledger_pruning.take()?;
        Some(BackgroundTask::new("ledger pruner", move |stop| {
            ledger::prune_periodically(p.ledger, p.connector, p.retention_hours, stop)
        }))
    }
}

/// Connects to PostgreSQL, creates missing tables (if allowed), checks them, and opens
/// `sink.postgres.connections` committers. Everything that can be wrong with the database fails
/// here, before any message is touched.
pub async fn prepare(config: &Config, stats: Arc<Stats>) -> Result<Sink, SinkError> {
    let postgres = &config.sink.postgres;
    let connector = Connector::from_config(postgres);
    let patience = Duration::from_secs(postgres.connect_retry_seconds);
    let mut client = connector.connect_at_start("sluice", patience).await?;
    let tables = config.tables();
    let dedupe = config.dedupe_enabled();
    let columns = match schema::verify(&client, &tables, dedupe).await {
        Err(SchemaError::Missing { .. }) if postgres.create_tables => {
            for status in schema::migrate(&mut client, &tables, dedupe).await? {
                if status.created {
                    tracing::info!(table = status.table, "created missing table");
                }
            }
            schema::verify(&client, &tables, dedupe).await?
        }
        other => other?,
    };
    let dead_letter_queue = match &config.dead_letter.sqs_queue_url {
        Some(url) => Some(
            DeadLetterQueue::connect(
                aws::sqs_client(&config.source.sqs).await,
                url.clone(),
                stats.clone(),
            )
            .await,
        ),
        None => None,
    };
    let ledger_pruning = dedupe.then(|| LedgerPruning {
        ledger: Ledger::new(&tables.ledger),
        connector: connector.clone(),
        retention_hours: i32::try_from(postgres.ledger_retention_hours).unwrap_or(i32::MAX),
    });
    let settings = SinkSettings {
        connector,
        tables,
        dead_letter_columns: columns,
        dead_letter_queue,
    };
    let builder = PgCopySinkBuilder::new(settings, stats);
    let mut committers: Vec<Box<dyn Committer>> = Vec::with_capacity(postgres.connections);
    let mut first = Some(client);
    for _ in 0..postgres.connections {
        let mut committer: PgCopySink = builder.committer(first.take());
        committer.open().await?;
        committers.push(Box::new(committer));
    }
    Ok(Sink {
        committers,
        ledger_pruning,
    })
}
