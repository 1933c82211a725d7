//! A source that replays messages already in memory. It exists to measure the pipeline without any
//! source's own cost (benchmarks) and to drive it from tests, which may give it an acknowledger and a
//! commit record of their own.

use std::sync::Arc;

use async_trait::async_trait;

use crate::envelope::{Chunk, Envelope};
use crate::shutdown::Shutdown;
use crate::sink::commit_record::{CommitRecord, NoCommitRecord};
use crate::source::{Acknowledger, BuiltSource, Delivery, NoAcknowledger, Source, SourceError};
use crate::stats::Stats;

pub struct MemorySource {
    messages: Vec<Envelope>,
    chunk_messages: usize,
    stats: Arc<Stats>,
}

impl MemorySource {
    /// Acknowledges nothing and commits no record.
    pub fn build(messages: Vec<Envelope>, chunk_messages: usize, stats: Arc<Stats>) -> BuiltSource {
        MemorySource::build_with(
            messages,
            chunk_messages,
            stats,
            Arc::new(NoAcknowledger),
            Arc::new(NoCommitRecord),
        )
    }

    /// With an acknowledger and a commit record of the caller's (tests of the delivery rules).
    pub fn build_with(
        messages: Vec<Envelope>,
        chunk_messages: usize,
        stats: Arc<Stats>,
        acknowledger: Arc<dyn Acknowledger>,
        commit_record: Arc<dyn CommitRecord>,
    ) -> BuiltSource {
        BuiltSource {
            source: Box::new(MemorySource {
                messages,
                chunk_messages: chunk_messages.max(1),
                stats,
            }),
            acknowledger,
            commit_record,
            chunk_messages: chunk_messages.max(1),
            receive_allowance: std::time::Duration::ZERO,
            background: Vec::new(),
        }
    }
}

#[async_trait]
impl Source for MemorySource {
    async fn run(self: Box<Self>, out: Delivery, shutdown: Shutdown) -> Result<(), SourceError> {
        let mut messages = self.messages.into_iter().peekable();
        while messages.peek().is_some() {
            let chunk = Chunk::new(messages.by_ref().take(self.chunk_messages).collect());
            let n = chunk.len();
            tokio::select! {
                sent = out.send(chunk) => if sent.is_err() { break },
                _ = shutdown.requested() => break,
            }
            self.stats.record_received(n);
        }
        Ok(())
    }
}
