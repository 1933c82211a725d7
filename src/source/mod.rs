//! Sources deliver message chunks into the pipeline and acknowledge them once committed.
//!
//! A source is two halves with separate lifetimes: the [`Source`] receives until it is exhausted or
//! told to stop, while its [`Acknowledger`] must live on until every message it handed out has been
//! committed and acknowledged (or released), which is after the receiving half has already stopped.

pub mod file;
pub mod kinesis;
pub mod memory;
pub mod sqs;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::envelope::{AckToken, Chunk, Envelope};
use crate::shutdown::Shutdown;

/// Errors that stop a source for good; transient trouble is retried inside the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Fatal(String),
    #[error("cannot read {path}: {message}")]
    Input { path: String, message: String },
}

/// The receiving half of a source.
#[async_trait]
pub trait Source: Send {
    /// Delivers chunks until the source is exhausted or `shutdown` fires. Returning closes `out`,
    /// which is how the stages downstream learn to drain and stop.
    async fn run(
        self: Box<Self>,
        out: mpsc::Sender<Chunk<Envelope>>,
        shutdown: Shutdown,
    ) -> Result<(), SourceError>;
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

/// Both halves of a built source.
pub struct BuiltSource {
    pub source: Box<dyn Source>,
    pub acknowledger: Arc<dyn Acknowledger>,
    /// The most messages one chunk from this source holds, to size the channels in messages.
    pub chunk_messages: usize,
    /// How long receives in progress may take to return when a stop lets them finish (an idle
    /// exit): added to the drain timeout then, since that wait is not part of draining.
    pub receive_allowance: Duration,
}
