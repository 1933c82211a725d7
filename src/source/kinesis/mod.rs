//! The Kinesis Data Streams source's own parts: reading shards within the service's limits, leasing
//! them among replicas through PostgreSQL, and checkpointing them in the sink's transaction.
//!
//! - [`api`]: the three API calls sluice makes, as a trait (the SDK client implements it; tests fake it).
//! - [`shards`]: paginated shard discovery and the parent/child order resharding imposes.
//! - [`reader`]: one shard's `GetRecords` loop: pacing, backoff, iterator renewal, shard end.
//! - [`kpl`]: de-aggregation of KPL records into user records.
//! - [`lease`] and [`balance`]: who reads which shard, with expiry by the database's clock.
//! - [`keeper`]: the task that renews this process's leases and takes its share, as events.
//! - [`checkpoint`] and [`progress`]: what a committed batch writes per shard, fenced by the lease.
//! - [`position`] and [`sequence`]: where a shard's reading starts; sequence numbers as numbers.
//! - [`record`]: the checkpoints as the commit record the sink writes in each batch's transaction.
//! - [`source`]: all of it wired into the pipeline's [`crate::source::Source`].
//! - [`metrics`]: leases held, per-shard lag, checkpoint commits, fenced-off commits.

pub mod api;
pub mod balance;
pub mod checkpoint;
#[cfg(test)]
mod fake;
pub mod keeper;
pub mod kpl;
pub mod lease;
pub mod metrics;
pub mod position;
pub mod progress;
pub mod reader;
pub mod record;
pub mod sequence;
pub mod shards;
pub mod source;

pub use progress::KinesisAck;
pub use source::{KinesisAcknowledger, KinesisSource, KinesisSourceError};
