//! The PostgreSQL committer: one transaction per batch, holding its rows, its dead letters and its
//! source's commit record.
//!
//! A batch's transaction claims its messages in the source's commit record (the dedupe ledger skips
//! the ones already committed), COPYs the rows in binary, inserts the dead-letter records, waits for
//! the batch's turn (only a source whose batches commit in order has to, and one whose claim takes
//! locks waits before the claim instead: [`super::commit_order`]), seals the record (checkpoints,
//! positions), forwards the dead letters to the dead-letter queue (if any), and commits. Only then
//! do the batch's acknowledgement tokens go on (see [`super::run_committer`]).
//!
//! Failures are sorted by [`classify`]: transient ones (connection lost, server restarting) keep the
//! batch and retry it on a fresh connection with backoff, forever, so an outage stalls the pipeline
//! (and, through the bounded channels, the source) instead of losing data. A data error means one row
//! can never be written: the batch is split in halves until the row is alone, and that row becomes a
//! dead-letter record carrying the database's error, while its neighbours load. A commit the source
//! fences off is rolled back and committed again without the messages the fence names; what the
//! source already knows to be fenced off (an earlier answer) is taken out before the transaction
//! begins, and a batch left empty opens none. Anything else
//! (schema or permission trouble) stops the daemon without acknowledging the batch.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::RetryableWithContext;
use futures::SinkExt;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement, Transaction};

use super::{Commit, CommitCounts, Committed, Committer, SinkError};
use crate::envelope::{Meta, Reject, Stage};
use crate::error_chain::Chain;
use crate::pg::{ConnectError, Connector, PgError};
use crate::retry::RetryPolicy;
use crate::sink::batch::Batch;
use crate::sink::commit_order::{OutOfTurn, Turn};
use crate::sink::commit_record::{CommitRecord, Fence, InTransaction, RecordError, Statements};
use crate::sink::copy_encode::{copy_statement, encode_rows};
use crate::sink::dead_letter::{DeadLetterWriter, storable};
use crate::sink::dead_letter_queue::DeadLetterQueue;
use crate::sink::errors::{ErrorClass, classify};
use crate::sink::schema::DeadLetterColumns;
use crate::stats::Stats;
use crate::table_name::Tables;

/// A commit that fails for a passing reason is retried, with the batch in hand, for as long as the
/// failure lasts.
const COMMIT: RetryPolicy = RetryPolicy::FOREVER;

/// Everything the sink needs, resolved from configuration.
pub struct SinkSettings {
    pub connector: Connector,
    pub tables: Tables,
    pub dead_letter_columns: DeadLetterColumns,
    pub dead_letter_queue: Option<DeadLetterQueue>,
}

/// One committer: a connection and the batches it commits, one transaction at a time. The pipeline
/// runs `sink.postgres.connections` of them side by side on one queue of batches, so one batch's
/// COMMIT (waiting for the WAL to reach disk) overlaps the next batch's COPY.
pub struct PgCopySink {
    connector: Connector,
    session: Option<Session>,
    /// A connection handed over at start, prepared on first use.
    spare: Option<Client>,
    parts: Arc<CommitParts>,
    stats: Arc<Stats>,
}

/// A connection with the sink's statements prepared on it; dropped and rebuilt on reconnect.
/// While it exists it counts in `sluice_postgres_connections`, which the readiness probe reads.
struct Session {
    client: Client,
    copy: Statement,
    dead_letters: Statement,
    /// The commit record's statements, prepared on first use.
    record: Statements,
    stats: Arc<Stats>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stats.postgres_connections.dec();
    }
}

/// How often an idle committer looks whether its connection is still open: a closed one is seen
/// within this time, so `/readyz` turns not ready within it when the database goes away.
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

/// The statements and helpers every committer shares.
struct CommitParts {
    copy: String,
    dead_letters: DeadLetterWriter,
    dead_letter_queue: Option<DeadLetterQueue>,
}

/// The other pieces of a batch split around what the database refused: those still to commit and
/// those committed already (a position must cover the latter and not pass the former).
#[derive(Clone, Copy)]
struct Pieces<'a> {
    pending: &'a [&'a Meta],
    committed: &'a [&'a Meta],
}

/// How one piece of a batch ended.
enum Attempt {
    /// Committed, with how long the successful transaction took.
    Committed(CommitCounts, Duration),
    /// The database refused some row's data.
    Refused(tokio_postgres::Error),
    /// The source fenced the commit off for the messages `Fence` names.
    Fenced(Fence, Box<dyn std::error::Error + Send + Sync>),
    /// While the piece waited for its turn, an earlier batch's answer fenced some of its messages
    /// off: rolled back, to be committed again without them.
    FencedMeanwhile,
}

/// Why one try of a transaction failed.
enum Failure {
    Connect(ConnectError),
    Db(tokio_postgres::Error),
    Fenced(Fence, Box<dyn std::error::Error + Send + Sync>),
    Record(Box<dyn std::error::Error + Send + Sync>),
    Outdated(Box<dyn std::error::Error + Send + Sync>),
    OutOfTurn(OutOfTurn),
    FencedMeanwhile,
}

impl Failure {
    fn is_transient(&self) -> bool {
        match self {
            Failure::Connect(e) => e
                .driver()
                .is_some_and(|d| classify(d) == ErrorClass::Transient),
            Failure::Db(e) => classify(e) == ErrorClass::Transient,
            Failure::Outdated(_) => true,
            Failure::Fenced(..)
            | Failure::Record(_)
            | Failure::OutOfTurn(_)
            | Failure::FencedMeanwhile => false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "{}", Chain(e)),
            Failure::Db(e) => f.write_str(&crate::pg::describe(e)),
            Failure::Fenced(_, cause) => write!(f, "fenced off: {cause}"),
            Failure::Record(cause) => write!(f, "commit record: {cause}"),
            Failure::Outdated(cause) => write!(f, "commit record outdated: {cause}"),
            Failure::OutOfTurn(e) => write!(f, "{e}"),
            Failure::FencedMeanwhile => f.write_str("fenced off by an earlier batch's commit"),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

impl From<RecordError> for Failure {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Database(e) => Failure::Db(e),
            RecordError::Fenced { fence, cause } => Failure::Fenced(fence, cause),
            RecordError::Outdated(cause) => Failure::Outdated(cause),
            RecordError::Broken(cause) => Failure::Record(cause),
        }
    }
}

/// Builds the committers of one pipeline.
pub struct PgCopySinkBuilder {
    connector: Connector,
    parts: Arc<CommitParts>,
    stats: Arc<Stats>,
}

impl PgCopySinkBuilder {
    pub fn new(settings: SinkSettings, stats: Arc<Stats>) -> PgCopySinkBuilder {
        let tables = &settings.tables;
        PgCopySinkBuilder {
            connector: settings.connector,
            parts: Arc::new(CommitParts {
                copy: copy_statement(&tables.target),
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
            connector: self.connector.clone(),
            session: None,
            spare: client,
            parts: self.parts.clone(),
            stats: self.stats.clone(),
        }
    }
}

#[async_trait]
impl Committer for PgCopySink {
    /// Commits a batch, splitting it around rows the database refuses and dropping what a fence
    /// names; returns what was committed (the batch itself, or the pieces it was split into).
    async fn commit(
        &mut self,
        batch: Batch,
        record: &dyn CommitRecord,
        turn: &mut Turn,
    ) -> Result<Commit, SinkError> {
        let mut commit = Commit::default();
        let mut work = vec![batch];
        while let Some(mut batch) = work.pop() {
            let lost = batch.drop_where(|meta| record.fenced_off(meta));
            if lost > 0 {
                tracing::warn!(
                    dropped = lost,
                    "commit fenced off by the source before: its messages there are dropped unloaded without a transaction and read again by their new owner"
                );
                commit.dropped += lost;
                if batch.is_empty() {
                    continue;
                }
            }
            let pending: Vec<&Meta> = work.iter().flat_map(Batch::metas).collect();
            let done: Vec<&Meta> = commit
                .committed
                .iter()
                .flat_map(|c| c.batch.metas())
                .collect();
            let pieces = Pieces {
                pending: &pending,
                committed: &done,
            };
            let attempt = self
                .commit_with_retry(&mut batch, record, pieces, turn)
                .await?;
            drop(done);
            match attempt {
                Attempt::Committed(counts, took) => commit.committed.push(Committed {
                    batch,
                    counts,
                    took,
                }),
                Attempt::Refused(error) => {
                    let reason = crate::pg::describe(&error);
                    match split(batch, &reason) {
                        Some(pieces) => work.extend(pieces),
                        None => return Err(SinkError::DeadLettersRefused(PgError(error))),
                    }
                }
                Attempt::Fenced(fence, cause) => {
                    let dropped = batch.drop_where(&fence)
                        + work.iter_mut().map(|b| b.drop_where(&fence)).sum::<usize>();
                    tracing::warn!(dropped, cause = %cause, "commit fenced off by the source; its messages there are dropped unloaded and read again by their new owner");
                    commit.dropped += dropped;
                    if !batch.is_empty() {
                        work.push(batch);
                    }
                }
                // Taken out at the top of the loop, like anything fenced off before.
                Attempt::FencedMeanwhile => work.push(batch),
            }
        }
        Ok(commit)
    }

    /// Watches the open connection; once it has closed (the server restarted, the session was
    /// terminated), drops it and connects again with backoff until the database answers.
    async fn keep_connected(&mut self) -> std::convert::Infallible {
        let mut check = tokio::time::interval(CONNECTION_CHECK);
        loop {
            while self.session.as_ref().is_some_and(|s| !s.client.is_closed()) {
                check.tick().await;
            }
            if self.session.take().is_some() {
                tracing::warn!("PostgreSQL connection lost while idle; reconnecting");
            }
            let mut pacing = crate::retry::backoff();
            loop {
                match self.session().await {
                    Ok(_) => {
                        tracing::info!("PostgreSQL connection open again");
                        break;
                    }
                    Err(failure) => {
                        tracing::warn!(error = %failure, "cannot reconnect to PostgreSQL; retrying");
                        crate::retry::pause(&mut pacing).await;
                    }
                }
            }
        }
    }
}

impl PgCopySink {
    /// Connects and prepares the statements now, so that a setup that cannot work fails at start.
    pub async fn open(&mut self) -> Result<(), SinkError> {
        match self.session().await {
            Ok(_) => Ok(()),
            Err(Failure::Connect(e)) => Err(SinkError::Connect(e)),
            Err(Failure::Db(e)) => Err(SinkError::Prepare(PgError(e))),
            Err(
                Failure::Fenced(..)
                | Failure::Record(_)
                | Failure::Outdated(_)
                | Failure::OutOfTurn(_)
                | Failure::FencedMeanwhile,
            ) => {
                unreachable!("opening a session writes no record")
            }
        }
    }

    /// One piece of a batch, tried until it commits or fails for a reason retrying cannot cure.
    async fn commit_with_retry<'a>(
        &'a mut self,
        batch: &'a mut Batch,
        record: &'a dyn CommitRecord,
        pieces: Pieces<'a>,
        turn: &'a mut Turn,
    ) -> Result<Attempt, SinkError> {
        let stats = self.stats.clone();
        let messages = batch.len();
        type Context<'a> = (&'a mut PgCopySink, &'a mut Batch, &'a mut Turn);
        let attempt = |(this, batch, turn): Context<'a>| async move {
            let result = this.try_commit(batch, record, pieces, turn).await;
            ((this, batch, turn), result)
        };
        let (_, result) = attempt
        .retry(COMMIT.backoff())
        .context((self, batch, turn))
        .when(Failure::is_transient)
        .notify(|failure, _| {
            stats.commit_retries.inc();
            tracing::warn!(error = %failure, messages, "commit failed; keeping the batch and retrying");
        })
        .await;
        match result {
            Ok((counts, took)) => Ok(Attempt::Committed(counts, took)),
            Err(Failure::Db(e)) if classify(&e) == ErrorClass::Data => Ok(Attempt::Refused(e)),
            Err(Failure::Db(e)) => Err(SinkError::Refused(PgError(e))),
            Err(Failure::Connect(e)) => Err(SinkError::Connect(e)),
            Err(Failure::Fenced(fence, cause)) => Ok(Attempt::Fenced(fence, cause)),
            Err(Failure::Record(cause)) => Err(SinkError::Record(cause)),
            Err(Failure::OutOfTurn(e)) => Err(SinkError::OutOfTurn(e)),
            Err(Failure::FencedMeanwhile) => Ok(Attempt::FencedMeanwhile),
            // Retried for as long as it happens; kept here only should the policy ever give up.
            Err(Failure::Outdated(cause)) => Err(SinkError::Record(cause)),
        }
    }

    /// One transaction. A connection found closed afterwards is dropped, so the next try opens a
    /// fresh one.
    async fn try_commit(
        &mut self,
        batch: &mut Batch,
        record: &dyn CommitRecord,
        pieces: Pieces<'_>,
        turn: &mut Turn,
    ) -> Result<(CommitCounts, Duration), Failure> {
        let parts = self.parts.clone();
        let session = self.session().await?;
        let started = Instant::now();
        // The batch's encoded rows go to the first try and are freed as they are sent, so a batch
        // waiting for its COMMIT holds only its messages; a retry encodes them again.
        let encoded = match std::mem::take(&mut batch.copy_data) {
            data if data.is_empty() => encode_rows(batch.row_count(), batch.rows()),
            data => data,
        };
        let result = parts
            .transaction(session, batch, encoded, record, pieces, turn)
            .await;
        if result.is_err() && self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
            self.session = None;
        }
        result.map(|counts| (counts, started.elapsed()))
    }

    /// The open session, connecting and preparing the statements if there is none.
    async fn session(&mut self) -> Result<&mut Session, Failure> {
        let session = match self.session.take() {
            Some(session) => session,
            None => self.new_session().await?,
        };
        Ok(self.session.insert(session))
    }

    /// Takes the connection handed over at start if it is still open, else connects; then prepares.
    async fn new_session(&mut self) -> Result<Session, Failure> {
        let client = match self.spare.take() {
            Some(client) if !client.is_closed() => client,
            _ => self
                .connector
                .connect("sluice")
                .await
                .map_err(Failure::Connect)?,
        };
        let session = Session {
            copy: client.prepare(&self.parts.copy).await?,
            dead_letters: client.prepare(self.parts.dead_letters.sql()).await?,
            record: Statements::default(),
            client,
            stats: self.stats.clone(),
        };
        tracing::debug!("PostgreSQL session ready");
        self.stats.postgres_connections.inc();
        Ok(session)
    }
}

impl CommitParts {
    /// `encoded` is the batch's rows in COPY form.
    async fn transaction(
        &self,
        session: &mut Session,
        batch: &Batch,
        encoded: bytes::Bytes,
        record: &dyn CommitRecord,
        pieces: Pieces<'_>,
        turn: &mut Turn,
    ) -> Result<CommitCounts, Failure> {
        let tx = session.client.transaction().await?;
        let entries = batch.entries();
        let mut view = InTransaction {
            tx: &tx,
            statements: &mut session.record,
            entries: &entries,
            prepared: batch.prepared(),
            fresh: &[],
            pending: pieces.pending,
            committed: pieces.committed,
        };
        if record.claim_in_turn() {
            turn.wait().await.map_err(Failure::OutOfTurn)?;
        }
        let fresh = record.claim(&mut view).await?;
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
        turn.wait().await.map_err(Failure::OutOfTurn)?;
        // The batch before may have learnt meanwhile that some of these messages are fenced off:
        // give them up now rather than have the seal find it out.
        if entries.iter().any(|e| record.fenced_off(e.meta)) {
            return Err(Failure::FencedMeanwhile);
        }
        let mut view = InTransaction {
            fresh: &fresh,
            ..view
        };
        record.seal(&mut view).await?;
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

/// Splits a batch the database refused for `reason`, to find what it refuses: rows apart from dead
/// letters first (so a good row is never blamed for a dead letter), then halves while a piece holds
/// several; a lone row becomes a dead-letter record with the database's reason, and a lone dead
/// letter is stored in a form the database takes ([`storable`]). Returned in reverse order of
/// processing; `None` when nothing is left to change (a dead letter without a body refused).
fn split(batch: Batch, reason: &str) -> Option<Vec<Batch>> {
    let (mut rows, mut rejects) = batch.into_parts();
    if !rows.is_empty() && !rejects.is_empty() {
        return Some(vec![
            Batch::new(rows, Vec::new()),
            Batch::new(Vec::new(), rejects),
        ]);
    }
    match (rows.len(), rejects.len()) {
        (0, 0) => None,
        (0, 1) => {
            let reject = storable(rejects.remove(0), reason)?;
            tracing::warn!(message_id = %reject.meta.message_id, reason, "PostgreSQL refused a dead letter; storing it escaped and truncated");
            Some(vec![Batch::new(Vec::new(), vec![reject])])
        }
        (0, n) => {
            let second = rejects.split_off(n / 2);
            Some(vec![
                Batch::new(Vec::new(), second),
                Batch::new(Vec::new(), rejects),
            ])
        }
        (1, _) => {
            let (body, meta) = rows.remove(0).event.into_body_and_meta();
            tracing::warn!(message_id = %meta.message_id, reason, "PostgreSQL refused a row; dead-lettering it");
            Some(vec![Batch::new(
                Vec::new(),
                vec![Reject {
                    body,
                    meta,
                    stage: Stage::Sink,
                    reason: format!("refused by PostgreSQL: {reason}"),
                }],
            )])
        }
        (n, _) => {
            let second = rows.split_off(n / 2);
            Some(vec![
                Batch::new(second, Vec::new()),
                Batch::new(rows, Vec::new()),
            ])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::batch::test_rows;

    fn users(batch: &Batch) -> Vec<String> {
        batch.rows().map(|r| r.event.user_id().to_owned()).collect()
    }

    #[test]
    fn a_refused_batch_is_split_into_rows_and_dead_letters_then_halved() {
        let (rows, rejects) = test_rows(5, 1);
        let pieces = split(Batch::new(rows, rejects), "no").expect("rows to split");
        // Processed from the end: the dead letters alone first, then the rows.
        assert_eq!(pieces.len(), 2);
        assert_eq!((pieces[1].row_count(), pieces[1].rejects.len()), (0, 1));
        assert_eq!(users(&pieces[0]), ["u0", "u1", "u2", "u3", "u4"]);
        let halves = split(pieces.into_iter().next().expect("rows"), "no").expect("halves");
        assert_eq!(users(&halves[1]), ["u0", "u1"]);
        assert_eq!(users(&halves[0]), ["u2", "u3", "u4"]);
    }

    #[test]
    fn a_lone_refused_row_becomes_a_dead_letter_with_the_reason() {
        let (rows, _) = test_rows(1, 0);
        let pieces = split(Batch::new(rows, Vec::new()), "ERROR: check violation").expect("a row");
        assert_eq!(pieces.len(), 1);
        let piece = &pieces[0];
        assert_eq!(piece.row_count(), 0);
        assert_eq!(piece.rejects.len(), 1);
        let last = &piece.rejects[0];
        assert_eq!(last.stage, Stage::Sink);
        assert_eq!(last.reason, "refused by PostgreSQL: ERROR: check violation");
        assert!(last.body.contains("\"u0\""), "{}", last.body);
    }

    #[test]
    fn refused_dead_letters_are_halved_then_stored_in_a_form_the_database_takes() {
        let (_, rejects) = test_rows(0, 2);
        let halves = split(Batch::new(Vec::new(), rejects), "no").expect("halves");
        assert_eq!(
            halves.iter().map(|b| b.rejects.len()).collect::<Vec<_>>(),
            [1, 1]
        );
        let lone = halves.into_iter().next().expect("a dead letter");
        let stored = split(lone, "ERROR: too long").expect("a storable form");
        let reject = &stored[0].rejects[0];
        assert!(
            reject.reason.contains("ERROR: too long"),
            "{}",
            reject.reason
        );
        let emptied = Batch::new(
            Vec::new(),
            vec![Reject {
                body: String::new(),
                ..reject.clone()
            }],
        );
        assert!(split(emptied, "no").is_none(), "nothing left to change");
    }
}
