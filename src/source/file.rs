//! The file source, for backfills and replays: every message of an NDJSON or JSON-array file (gzip
//! or not, `-` for standard input) goes through the same stages as live traffic. It acknowledges
//! nothing and ends by itself at the end of the file, which ends the run.
//!
//! Reading is blocking I/O, so it runs on a blocking thread and hands chunks to the async pipeline
//! with `blocking_send`: when the pipeline is full, the reader simply waits.
//!
//! With dedupe on, a message's ledger key is its file's identity, its position and its content
//! ([`FileLedgerKeys`]): running the same file again skips what it loaded, while another file, or a
//! line that was corrected since, loads. (Positions alone would make the first lines of any other
//! file look like duplicates.)

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::envelope::{Chunk, Envelope, MessageId, Meta, Reject, Stage};
use crate::message_file::{self, FileMessage, MessageReader};
use crate::pg::Connector;
use crate::shutdown::Shutdown;
use crate::sink::commit_record::{CommitRecord, NoCommitRecord, Outcome};
use crate::sink::ledger::{LedgerKey, LedgerKeys, LedgerRecord, MessageKeys};
use crate::source::file_position::{self, FilePositions};
use crate::source::{BuiltSource, Delivery, NoAcknowledger, Source, SourceError};
use crate::stats::Stats;
use crate::table_name::TableName;

pub struct FileSource {
    file: MessageReader,
    chunk_messages: usize,
    /// Messages at or before this position were committed by an earlier run: skipped unread.
    resume_after: u64,
    stats: Arc<Stats>,
}

/// What a file source is built from.
pub struct FileSettings {
    pub path: PathBuf,
    pub chunk_messages: usize,
    pub max_message_bytes: usize,
    /// With dedupe on, the ledger table.
    pub ledger: Option<TableName>,
    /// Where the positions are kept (beside the ledger table), and how to reach it.
    pub positions: TableName,
    pub connector: Connector,
}

impl FileSource {
    /// Opens the file, so that a missing or unreadable one fails before the run starts, and reads
    /// how far an earlier run of the same file committed. Each batch records its position (and,
    /// with a ledger, its messages' keys, scoped to this file).
    pub async fn build(
        settings: FileSettings,
        stats: Arc<Stats>,
    ) -> Result<BuiltSource, SourceError> {
        let FileSettings {
            path,
            chunk_messages,
            max_message_bytes,
            ledger,
            positions,
            connector,
        } = settings;
        let file = MessageReader::open(&path)?.limit(max_message_bytes);
        let ledger: Option<Box<dyn CommitRecord>> = ledger.map(|table| {
            let keys = FileLedgerKeys::new(FileIdentity::of(&path));
            Box::new(LedgerRecord::new(&table, Arc::new(keys))) as Box<dyn CommitRecord>
        });
        let (commit_record, resume_after): (Arc<dyn CommitRecord>, u64) =
            match file_position::identity_of(&path) {
                Some(identity) => {
                    let record = FilePositions::new(&positions, identity, ledger);
                    let committed = record.committed(&connector, &positions).await?;
                    if committed > 0 {
                        tracing::info!(
                            path = %path.display(),
                            position = committed,
                            "resuming the file after what an earlier run committed"
                        );
                    }
                    (Arc::new(record), committed)
                }
                None => match ledger {
                    Some(ledger) => (Arc::from(ledger), 0),
                    None => (Arc::new(NoCommitRecord), 0),
                },
            };
        Ok(BuiltSource {
            source: Box::new(FileSource {
                file,
                chunk_messages: chunk_messages.max(1),
                resume_after,
                stats,
            }),
            acknowledger: Arc::new(NoAcknowledger),
            commit_record,
            chunk_messages: chunk_messages.max(1),
            receive_allowance: std::time::Duration::ZERO,
            background: Vec::new(),
        })
    }
}

/// Which file messages come from: what scopes their ledger keys (and, for resumable loads, what a
/// committed position would be recorded against).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileIdentity {
    /// A file, by its canonical path (links resolved), or its absolute path if it cannot be
    /// resolved (it is then unreadable anyway).
    Path(PathBuf),
    /// Standard input: no identity beyond its content.
    StandardInput,
}

impl FileIdentity {
    pub fn of(path: &Path) -> FileIdentity {
        if path.as_os_str() == "-" {
            return FileIdentity::StandardInput;
        }
        FileIdentity::Path(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()))
    }
}

/// Ledger keys of a file's messages: the file, the position and the content, for rows and dead
/// letters alike.
pub struct FileLedgerKeys {
    scope: Vec<u8>,
}

impl FileLedgerKeys {
    pub fn new(identity: FileIdentity) -> FileLedgerKeys {
        let scope = match identity {
            FileIdentity::Path(path) => path.into_os_string().into_encoded_bytes(),
            FileIdentity::StandardInput => b"-".to_vec(),
        };
        FileLedgerKeys { scope }
    }
}

impl LedgerKeys for FileLedgerKeys {
    fn keys(&self, meta: &Meta, body: &str, _outcome: Outcome) -> MessageKeys {
        let position = match &meta.message_id {
            MessageId::Position(n) => n.to_be_bytes().to_vec(),
            MessageId::Text(id) => id.as_bytes().to_vec(),
        };
        MessageKeys::only(LedgerKey::of(&[
            b"file",
            &self.scope,
            &position,
            body.as_bytes(),
        ]))
    }
}

#[async_trait]
impl Source for FileSource {
    async fn run(self: Box<Self>, out: Delivery, shutdown: Shutdown) -> Result<(), SourceError> {
        let this = *self;
        tokio::task::spawn_blocking(move || this.read(out, shutdown))
            .await
            .map_err(SourceError::FileReader)??;
        Ok(())
    }
}

impl FileSource {
    fn read(self, out: Delivery, shutdown: Shutdown) -> Result<(), message_file::MessageFileError> {
        let FileSource {
            file,
            chunk_messages,
            resume_after,
            stats,
        } = self;
        let mut chunk = Chunk::new(Vec::with_capacity(chunk_messages));
        let mut received_at = SystemTime::now();
        // A stop drops the chunk in hand uncounted: it was never received, and its position is not
        // committed, so the next run reads it again.
        let send = |chunk: Chunk<Envelope>| -> ControlFlow<()> {
            if shutdown.is_requested() {
                return ControlFlow::Break(());
            }
            let n = chunk.len();
            if out.blocking_send(chunk).is_err() {
                return ControlFlow::Break(());
            }
            stats.record_received(n);
            ControlFlow::Continue(())
        };
        let mut stopped = false;
        file.for_each(|message| {
            if message.position <= resume_after {
                return ControlFlow::Continue(());
            }
            push(&mut chunk, message, received_at);
            if chunk.len() < chunk_messages {
                return ControlFlow::Continue(());
            }
            let full =
                std::mem::replace(&mut chunk, Chunk::new(Vec::with_capacity(chunk_messages)));
            received_at = SystemTime::now();
            let flow = send(full);
            stopped = flow.is_break();
            flow
        })?;
        if !stopped && !chunk.is_empty() {
            stopped = send(chunk).is_break();
        }
        if stopped {
            stats.record_stopped_before_end();
        }
        Ok(())
    }
}

fn push(chunk: &mut Chunk<Envelope>, message: FileMessage, received_at: SystemTime) {
    let meta = Meta::at_position(message.position, received_at);
    match message.body {
        Ok(body) => chunk.items.push(Envelope { body, meta }),
        Err(bad) => chunk.rejects.push(Reject {
            body: String::from_utf8_lossy(bad.kept_bytes()).into_owned(),
            meta,
            stage: Stage::Source,
            reason: bad.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_files_positions_and_contents_apart() {
        let a = FileLedgerKeys::new(FileIdentity::Path("/data/a.ndjson".into()));
        let b = FileLedgerKeys::new(FileIdentity::Path("/data/b.ndjson".into()));
        let at = |n| Meta::at_position(n, SystemTime::now());
        let key = |keys: &FileLedgerKeys, n, body| keys.keys(&at(n), body, Outcome::Row).key;
        assert_eq!(
            key(&a, 1, "{}"),
            key(&a, 1, "{}"),
            "the same line of the same file"
        );
        assert_ne!(key(&a, 1, "{}"), key(&b, 1, "{}"), "another file");
        assert_ne!(key(&a, 1, "{}"), key(&a, 2, "{}"), "another line");
        assert_ne!(key(&a, 1, "{}"), key(&a, 1, "{ }"), "a corrected line");
        assert_eq!(
            key(&a, 1, "x"),
            a.keys(&at(1), "x", Outcome::DeadLetter).key,
            "a dead letter's redelivery is recognised"
        );
    }
}
