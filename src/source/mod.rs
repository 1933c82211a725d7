//! Sources deliver message chunks into the pipeline and acknowledge them once committed.
//!
//! A source is two halves with separate lifetimes: the [`Source`] receives until it is exhausted or
//! told to stop, while its [`Acknowledger`] must live on until every message it handed out has been
//! committed and acknowledged (or released), which is after the receiving half has already stopped.

pub mod file;
pub mod file_position;
pub mod kinesis;
pub mod memory;
pub mod sqs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::aws::{AwsError, QueueError};
use crate::background::BackgroundTask;
use crate::config::{Config, SourceKind};
use crate::envelope::{AckToken, Chunk, Envelope};
use crate::message_file::MessageFileError;
use crate::shutdown::Shutdown;
use crate::sink::commit_record::CommitRecord;
use crate::stats::Stats;

use crate::pg::Connector;
use file::{FileSettings, FileSource};
use file_position::{FilePositions, PositionError};
use sqs::SqsSource;

/// Errors that stop a source for good; transient trouble is retried inside the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("receiving from SQS queue {queue_url}")]
    Receive {
        queue_url: String,
        #[source]
        source: AwsError,
    },
    #[error("an SQS poller stopped")]
    Poller(#[source] tokio::task::JoinError),
    #[error(transparent)]
    File(#[from] MessageFileError),
    #[error("the file reader stopped")]
    FileReader(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Kinesis(#[from] kinesis::KinesisSourceError),
    #[error(transparent)]
    FilePosition(#[from] PositionError),
}

/// Where a source delivers its chunks: the channel into the parse stage.
pub type Delivery = mpsc::Sender<Chunk<Envelope>>;

/// The receiving half of a source.
#[async_trait]
pub trait Source: Send {
    /// Delivers chunks until the source is exhausted or `shutdown` fires. Returning closes `out`,
    /// which is how the stages downstream learn to drain and stop.
    async fn run(self: Box<Self>, out: Delivery, shutdown: Shutdown) -> Result<(), SourceError>;
}

/// The acknowledging half of a source.
#[async_trait]
pub trait Acknowledger: Send + Sync {
    /// Called with every message of a committed batch (rows, dead letters and duplicates alike).
    async fn acknowledge(&self, tokens: Vec<AckToken>);

    /// Stops background work and hands back to the source whatever is still unacknowledged, so
    /// another consumer gets it at once. Returns how many messages were released.
    async fn finish(&self) -> usize {
        0
    }
}

/// For sources with nothing to acknowledge (files, in-memory data).
pub struct NoAcknowledger;

#[async_trait]
impl Acknowledger for NoAcknowledger {
    async fn acknowledge(&self, _tokens: Vec<AckToken>) {}
}

/// Both halves of a built source, and what its batches commit for it.
pub struct BuiltSource {
    pub source: Box<dyn Source>,
    pub acknowledger: Arc<dyn Acknowledger>,
    /// What every batch of this source writes in its transaction (ledger keys, positions).
    pub commit_record: Arc<dyn CommitRecord>,
    /// The most messages one chunk from this source holds, to size the channels in messages.
    pub chunk_messages: usize,
    /// How long receives in progress may take to return when a stop lets them finish (an idle
    /// exit): added to the drain timeout then, since that wait is not part of draining.
    pub receive_allowance: Duration,
    /// Work the source needs done while the run lasts (extending SQS visibility), supervised by
    /// the pipeline and stopped before the acknowledger finishes.
    pub background: Vec<BackgroundTask>,
}

/// Builds the configured source; with dedupe on, its batches record their keys in the ledger.
pub async fn build_source(config: &Config, stats: Arc<Stats>) -> Result<BuiltSource, SourceError> {
    let ledger = config.dedupe_enabled().then(|| config.tables().ledger);
    match config.source.kind {
        SourceKind::Sqs => {
            let limit = config.source.max_message_bytes;
            SqsSource::build(&config.source.sqs, limit, ledger.as_ref(), stats).await
        }
        SourceKind::Kinesis => kinesis::KinesisSource::build(config, stats).await,
        SourceKind::File => {
            let settings = FileSettings {
                path: file_path(config),
                chunk_messages: config.source.file.chunk_messages,
                max_message_bytes: config.source.max_message_bytes,
                ledger,
                positions: FilePositions::table_beside(&config.sink.postgres.ledger_table),
                connector: Connector::from_config(&config.sink.postgres),
            };
            FileSource::build(settings, stats).await
        }
    }
}

/// `source.file.path`, already absolute (or `-`, standard input); validation guarantees it is set.
pub fn file_path(config: &Config) -> PathBuf {
    config.source.file.path.clone().unwrap_or_default()
}
