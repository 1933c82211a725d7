//! Resumable file loads: each batch of a file writes, in its own transaction, how far into the file
//! everything is committed, so a run stopped part-way (a signal, a crash, a lost connection) is
//! continued by the next run of the same file exactly after the last committed line, with nothing
//! loaded twice and nothing skipped.
//!
//! A file is known by its canonical path, its size and its modification time: a file changed since
//! is another file and is read from its start. Standard input has no identity and is not resumed.
//! The position is read at the start of each transaction (a message at or before it counts as
//! committed already, so a batch retried after a COMMIT whose outcome was lost is recognised and
//! skipped), and sealed last, never past a message a split batch has yet to commit. Positions only
//! move forward in file order, so the file's batches commit in order ([`CommitRecord::ordered`]),
//! while the next batch's rows are already being copied on another connection.
//!
//! The read takes no lock (the batch before may still hold the row until its COMMIT), so the seal
//! checks it: the position is written only if it is still before every message this transaction
//! loaded. Otherwise someone else (another run of the same file) committed them meanwhile, and the
//! transaction is rolled back and tried again, which then skips them.

use std::path::Path;

use async_trait::async_trait;

use crate::envelope::{MessageId, Meta};
use crate::pg::{ConnectError, Connector, PgError};
use crate::sink::commit_record::{CommitRecord, Entry, InTransaction, Prepared, RecordError};
use crate::table_name::TableName;

/// The table's name, in the schema of the ledger table.
const TABLE: &str = "sluice_file_positions";

/// A file's identity as its positions are recorded: canonical path, size and modification time.
pub fn identity_of(path: &Path) -> Option<String> {
    if path.as_os_str() == "-" {
        return None;
    }
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Some(format!(
        "{} size={} mtime_ns={modified}",
        canonical.display(),
        meta.len()
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum PositionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("reading the committed position from {table}")]
    Read {
        table: String,
        #[source]
        source: PgError,
    },
}

/// The committed positions of files, and the record each batch of one file writes.
pub struct FilePositions {
    file: String,
    select: String,
    upsert: String,
    /// With dedupe on, the ledger also claims each message.
    ledger: Option<Box<dyn CommitRecord>>,
}

impl FilePositions {
    /// The positions table beside `ledger_table` (same schema).
    pub fn table_beside(ledger_table: &TableName) -> TableName {
        TableName {
            schema: ledger_table.schema.clone(),
            ..TableName::unqualified(TABLE)
        }
    }

    pub fn new(
        table: &TableName,
        file: String,
        ledger: Option<Box<dyn CommitRecord>>,
    ) -> FilePositions {
        FilePositions {
            file,
            select: format!("SELECT position FROM {table} WHERE file = $1"),
            upsert: format!(
                "INSERT INTO {table} AS p (file, position) VALUES ($1, $2)
                 ON CONFLICT (file) DO UPDATE
                 SET position = GREATEST(p.position, EXCLUDED.position), committed_at = now()
                 WHERE p.position < $3
                 RETURNING 1"
            ),
            ledger,
        }
    }

    /// Creates the table if missing and reads the position committed for this file (0: none).
    pub async fn committed(
        &self,
        connector: &Connector,
        table: &TableName,
    ) -> Result<u64, PositionError> {
        let client = connector.connect("sluice").await?;
        let read = |source| PositionError::Read {
            table: table.to_string(),
            source: PgError(source),
        };
        match client.batch_execute(&ddl(table)).await {
            // Another run starting at the same moment created it first: `IF NOT EXISTS` does not
            // cover that race, and the table is there now.
            Err(e) if is_created_meanwhile(&e) => {}
            other => other.map_err(read)?,
        }
        let select = format!("SELECT position FROM {table} WHERE file = $1");
        let row = client
            .query_opt(&select, &[&self.file])
            .await
            .map_err(read)?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0)).max(0) as u64)
    }
}

/// Another run of the file committed messages this transaction loaded, after its claim read the
/// position.
#[derive(Debug, thiserror::Error)]
#[error(
    "{file}: the committed position passed message {first_loaded} while this batch was loading it"
)]
struct Overtaken {
    file: String,
    first_loaded: i64,
}

fn is_created_meanwhile(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code()
        .is_some_and(|c| *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::DUPLICATE_TABLE)
}

/// The positions table: one row per file identity.
pub fn ddl(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table}(
    file          text PRIMARY KEY,
    position      bigint NOT NULL,
    committed_at  timestamptz NOT NULL DEFAULT now()
)"
    )
}

fn position(meta: &Meta) -> i64 {
    match meta.message_id {
        MessageId::Position(n) => i64::try_from(n).unwrap_or(i64::MAX),
        MessageId::Text(_) => 0,
    }
}

#[async_trait]
impl CommitRecord for FilePositions {
    /// The ledger's keys, when there is one: its claim below finds them in the transaction's view.
    fn prepare<'a>(&self, entries: &mut dyn Iterator<Item = Entry<'a>>) -> Option<Prepared> {
        self.ledger.as_ref()?.prepare(entries)
    }

    async fn claim(&self, t: &mut InTransaction<'_, '_>) -> Result<Vec<bool>, RecordError> {
        let statement = t.statements.get(t.tx, &self.select).await?;
        let row = t.tx.query_opt(&statement, &[&self.file]).await?;
        let committed: i64 = row.map_or(0, |r| r.get(0));
        let mut fresh: Vec<bool> = t
            .entries
            .iter()
            .map(|e| position(e.meta) > committed)
            .collect();
        if let Some(ledger) = &self.ledger {
            let new = ledger.claim(t).await?;
            fresh.iter_mut().zip(new).for_each(|(f, n)| *f &= n);
        }
        Ok(fresh)
    }

    async fn seal(&self, t: &mut InTransaction<'_, '_>) -> Result<(), RecordError> {
        let here = t.entries.iter().map(|e| position(e.meta));
        let furthest = here.chain(t.committed.iter().map(|m| position(m))).max();
        let before_pending = t.pending.iter().map(|m| position(m) - 1).min();
        let Some(at) = furthest.map(|f| before_pending.map_or(f, |p| f.min(p))) else {
            return Ok(());
        };
        if at <= 0 {
            return Ok(());
        }
        // The first message this transaction loads: the committed position must still be before it.
        let first_loaded = t
            .entries
            .iter()
            .zip(t.fresh)
            .filter(|(_, fresh)| **fresh)
            .map(|(e, _)| position(e.meta))
            .min()
            .unwrap_or(i64::MAX);
        let statement = t.statements.get(t.tx, &self.upsert).await?;
        let written =
            t.tx.query_opt(&statement, &[&self.file, &at, &first_loaded])
                .await?;
        match written {
            Some(_) => Ok(()),
            None => Err(RecordError::Outdated(Box::new(Overtaken {
                file: self.file.clone(),
                first_loaded,
            }))),
        }
    }

    fn ordered(&self) -> bool {
        true
    }

    /// With the ledger, the claim inserts the lines' keys, which another run of the same file may
    /// be inserting too.
    fn claim_in_turn(&self) -> bool {
        self.ledger.is_some()
    }
}
