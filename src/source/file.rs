//! The file source, for backfills and replays: every message of an NDJSON or JSON-array file (gzip
//! or not, `-` for standard input) goes through the same stages as live traffic. It acknowledges
//! nothing and ends by itself at the end of the file, which ends the run.
//!
//! Reading is blocking I/O, so it runs on a blocking thread and hands chunks to the async pipeline
//! with `blocking_send`: when the pipeline is full, the reader simply waits.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::envelope::{Chunk, Envelope, Meta, Reject, Stage};
use crate::message_file::{self, FileMessage, MessageReader};
use crate::shutdown::Shutdown;
use crate::source::{BuiltSource, NoAcknowledger, Source, SourceError};
use crate::stats::Stats;

pub struct FileSource {
    path: PathBuf,
    file: MessageReader,
    chunk_messages: usize,
    stats: Arc<Stats>,
}

impl FileSource {
    /// Opens the file, so that a missing or unreadable one fails before the run starts.
    pub fn build(
        path: PathBuf,
        chunk_messages: usize,
        stats: Arc<Stats>,
    ) -> Result<BuiltSource, SourceError> {
        let file = MessageReader::open(&path).map_err(|e| SourceError::Input {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(BuiltSource {
            source: Box::new(FileSource {
                path,
                file,
                chunk_messages: chunk_messages.max(1),
                stats,
            }),
            acknowledger: Arc::new(NoAcknowledger),
            chunk_messages: chunk_messages.max(1),
            receive_allowance: std::time::Duration::ZERO,
        })
    }
}

#[async_trait]
impl Source for FileSource {
    async fn run(
        self: Box<Self>,
        out: mpsc::Sender<Chunk<Envelope>>,
        shutdown: Shutdown,
    ) -> Result<(), SourceError> {
        let this = *self;
        let name = this.path.display().to_string();
        tokio::task::spawn_blocking(move || this.read(out, shutdown))
            .await
            .map_err(|e| SourceError::Fatal(format!("file reader stopped: {e}")))?
            .map_err(|e| SourceError::Input {
                path: name,
                message: e.to_string(),
            })
    }
}

impl FileSource {
    fn read(
        self,
        out: mpsc::Sender<Chunk<Envelope>>,
        shutdown: Shutdown,
    ) -> Result<(), message_file::MessageFileError> {
        let FileSource {
            file,
            chunk_messages,
            stats,
            ..
        } = self;
        let mut chunk = Chunk::new(Vec::with_capacity(chunk_messages));
        let mut received_at = SystemTime::now();
        let send = |chunk: Chunk<Envelope>| -> ControlFlow<()> {
            stats.record_received(chunk.len());
            if shutdown.is_requested() || out.blocking_send(chunk).is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let mut stopped = false;
        file.for_each(|message| {
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
            let _ = send(chunk);
        }
        Ok(())
    }
}

fn push(chunk: &mut Chunk<Envelope>, message: FileMessage, received_at: SystemTime) {
    let meta = Meta::at_position(message.position, received_at);
    match message.body {
        Ok(body) => chunk.items.push(Envelope { body, meta }),
        Err(bytes) => chunk.rejects.push(Reject {
            body: String::from_utf8_lossy(&bytes).into_owned(),
            meta,
            stage: Stage::Source,
            reason: "body is not valid UTF-8".into(),
        }),
    }
}
