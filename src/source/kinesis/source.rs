//! The Kinesis source as the pipeline sees it: the parts of this module wired into one running
//! [`Source`].
//!
//! Three kinds of task run under it. Shard discovery lists the stream periodically and publishes its
//! shard graph. The lease keeper renews what this process holds, takes its share of the readable
//! shards (children only once their parents are finished) and reports each lease acquired or lost.
//! And one reader per held shard feeds its pages, in order, into the pipeline's bounded channel, so
//! a stalled sink holds every reader at `send`. A lost lease stops that shard's reader; whatever it
//! had already delivered is fenced off at commit and dropped unloaded. Any of these tasks failing
//! for good ends the run (the pipeline then drains as on a signal).
//!
//! On stop the readers end at once (a page in hand is simply not delivered) but the keeper, a
//! background task of the pipeline's, goes on renewing while the pipeline drains, so the batches
//! still in the pipeline commit under their leases. The pipeline stops it once the stages are done,
//! and it hands every lease back at once: another replica need not wait for them to expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_postgres::Client;

use super::api::{KinesisApi, KinesisError, StreamRef, sdk_client};
use super::checkpoint::{self, CheckpointError};
use super::keeper::{KeeperSettings, LeaseEvent, LeaseKeeper};
use super::lease::{LeaseClaim, LeaseError, LeaseScope, Leases, TakenLease, lease_ddl, owner_id};
use super::metrics::KinesisStats;
use super::position::InitialPosition;
use super::reader::{ReadEnd, ReadError, ReaderSettings, ShardProgress, ShardReader};
use super::record::{self, ShardCheckpoints};
use super::sequence::SequenceNumber;
use super::shards::{ShardGraph, list_shards, watch_shards};
use crate::background::{BackgroundError, BackgroundTask};
use crate::config::{Config, KinesisConfig, KinesisStartPosition};
use crate::envelope::AckToken;
use crate::pg::{ConnectError, Connector};
use crate::shutdown::Shutdown;
use crate::source::{Acknowledger, BuiltSource, Delivery, Source, SourceError};
use crate::stats::Stats;

/// How often the stream's shards are listed while running (new shards after a reshard).
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);
/// How often a shard whose end came on an empty page checks that its last records are committed.
const FINISH_POLL: Duration = Duration::from_millis(250);
/// How often per-shard figures are copied into the metrics.
const METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// Why the Kinesis source stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum KinesisSourceError {
    #[error("Kinesis stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: KinesisError,
    },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("shard lease table")]
    Lease(#[from] LeaseError),
    #[error("finishing a shard read to its end")]
    Finish(#[source] CheckpointError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the Kinesis {0} task stopped abnormally")]
    Task(&'static str, #[source] tokio::task::JoinError),
    #[error("the shard lease keeper stopped")]
    KeeperStopped,
    #[error("shard discovery stopped")]
    DiscoveryStopped,
    #[error(
        "the lease and checkpoint table {table} is missing: run `sluice migrate` (or set `sink.postgres.create_tables = true`)"
    )]
    MissingTable { table: String },
}

/// What the pipeline needs to build the lease table and reach it.
fn scope(config: &Config) -> LeaseScope {
    let kinesis = &config.source.kinesis;
    LeaseScope {
        table: kinesis.lease_table.clone(),
        application: kinesis.application.clone(),
        stream: stream_ref(kinesis).name().to_owned(),
    }
}

/// The configured stream (validation guarantees one of the two is set).
pub fn stream_ref(kinesis: &KinesisConfig) -> StreamRef {
    match (&kinesis.stream_arn, &kinesis.stream_name) {
        (Some(arn), _) => StreamRef::Arn(arn.clone()),
        (None, name) => StreamRef::Name(name.clone().unwrap_or_default()),
    }
}

/// A client of the configured stream.
pub async fn client(kinesis: &KinesisConfig) -> Arc<dyn KinesisApi> {
    Arc::new(sdk_client(kinesis.region.as_deref(), kinesis.endpoint_url.as_deref()).await)
}

/// Creates the lease and checkpoint table if it is missing (`migrate`, and `run` with
/// `create_tables`). Returns whether it was created.
pub async fn create_lease_table(client: &Client, config: &Config) -> Result<bool, LeaseError> {
    let table = &config.source.kinesis.lease_table;
    let existed = lease_table_exists(client, config).await?;
    for statement in lease_ddl(table) {
        match client.batch_execute(&statement).await {
            Ok(()) => {}
            // Replicas starting together race on `IF NOT EXISTS`: the loser's insert into the
            // catalog fails although the table is there.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                if !lease_table_exists(client, config).await? {
                    return Err(e.into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(!existed)
}

/// Whether the lease and checkpoint table exists.
pub async fn lease_table_exists(client: &Client, config: &Config) -> Result<bool, LeaseError> {
    let table = config.source.kinesis.lease_table.to_string();
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?;
    Ok(row.get(0))
}

/// The configured lease view of this process.
pub fn leases(config: &Config, owner: &str) -> Leases {
    let duration = Duration::from_secs(config.source.kinesis.lease_duration_seconds);
    Leases::new(scope(config), owner, duration)
}

fn initial_position(kinesis: &KinesisConfig) -> InitialPosition {
    match kinesis.start_position {
        KinesisStartPosition::TrimHorizon => InitialPosition::TrimHorizon,
        KinesisStartPosition::Latest => InitialPosition::Latest,
        KinesisStartPosition::AtTimestamp => InitialPosition::AtTimestamp {
            millis: kinesis.at_timestamp_millis().unwrap_or_default(),
        },
    }
}

pub struct KinesisSource {
    api: Arc<dyn KinesisApi>,
    stream: StreamRef,
    /// Shard discovery publishes here, the keeper reads it; taken when the source runs.
    graph: Option<watch::Sender<Arc<ShardGraph>>>,
    /// What the keeper reports; taken when the source runs.
    events: Option<mpsc::Receiver<LeaseEvent>>,
    reader: ReaderSettings,
    initial: InitialPosition,
    connector: Connector,
    stats: Arc<Stats>,
    kinesis: Arc<KinesisStats>,
    lease_duration: Duration,
}

impl KinesisSource {
    /// Lists the stream (a missing stream or bad credentials fail here, at start) and makes sure
    /// the lease table is there.
    pub async fn build(config: &Config, stats: Arc<Stats>) -> Result<BuiltSource, SourceError> {
        let kinesis = &config.source.kinesis;
        let stream = stream_ref(kinesis);
        let api = client(kinesis).await;
        let graph = list_shards(api.as_ref(), &stream).await.map_err(|source| {
            KinesisSourceError::Stream {
                stream: stream.name().to_owned(),
                source,
            }
        })?;
        let connector = Connector::from_config(&config.sink.postgres);
        let db = connector
            .connect("sluice kinesis")
            .await
            .map_err(KinesisSourceError::from)?;
        if config.sink.postgres.create_tables {
            if create_lease_table(&db, config)
                .await
                .map_err(KinesisSourceError::from)?
            {
                tracing::info!(table = %kinesis.lease_table, "created missing table");
            }
        } else if !lease_table_exists(&db, config)
            .await
            .map_err(KinesisSourceError::from)?
        {
            return Err(KinesisSourceError::MissingTable {
                table: kinesis.lease_table.to_string(),
            }
            .into());
        }
        let owner = owner_id();
        let duration = Duration::from_secs(kinesis.lease_duration_seconds);
        let kinesis_stats = stats.kinesis.get_or_init(Arc::default).clone();
        tracing::info!(
            stream = stream.name(),
            shards = graph.len(),
            open = graph.open_count(),
            owner,
            "Kinesis source ready"
        );
        let (graph_tx, graph_rx) = watch::channel(Arc::new(graph));
        let (events_tx, events) = mpsc::channel(64);
        let keeper = LeaseKeeper::new(
            leases(config, &owner),
            KeeperSettings {
                connector: connector.clone(),
                interval: duration / 3,
            },
        );
        let max_records = kinesis.max_records_per_call;
        Ok(BuiltSource {
            source: Box::new(KinesisSource {
                api,
                stream,
                graph: Some(graph_tx),
                events: Some(events),
                reader: ReaderSettings {
                    max_records_per_call: max_records,
                    idle_poll_interval: Duration::from_millis(kinesis.poll_interval_ms),
                    max_message_bytes: config.source.max_message_bytes,
                },
                initial: initial_position(kinesis),
                connector,
                stats,
                kinesis: kinesis_stats.clone(),
                lease_duration: duration,
            }),
            acknowledger: Arc::new(KinesisAcknowledger {
                stats: kinesis_stats.clone(),
            }),
            commit_record: Arc::new(ShardCheckpoints::new(kinesis_stats)),
            // A chunk is one GetRecords page (KPL aggregates can make it larger; the channel
            // bound is in chunks, so that only makes a chunk heavier).
            chunk_messages: (max_records as usize).clamp(1, 10_000),
            receive_allowance: Duration::ZERO,
            background: vec![keeper_task(keeper, graph_rx, events_tx)],
        })
    }
}

/// A reader running for a held shard.
struct Running {
    epoch: i64,
    stop: Shutdown,
    progress: Arc<ShardProgress>,
}

/// How a shard's task ended: which shard, at which epoch, and why.
type ShardEnd = (String, i64, Result<(), KinesisSourceError>);

#[async_trait]
impl Source for KinesisSource {
    async fn run(self: Box<Self>, out: Delivery, shutdown: Shutdown) -> Result<(), SourceError> {
        let mut this = *self;
        let (Some(graph), Some(mut events)) = (this.graph.take(), this.events.take()) else {
            return Err(KinesisSourceError::KeeperStopped.into());
        };
        let discovery_stop = Shutdown::new();
        let mut discovery = tokio::spawn(watch_shards(
            this.api.clone(),
            this.stream.clone(),
            DISCOVERY_INTERVAL,
            graph,
            discovery_stop.clone(),
        ));
        let mut shards = Shards {
            source: &this,
            out: &out,
            running: HashMap::new(),
            tasks: JoinSet::new(),
        };
        let mut tick = tokio::time::interval(METRICS_INTERVAL);
        // Catching up until the keeper hands over a first shard (whose reader then catches up on
        // its own), or for one lease duration if other processes hold every shard.
        let mut starting = Some(this.stats.catching_up());
        let start_wait = tokio::time::sleep(this.lease_duration);
        tokio::pin!(start_wait);
        let outcome: Result<(), KinesisSourceError> = loop {
            tokio::select! {
                _ = shutdown.requested() => break Ok(()),
                _ = &mut start_wait, if starting.is_some() => starting = None,
                event = events.recv() => match event {
                    Some(LeaseEvent::Acquired(taken)) => {
                        shards.start(taken);
                        starting = None;
                    }
                    Some(LeaseEvent::Lost(claim)) => shards.stop(&claim),
                    None => break Err(KinesisSourceError::KeeperStopped),
                },
                listed = &mut discovery => break match listed {
                    Ok(Ok(())) => Err(KinesisSourceError::DiscoveryStopped),
                    Ok(Err(source)) => Err(KinesisSourceError::Stream {
                        stream: this.stream.name().to_owned(),
                        source,
                    }),
                    Err(e) => Err(KinesisSourceError::Task("shard discovery", e)),
                },
                Some(joined) = shards.tasks.join_next(), if !shards.tasks.is_empty() => {
                    if let Err(e) = shards.ended(joined) {
                        break Err(e);
                    }
                }
                _ = tick.tick() => shards.publish_metrics(),
            }
        };
        shards.stop_all().await;
        drop(shards);
        drop(out);
        discovery_stop.stop();
        discovery.abort();
        // The keeper renews on while the pipeline drains; it reports to nobody meanwhile.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        outcome.map_err(SourceError::from)
    }
}

/// The readers of the shards this process holds.
struct Shards<'a> {
    source: &'a KinesisSource,
    out: &'a Delivery,
    running: HashMap<String, Running>,
    tasks: JoinSet<ShardEnd>,
}

impl Shards<'_> {
    fn start(&mut self, taken: TakenLease) {
        let source = self.source;
        let start = taken.start_position(source.initial);
        let claim = Arc::new(taken.claim);
        tracing::info!(
            shard = %claim.shard_id,
            epoch = claim.epoch,
            from = ?start,
            taken_from = taken.taken_from.as_deref().unwrap_or("nobody"),
            "shard lease acquired; reading"
        );
        if let Some(old) = self.running.remove(&claim.shard_id) {
            old.stop.stop();
        }
        let reader = ShardReader::new(
            source.api.clone(),
            source.stream.clone(),
            claim.clone(),
            start.clone(),
            source.reader,
        )
        .with_stats(source.stats.clone());
        let stop = Shutdown::new();
        self.running.insert(
            claim.shard_id.clone(),
            Running {
                epoch: claim.epoch,
                stop: stop.clone(),
                progress: reader.progress(),
            },
        );
        let out = self.out.clone();
        let connector = source.connector.clone();
        let (shard, epoch) = (claim.shard_id.clone(), claim.epoch);
        self.tasks.spawn(async move {
            let ended = read_shard(reader, claim, out, stop, connector).await;
            (shard, epoch, ended)
        });
        self.source
            .kinesis
            .leases_held
            .set(self.running.len() as i64);
    }

    /// A lease was lost: its reader stops; what it delivered is fenced off at commit.
    fn stop(&mut self, claim: &LeaseClaim) {
        let Some(running) = self.running.get(&claim.shard_id) else {
            return;
        };
        if running.epoch == claim.epoch {
            tracing::info!(shard = %claim.shard_id, epoch = claim.epoch, "shard lease lost; reader stops");
            running.stop.stop();
            self.running.remove(&claim.shard_id);
            self.source.kinesis.forget_shard(&claim.shard_id);
            self.source
                .kinesis
                .leases_held
                .set(self.running.len() as i64);
        }
    }

    /// A shard's task ended; a failure ends the source.
    fn ended(
        &mut self,
        joined: Result<ShardEnd, tokio::task::JoinError>,
    ) -> Result<(), KinesisSourceError> {
        let (shard, epoch, result) =
            joined.map_err(|e| KinesisSourceError::Task("shard reader", e))?;
        if self.running.get(&shard).is_some_and(|r| r.epoch == epoch) {
            self.running.remove(&shard);
            self.source.kinesis.forget_shard(&shard);
        }
        result
    }

    fn publish_metrics(&self) {
        let kinesis = &self.source.kinesis;
        for (shard, running) in &self.running {
            let behind = running
                .progress
                .millis_behind_latest
                .load(Ordering::Relaxed);
            if behind >= 0 {
                kinesis.set_millis_behind(shard, behind);
            }
        }
    }

    async fn stop_all(&mut self) {
        for running in self.running.values() {
            running.stop.stop();
        }
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok((shard, _, Err(e))) = joined {
                tracing::warn!(shard, error = %crate::error_chain::Chain(&e), "shard reader ended with an error while stopping");
            }
        }
        for shard in self.running.keys() {
            self.source.kinesis.forget_shard(shard);
        }
        self.running.clear();
        self.source.kinesis.leases_held.set(0);
    }
}

/// Reads one shard; if its end came on an empty page, finishes it once its records are committed.
async fn read_shard(
    reader: ShardReader,
    claim: Arc<LeaseClaim>,
    out: Delivery,
    stop: Shutdown,
    connector: Connector,
) -> Result<(), KinesisSourceError> {
    match reader.run(out, stop.clone()).await? {
        ReadEnd::ShardEnded {
            last_read,
            end_delivered: false,
        } => finish_when_committed(&claim, last_read.as_ref(), &stop, &connector).await,
        _ => Ok(()),
    }
}

/// Marks the shard finished once its checkpoint has reached `last_read`. Gives up quietly if the
/// lease moved on (the new owner finishes it) or on stop (the next owner finishes it).
async fn finish_when_committed(
    claim: &LeaseClaim,
    last_read: Option<&SequenceNumber>,
    stop: &Shutdown,
    connector: &Connector,
) -> Result<(), KinesisSourceError> {
    let mut client: Option<Client> = None;
    let mut pacing = crate::retry::backoff();
    loop {
        let db = match client.take().filter(|c| !c.is_closed()) {
            Some(c) => Ok(c),
            None => connector.connect("sluice kinesis").await,
        };
        let pause = match db {
            Ok(db) => {
                let done = checkpoint::finish(&db, claim, last_read).await;
                client = Some(db);
                match done {
                    Ok(()) => {
                        tracing::info!(shard = %claim.shard_id, "shard finished");
                        return Ok(());
                    }
                    Err(CheckpointError::NotCaughtUp { .. }) => FINISH_POLL,
                    Err(CheckpointError::Fenced { .. }) => return Ok(()),
                    Err(CheckpointError::Db(e)) => {
                        tracing::warn!(shard = %claim.shard_id, error = %crate::pg::describe(&e), "cannot finish the shard yet; retrying");
                        client = None;
                        pacing.next().unwrap_or(FINISH_POLL)
                    }
                    Err(e) => return Err(KinesisSourceError::Finish(e)),
                }
            }
            Err(e) => {
                tracing::warn!(shard = %claim.shard_id, error = %crate::error_chain::Chain(&e), "cannot finish the shard yet; retrying");
                pacing.next().unwrap_or(FINISH_POLL)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.requested() => return Ok(()),
        }
    }
}

/// The lease keeper as the pipeline's background task: it runs until the stages have drained, then
/// hands the leases back. Ending before that (it never should) ends the run.
fn keeper_task(
    keeper: LeaseKeeper,
    graph: watch::Receiver<Arc<ShardGraph>>,
    events: mpsc::Sender<LeaseEvent>,
) -> BackgroundTask {
    BackgroundTask::new("kinesis lease keeper", move |token| async move {
        let stop = Shutdown::new();
        let run = keeper.run(graph, events, stop.clone());
        tokio::pin!(run);
        tokio::select! {
            _ = &mut run => return Err(BackgroundError::new(KinesisSourceError::KeeperStopped)),
            _ = token.cancelled() => stop.stop(),
        }
        run.await;
        Ok(())
    })
}

/// Acknowledging is the checkpoint the batch already committed: here it is only counted.
pub struct KinesisAcknowledger {
    stats: Arc<KinesisStats>,
}

#[async_trait]
impl Acknowledger for KinesisAcknowledger {
    async fn acknowledge(&self, tokens: Vec<AckToken>) {
        record::count_committed(&self.stats, &tokens);
    }
}
