//! The PostgreSQL sink: one transaction per batch, and acknowledgements only after it commits.
//!
//! A batch's transaction records the messages' keys in the dedupe ledger, skips the ones already
//! committed, COPYs the rows in binary, inserts the dead-letter records, forwards them to the
//! dead-letter queue (if any), and commits. Only then do the batch's acknowledgement tokens go to the
//! acknowledger.
//!
//! Failures are sorted by [`classify`]: transient ones (connection lost, server restarting) keep the
//! batch and retry it on a fresh connection with backoff, forever, so an outage stalls the pipeline
//! (and, through the bounded channels, the source) instead of losing data. A data error means one row
//! can never be written: the batch is split in halves until the row is alone, and that row becomes a
//! dead-letter record carrying the database's error, while its neighbours load. Anything else (schema
//! or permission trouble) stops the daemon without acknowledging the batch.

use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use tokio::sync::mpsc;
use tokio_postgres::{Client, Statement, Transaction};

use crate::envelope::{AckToken, Reject, Stage};
use crate::pg;
use crate::retry;
use crate::sink::batch::Batch;
use crate::sink::copy_encode::{copy_statement, encode_rows};
use crate::sink::dead_letter::DeadLetterWriter;
use crate::sink::dead_letter_queue::DeadLetterQueue;
use crate::sink::errors::{ErrorClass, classify};
use crate::sink::ledger::Ledger;
use crate::sink::schema::{DeadLetterColumns, Tables};
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("PostgreSQL sink stopped: {0}")]
    Fatal(String),
}

/// Everything the sink needs, resolved from configuration.
pub struct SinkSettings {
    pub url: String,
    pub connect_timeout: Duration,
    pub tables: Tables,
    pub dead_letter_columns: DeadLetterColumns,
    /// Keep the dedupe ledger.
    pub dedupe: bool,
    pub dead_letter_queue: Option<DeadLetterQueue>,
}

/// One committer: a connection and the batches it commits, one transaction at a time. The pipeline
/// runs `sink.postgres.connections` of them side by side on one queue of batches, so one batch's
/// COMMIT (waiting for the WAL to reach disk) overlaps the next batch's COPY.
pub struct PgCopySink {
    url: String,
    connect_timeout: Duration,
    session: Option<Session>,
    /// A connection handed over at start, prepared on first use.
    spare: Option<Client>,
    parts: Arc<CommitParts>,
    stats: Arc<Stats>,
}

/// A connection with the sink's statements prepared on it; dropped and rebuilt on reconnect.
struct Session {
    client: Client,
    copy: Statement,
    dead_letters: Statement,
    ledger: Option<Statement>,
}

/// The statements and helpers every committer shares.
struct CommitParts {
    copy: String,
    ledger: Option<Ledger>,
    dead_letters: DeadLetterWriter,
    dead_letter_queue: Option<DeadLetterQueue>,
}

/// What one committed transaction held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitCounts {
    pub loaded: usize,
    pub rejected: usize,
    pub duplicates: usize,
}

enum Attempt {
    /// Committed, with how long the successful transaction took.
    Committed(CommitCounts, Duration),
    /// The database refused some row's data; the text is its error.
    Refused(String),
}

/// Builds the committers of one pipeline.
pub struct PgCopySinkBuilder {
    url: String,
    connect_timeout: Duration,
    parts: Arc<CommitParts>,
    stats: Arc<Stats>,
}

impl PgCopySinkBuilder {
    pub fn new(settings: SinkSettings, stats: Arc<Stats>) -> PgCopySinkBuilder {
        let tables = &settings.tables;
        PgCopySinkBuilder {
            url: settings.url,
            connect_timeout: settings.connect_timeout,
            parts: Arc::new(CommitParts {
                copy: copy_statement(&tables.target),
                ledger: settings.dedupe.then(|| Ledger::new(&tables.ledger)),
                dead_letters: DeadLetterWriter::new(
                    &tables.dead_letter,
                    settings.dead_letter_columns,
                ),
                dead_letter_queue: settings.dead_letter_queue,
            }),
            stats,
        }
    }

    /// A committer; `client` may be a connection already opened (to check the schema) at start.
    pub fn committer(&self, client: Option<Client>) -> PgCopySink {
        PgCopySink {
            url: self.url.clone(),
            connect_timeout: self.connect_timeout,
            session: None,
            spare: client,
            parts: self.parts.clone(),
            stats: self.stats.clone(),
        }
    }
}

/// The queue of batches the committers of one pipeline take from.
pub type SharedBatches = Arc<tokio::sync::Mutex<mpsc::Receiver<Batch>>>;

impl PgCopySink {
    /// The committer task: commits batches until the queue closes, and hands each committed batch's
    /// acknowledgement tokens to the acknowledger.
    pub async fn run(
        mut self,
        input: SharedBatches,
        committed: mpsc::Sender<Vec<AckToken>>,
    ) -> Result<(), SinkError> {
        loop {
            let next = input.lock().await.recv().await;
            let Some(batch) = next else {
                return Ok(());
            };
            for done in self.commit(batch).await? {
                // Only the tokens travel on: the rows are dropped here, so a committed batch does
                // not hold memory while it waits for its acknowledgement.
                self.stats.observe_lag(done.sent_at_ms());
                if committed.send(done.into_ack_tokens()).await.is_err() {
                    return Err(SinkError::Fatal("the acknowledger stopped".into()));
                }
            }
        }
    }

    /// Connects and prepares the statements now, so that a setup that cannot work fails at start.
    pub async fn open(&mut self) -> Result<(), SinkError> {
        match self.session().await {
            Ok(_) => Ok(()),
            Err(e) => Err(unusable(&e)),
        }
    }

    /// Commits a batch, splitting it around rows the database refuses; returns what was committed
    /// (the batch itself, or the pieces it was split into).
    pub async fn commit(&mut self, batch: Batch) -> Result<Vec<Batch>, SinkError> {
        let mut done = Vec::with_capacity(1);
        let mut work = vec![batch];
        while let Some(mut batch) = work.pop() {
            match self.commit_with_retry(&mut batch).await? {
                Attempt::Committed(c, took) => {
                    self.stats
                        .record_commit(c.loaded, c.rejected, c.duplicates, took);
                    done.push(batch);
                }
                Attempt::Refused(reason) => work.extend(split(batch, &reason)?),
            }
        }
        Ok(done)
    }

    /// The batch's encoded rows go to the first attempt and are freed as they are sent, so a batch
    /// waiting for its COMMIT holds only its messages; a retry encodes them again.
    async fn commit_with_retry(&mut self, batch: &mut Batch) -> Result<Attempt, SinkError> {
        let mut pacing = retry::backoff();
        let parts = self.parts.clone();
        loop {
            let error = match self.session().await {
                Err(e) if classify(&e) == ErrorClass::Fatal => {
                    return Err(unusable(&e));
                }
                Err(e) => pg::describe(&e),
                Ok(session) => {
                    let started = std::time::Instant::now();
                    let encoded = match std::mem::take(&mut batch.copy_data) {
                        data if data.is_empty() => encode_rows(batch.row_count(), batch.rows()),
                        data => data,
                    };
                    match parts.try_commit(session, batch, encoded).await {
                        Ok(counts) => return Ok(Attempt::Committed(counts, started.elapsed())),
                        Err(e) => match classify(&e) {
                            ErrorClass::Data => return Ok(Attempt::Refused(pg::describe(&e))),
                            ErrorClass::Fatal => return Err(SinkError::Fatal(pg::describe(&e))),
                            ErrorClass::Transient => pg::describe(&e),
                        },
                    }
                }
            };
            self.stats.commit_retries.inc();
            if self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
                self.session = None;
                self.stats.postgres_connections.dec();
            }
            tracing::warn!(
                error,
                messages = batch.len(),
                "commit failed; keeping the batch and retrying"
            );
            retry::pause(&mut pacing).await;
        }
    }

    /// The open session, connecting and preparing the statements if there is none.
    async fn session(&mut self) -> Result<&mut Session, tokio_postgres::Error> {
        let session = match self.session.take() {
            Some(session) => session,
            None => self.new_session().await?,
        };
        Ok(self.session.insert(session))
    }

    /// Takes the connection handed over at start if it is still open, else connects; then prepares.
    async fn new_session(&mut self) -> Result<Session, tokio_postgres::Error> {
        let client = match self.spare.take() {
            Some(client) if !client.is_closed() => client,
            _ => pg::connect(&self.url, "sluice", self.connect_timeout).await?,
        };
        let parts = &self.parts;
        let ledger = match &parts.ledger {
            Some(ledger) => Some(client.prepare(ledger.sql()).await?),
            None => None,
        };
        let session = Session {
            copy: client.prepare(&parts.copy).await?,
            dead_letters: client.prepare(parts.dead_letters.sql()).await?,
            ledger,
            client,
        };
        tracing::debug!("PostgreSQL session ready");
        self.stats.postgres_connections.inc();
        Ok(session)
    }
}

/// A connection or preparation error that retrying cannot cure (bad credentials, missing database).
fn unusable(e: &tokio_postgres::Error) -> SinkError {
    SinkError::Fatal(format!("cannot use PostgreSQL: {}", pg::describe(e)))
}

impl Drop for PgCopySink {
    fn drop(&mut self) {
        if self.session.is_some() {
            self.stats.postgres_connections.dec();
        }
    }
}

impl CommitParts {
    /// `encoded` is the batch's rows in COPY form.
    async fn try_commit(
        &self,
        session: &mut Session,
        batch: &Batch,
        encoded: bytes::Bytes,
    ) -> Result<CommitCounts, tokio_postgres::Error> {
        let tx = session.client.transaction().await?;
        let fresh = match (&self.ledger, &session.ledger) {
            (Some(ledger), Some(statement)) => {
                let keys: Vec<_> = batch
                    .rows()
                    .map(|r| r.event.meta.ledger_key())
                    .chain(batch.rejects.iter().map(|r| r.meta.ledger_key()))
                    .collect();
                let keys: Vec<&str> = keys.iter().map(|k| k.as_ref()).collect();
                ledger.record(&tx, statement, &keys).await?
            }
            _ => vec![true; batch.len()],
        };
        let (fresh_rows, fresh_rejects) = fresh.split_at(batch.row_count());
        let rejects: Vec<&Reject> = batch
            .rejects
            .iter()
            .zip(fresh_rejects)
            .filter_map(|(r, new)| new.then_some(r))
            .collect();
        let data = if fresh_rows.iter().all(|new| *new) {
            encoded
        } else {
            let count = fresh_rows.iter().filter(|new| **new).count();
            let rows = batch
                .rows()
                .zip(fresh_rows)
                .filter_map(|(r, new)| new.then_some(r));
            encode_rows(count, rows)
        };
        let loaded = copy(&tx, &session.copy, data).await?;
        self.dead_letters
            .insert(&tx, &session.dead_letters, &rejects)
            .await?;
        // Last before commit, so a batch the database refuses is not forwarded twice. Forwarding
        // gives up what the queue will not take: it never holds up the commit for long.
        if let Some(queue) = &self.dead_letter_queue
            && !rejects.is_empty()
        {
            queue.forward(&rejects).await;
        }
        tx.commit().await?;
        Ok(CommitCounts {
            loaded: loaded as usize,
            rejected: rejects.len(),
            duplicates: fresh.iter().filter(|new| !**new).count(),
        })
    }
}

async fn copy(
    tx: &Transaction<'_>,
    statement: &Statement,
    data: bytes::Bytes,
) -> Result<u64, tokio_postgres::Error> {
    if data.len() <= 21 {
        // Header and trailer only: nothing to load.
        return Ok(0);
    }
    let sink = tx.copy_in::<_, bytes::Bytes>(statement).await?;
    futures::pin_mut!(sink);
    sink.send(data).await?;
    sink.finish().await
}

/// Splits a batch the database refused: halves while it holds several rows, and a lone row becomes a
/// dead-letter record with the database's reason. Returned in reverse order of processing.
fn split(batch: Batch, reason: &str) -> Result<Vec<Batch>, SinkError> {
    let (mut rows, rejects) = batch.into_parts();
    match rows.len() {
        0 => Err(SinkError::Fatal(format!(
            "PostgreSQL refused dead-letter records: {reason}"
        ))),
        1 => {
            let (body, meta) = rows.remove(0).event.into_body_and_meta();
            tracing::warn!(message_id = %meta.message_id, reason, "PostgreSQL refused a row; dead-lettering it");
            let mut rejects = rejects;
            rejects.push(Reject {
                body,
                meta,
                stage: Stage::Sink,
                reason: format!("refused by PostgreSQL: {reason}"),
            });
            Ok(vec![Batch::new(Vec::new(), rejects)])
        }
        n => {
            let second = rows.split_off(n / 2);
            Ok(vec![
                Batch::new(second, Vec::new()),
                Batch::new(rows, rejects),
            ])
        }
    }
}
