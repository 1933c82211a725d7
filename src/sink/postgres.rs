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
use tokio_postgres::{Client, Transaction};

use crate::envelope::{AckToken, Reject, Stage};
use crate::pg;
use crate::retry;
use crate::sink::batch::Batch;
use crate::sink::copy_encode::{COLUMNS, encode_rows};
use crate::sink::dead_letter::{DeadLetterQueue, DeadLetterWriter};
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

pub struct PgCopySink {
    url: String,
    connect_timeout: Duration,
    client: Option<Client>,
    parts: CommitParts,
    stats: Arc<Stats>,
}

/// The statements and helpers one commit uses; separate from the connection so both can be borrowed.
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

enum CommitError {
    Db(tokio_postgres::Error),
    Forward(String),
}

impl From<tokio_postgres::Error> for CommitError {
    fn from(e: tokio_postgres::Error) -> Self {
        CommitError::Db(e)
    }
}

impl PgCopySink {
    /// `client` may be a connection already opened (and used to check the schema) at start.
    pub fn new(settings: SinkSettings, client: Option<Client>, stats: Arc<Stats>) -> PgCopySink {
        let tables = &settings.tables;
        stats.postgres_connected.set(i64::from(client.is_some()));
        PgCopySink {
            url: settings.url,
            connect_timeout: settings.connect_timeout,
            client,
            parts: CommitParts {
                copy: format!(
                    "COPY {} ({COLUMNS}) FROM STDIN (FORMAT binary)",
                    tables.target
                ),
                ledger: settings.dedupe.then(|| Ledger::new(&tables.ledger)),
                dead_letters: DeadLetterWriter::new(
                    &tables.dead_letter,
                    settings.dead_letter_columns,
                ),
                dead_letter_queue: settings.dead_letter_queue,
            },
            stats,
        }
    }

    /// The sink task: commits batches until its input closes, passing each batch's tokens on.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Batch>,
        acks: mpsc::Sender<Vec<AckToken>>,
    ) -> Result<(), SinkError> {
        while let Some(batch) = input.recv().await {
            let tokens = self.commit(batch).await?;
            if acks.send(tokens).await.is_err() {
                return Err(SinkError::Fatal("the acknowledger stopped".into()));
            }
        }
        Ok(())
    }

    /// Commits a batch (splitting it around rows the database refuses); returns every message's token.
    pub async fn commit(&mut self, batch: Batch) -> Result<Vec<AckToken>, SinkError> {
        let mut tokens = Vec::with_capacity(batch.len());
        let mut work = vec![batch];
        while let Some(batch) = work.pop() {
            match self.commit_with_retry(&batch).await? {
                Attempt::Committed(c, took) => {
                    self.stats
                        .record_commit(c.loaded, c.rejected, c.duplicates, took);
                    self.observe_lag(&batch);
                    tokens.extend(batch.into_ack_tokens());
                }
                Attempt::Refused(reason) => work.extend(split(batch, &reason)?),
            }
        }
        Ok(tokens)
    }

    async fn commit_with_retry(&mut self, batch: &Batch) -> Result<Attempt, SinkError> {
        let mut pacing = retry::backoff();
        loop {
            self.connect().await?;
            let Some(client) = self.client.as_mut() else {
                continue;
            };
            let started = std::time::Instant::now();
            let error = match self.parts.try_commit(client, batch).await {
                Ok(counts) => return Ok(Attempt::Committed(counts, started.elapsed())),
                Err(CommitError::Forward(message)) => message,
                Err(CommitError::Db(e)) => match classify(&e) {
                    ErrorClass::Data => return Ok(Attempt::Refused(pg::describe(&e))),
                    ErrorClass::Fatal => return Err(SinkError::Fatal(pg::describe(&e))),
                    ErrorClass::Transient => pg::describe(&e),
                },
            };
            self.stats.commit_retries.inc();
            if self.client.as_ref().is_none_or(Client::is_closed) {
                self.stats.postgres_connected.set(0);
            }
            tracing::warn!(
                error,
                messages = batch.len(),
                "commit failed; keeping the batch and retrying"
            );
            retry::pause(&mut pacing).await;
        }
    }

    /// Time from the source accepting each message to now, just after its commit.
    fn observe_lag(&self, batch: &Batch) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let sent = batch
            .rows
            .iter()
            .map(|r| &r.event.meta)
            .chain(batch.rejects.iter().map(|r| &r.meta))
            .filter_map(|m| m.sent_at_ms);
        for sent_at in sent {
            self.stats
                .end_to_end_seconds
                .observe((now_ms - sent_at).max(0) as f64 / 1000.0);
        }
    }

    /// Makes sure a connection is open, reconnecting (with backoff, until it works) if it was lost.
    async fn connect(&mut self) -> Result<(), SinkError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        let mut pacing = retry::backoff();
        while self.client.is_none() {
            match pg::connect(&self.url, "sluice", self.connect_timeout).await {
                Ok(client) => {
                    tracing::info!("connected to PostgreSQL");
                    self.client = Some(client);
                    self.stats.postgres_connected.set(1);
                }
                Err(e) if classify(&e) == ErrorClass::Fatal => {
                    return Err(SinkError::Fatal(format!(
                        "cannot connect to PostgreSQL: {}",
                        pg::describe(&e)
                    )));
                }
                Err(e) => {
                    tracing::warn!(error = %pg::describe(&e), "cannot reach PostgreSQL; retrying");
                    retry::pause(&mut pacing).await;
                }
            }
        }
        Ok(())
    }
}

impl CommitParts {
    async fn try_commit(
        &self,
        client: &mut Client,
        batch: &Batch,
    ) -> Result<CommitCounts, CommitError> {
        let tx = client.transaction().await?;
        let fresh = self.fresh(&tx, batch).await?;
        let (fresh_rows, fresh_rejects) = fresh.split_at(batch.rows.len());
        let rejects: Vec<&Reject> = batch
            .rejects
            .iter()
            .zip(fresh_rejects)
            .filter_map(|(r, new)| new.then_some(r))
            .collect();
        let loaded = if fresh_rows.iter().all(|new| *new) {
            copy(&tx, &self.copy, batch.copy_data.clone()).await?
        } else {
            let rows = batch
                .rows
                .iter()
                .zip(fresh_rows)
                .filter_map(|(r, new)| new.then_some(r));
            let data = encode_rows(rows.collect::<Vec<_>>().into_iter());
            copy(&tx, &self.copy, data).await?
        };
        self.dead_letters.insert(&tx, &rejects).await?;
        // Last before commit, so a batch the database refuses is not forwarded twice.
        if let Some(queue) = &self.dead_letter_queue
            && !rejects.is_empty()
        {
            queue
                .forward(&rejects)
                .await
                .map_err(CommitError::Forward)?;
        }
        tx.commit().await?;
        Ok(CommitCounts {
            loaded: loaded as usize,
            rejected: rejects.len(),
            duplicates: fresh.iter().filter(|new| !**new).count(),
        })
    }

    /// Per message (rows first, then rejects), whether it is new to the ledger.
    async fn fresh(
        &self,
        tx: &Transaction<'_>,
        batch: &Batch,
    ) -> Result<Vec<bool>, tokio_postgres::Error> {
        let Some(ledger) = &self.ledger else {
            return Ok(vec![true; batch.len()]);
        };
        let keys: Vec<_> = batch
            .rows
            .iter()
            .map(|r| r.event.meta.ledger_key())
            .chain(batch.rejects.iter().map(|r| r.meta.ledger_key()))
            .collect();
        let keys: Vec<&str> = keys.iter().map(|k| k.as_ref()).collect();
        ledger.record(tx, &keys).await
    }
}

async fn copy(
    tx: &Transaction<'_>,
    statement: &str,
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
    let Batch {
        mut rows, rejects, ..
    } = batch;
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
