//! The lease keeper: one task per process that holds its share of the stream's shards.
//!
//! Every `interval` it renews what it holds, registers the shards discovery found, and takes its
//! share of the readable ones ([`Leases::acquire`]). It reports each change as a [`LeaseEvent`] so
//! that the source starts a reader for a lease acquired and stops the reader of a lease lost. A
//! lease is lost when another process took it over, or when its shard was finished (a finished shard
//! is no longer renewed): either way its reader has nothing left to do.
//!
//! Timing: a lease lives `lease_duration` from its last renewal, and the keeper renews every
//! `interval`, which must be well below the duration (a third of it leaves room for two slow
//! renewals). A process that dies stops renewing; its leases expire `lease_duration` after the last
//! renewal and another process's keeper takes them at its next round, so they move within
//! `lease_duration + interval`. On stop the keeper hands its leases back at once.
//!
//! The keeper has a database connection of its own. If PostgreSQL is unreachable it keeps trying;
//! its leases may expire meanwhile, and then the fenced checkpoint is what keeps two readers of one
//! shard from both committing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use super::lease::{LeaseClaim, LeaseError, Leases, TakenLease};
use super::shards::ShardGraph;
use crate::shutdown::Shutdown;

/// A change in what this process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Start reading this shard (from the lease's start position).
    Acquired(TakenLease),
    /// Stop reading this shard: its lease moved to another process, or its shard is finished.
    Lost(LeaseClaim),
}

/// How to reach the lease table.
#[derive(Debug, Clone)]
pub struct KeeperSettings {
    /// The sink's connection settings (URL, TLS, timeout).
    pub connector: crate::pg::Connector,
    /// How often to renew and rebalance; well below the lease duration.
    pub interval: Duration,
}

pub struct LeaseKeeper {
    leases: Leases,
    settings: KeeperSettings,
    client: Option<Client>,
    held: Vec<LeaseClaim>,
    registered: Option<Arc<ShardGraph>>,
}

impl LeaseKeeper {
    pub fn new(leases: Leases, settings: KeeperSettings) -> LeaseKeeper {
        LeaseKeeper {
            leases,
            settings,
            client: None,
            held: Vec::new(),
            registered: None,
        }
    }

    /// Runs rounds until `stop`, then releases what it holds. Ends early only if nobody listens to
    /// `events` any more.
    pub async fn run(
        mut self,
        graph: watch::Receiver<Arc<ShardGraph>>,
        events: mpsc::Sender<LeaseEvent>,
        stop: Shutdown,
    ) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.requested() => break,
            }
            let latest = graph.borrow().clone();
            match self.round(&latest).await {
                Ok(changes) => {
                    for event in changes {
                        if events.send(event).await.is_err() {
                            return self.release().await;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease round failed; retrying at the next one");
                    self.client = None;
                }
            }
        }
        self.release().await;
    }

    /// One round: renew, register new shards, take this process's share.
    async fn round(&mut self, graph: &Arc<ShardGraph>) -> Result<Vec<LeaseEvent>, LeaseError> {
        let client = connection(&mut self.client, &self.settings).await?;
        let renewed = self.leases.renew(client, &self.held).await?;
        let kept: HashSet<(&str, i64)> = renewed
            .iter()
            .map(|c| (c.shard_id.as_str(), c.epoch))
            .collect();
        let mut events: Vec<LeaseEvent> = self
            .held
            .iter()
            .filter(|c| !kept.contains(&(c.shard_id.as_str(), c.epoch)))
            .map(|c| LeaseEvent::Lost(c.clone()))
            .collect();
        if self.registered.as_ref() != Some(graph) {
            let shards: Vec<_> = graph.shards().cloned().collect();
            self.leases.register(client, &shards).await?;
        }
        let finished = self.leases.finished_shards(client).await?;
        let readable = graph.readable(&finished);
        let taken = self.leases.acquire(client, &readable).await?;
        self.registered = Some(graph.clone());
        self.held = renewed;
        self.held.extend(taken.iter().map(|t| t.claim.clone()));
        events.extend(taken.into_iter().map(LeaseEvent::Acquired));
        Ok(events)
    }

    async fn release(mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let released = match connection(&mut self.client, &self.settings).await {
            Ok(client) => self.leases.release(client, &held).await,
            Err(e) => Err(e),
        };
        match released {
            Ok(n) => tracing::info!(leases = n, "leases handed back"),
            Err(e) => {
                tracing::warn!(error = %e, "could not hand leases back; they expire on their own")
            }
        }
    }
}

/// The keeper's connection, opened again if it was never opened or has closed.
async fn connection<'a>(
    slot: &'a mut Option<Client>,
    settings: &KeeperSettings,
) -> Result<&'a Client, LeaseError> {
    let client = match slot.take().filter(|c| !c.is_closed()) {
        Some(client) => client,
        None => settings.connector.connect("sluice kinesis leases").await?,
    };
    Ok(slot.insert(client))
}
