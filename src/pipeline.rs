//! Wiring the stages into a running pipeline, and taking it down cleanly.
//!
//! ```text
//! source ─▶ parse ─▶ mask/transform ─▶ batcher ─▶ PgCopySink ─▶ acknowledger
//! ```
//!
//! Each arrow is a bounded channel (capacity `pipeline.channel_capacity` chunks; one batch between
//! batcher and sink, so the next batch is encoded while the current one commits). When any stage is
//! slower, the channels in front of it fill and everything upstream waits, down to the source, which
//! stops receiving. Rejects ride along in the same chunks as good rows, so one transaction commits
//! both and one rule covers acknowledgement: after commit, never before.
//!
//! [`Pipeline::run`] supervises the tasks: the first fatal error stops the source, and the rest drain
//! as in a graceful shutdown. A drain that exceeds `pipeline.shutdown_timeout_seconds` is abandoned:
//! the unfinished messages are handed back to the source and the run ends with an error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::aws;
use crate::config::{Config, ConfigError, SourceKind};
use crate::envelope::{AckToken, Chunk, Envelope};
use crate::metrics::{self, ChannelProbe};
use crate::pg;
use crate::shutdown::{self, Shutdown};
use crate::sink::batch::{Batch, run_batcher};
use crate::sink::dead_letter_queue::DeadLetterQueue;
use crate::sink::ledger::{self, Ledger};
use crate::sink::postgres::{PgCopySink, PgCopySinkBuilder, SinkError, SinkSettings};
use crate::sink::schema::{self, SchemaError, Tables};
use crate::source::file::FileSource;
use crate::source::sqs::SqsSource;
use crate::source::{Acknowledger, BuiltSource, SourceError};
use crate::stage::mask::Masker;
use crate::stage::parse::{LoginEvent, run_parse_stage};
use crate::stage::transform::{LoginRow, Transformer, run_transform_stage};
use crate::stats::{Stats, Summary};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("source: {0}")]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("PostgreSQL schema: {0}")]
    Schema(#[from] SchemaError),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(
        "shutdown did not drain within {timeout:?} (still running: {}); unfinished messages were handed back to the source",
        .unfinished.join(", ")
    )]
    DrainTimeout {
        timeout: Duration,
        unfinished: Vec<&'static str>,
    },
    #[error("{0} task failed: {1}")]
    Task(&'static str, String),
}

/// How a run ends, besides the source running dry.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop once the source has delivered nothing for this long and everything is acknowledged.
    pub exit_when_idle: Option<Duration>,
    /// Install SIGINT/SIGTERM handlers (the daemon does; benchmarks and tests driving the library
    /// do not).
    pub handle_signals: bool,
}

/// A pipeline whose sink is connected and whose tables are checked, ready for a source.
pub struct Pipeline {
    config: Config,
    stats: Arc<Stats>,
    transformer: Transformer,
    /// One committer per `sink.postgres.connections`, each already connected with its statements
    /// prepared.
    committers: Vec<PgCopySink>,
}

impl Pipeline {
    /// Loads the mask key, connects to PostgreSQL, creates missing tables (if allowed) and checks
    /// them. Everything that can be wrong with the setup fails here, before any message is touched.
    pub async fn prepare(config: &Config) -> Result<Pipeline, PipelineError> {
        let stats = Arc::new(Stats::default());
        let transformer = transformer(config)?;
        let committers = prepare_sink(config, stats.clone()).await?;
        Ok(Pipeline {
            config: config.clone(),
            stats,
            transformer,
            committers,
        })
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs until the source ends, shutdown is requested, or a stage fails.
    pub async fn run(
        self,
        source: BuiltSource,
        options: RunOptions,
    ) -> Result<Summary, PipelineError> {
        self.start(source, options).await?.finish().await
    }

    /// Starts the run: the operations endpoint (whose address may be taken), signal handlers, the
    /// idle watch and the stage tasks. An error here means nothing ran and no message was touched.
    pub async fn start(
        self,
        source: BuiltSource,
        options: RunOptions,
    ) -> Result<Running, PipelineError> {
        let channels = Channels::new(self.config.pipeline.channel_capacity, source.chunk_messages);
        let endpoint = self.start_endpoint(&channels).await?;
        let token = Shutdown::new();
        if options.handle_signals
            && let Err(e) = shutdown::listen_for_signals(token.clone())
        {
            endpoint.cancel();
            return Err(PipelineError::Signals(e));
        }
        if let Some(idle) = options.exit_when_idle {
            shutdown::exit_when_idle(token.clone(), self.stats.clone(), idle);
        }
        let pruner = spawn_ledger_pruner(&self.config);
        let acknowledger = source.acknowledger.clone();
        let stats = self.stats.clone();
        let limits = DrainLimits {
            timeout: Duration::from_secs(self.config.pipeline.shutdown_timeout_seconds),
            receive_allowance: source.receive_allowance,
        };
        let tasks = self.spawn_stages(source, channels, token.clone());
        Ok(Running {
            tasks,
            token,
            limits,
            acknowledger,
            stats,
            pruner,
            endpoint,
        })
    }

    /// Starts `/metrics`, `/healthz` and `/readyz` if configured; cancel the token to stop them.
    async fn start_endpoint(
        &self,
        channels: &Channels,
    ) -> Result<CancellationToken, PipelineError> {
        let stop = CancellationToken::new();
        let Some(listen) = &self.config.metrics.listen else {
            return Ok(stop);
        };
        let addr = listen
            .parse()
            .map_err(|_| PipelineError::Metrics(format!("{listen:?} is not an address")))?;
        let stall_after = Duration::from_secs(self.config.metrics.stall_after_seconds);
        metrics::serve(
            addr,
            self.stats.clone(),
            channels.probes(),
            stall_after,
            stop.clone(),
        )
        .await
        .map_err(|e| PipelineError::Metrics(format!("cannot listen on {listen}: {e}")))?;
        Ok(stop)
    }

    /// One task per stage, joined by the channels.
    fn spawn_stages(self, source: BuiltSource, channels: Channels, token: Shutdown) -> StageTasks {
        let Pipeline {
            config,
            stats,
            transformer,
            committers,
        } = self;
        let Channels {
            raw,
            parsed,
            rows,
            batches,
            acks,
        } = channels;
        let postgres = &config.sink.postgres;
        let (batch_rows, linger) = (
            postgres.batch_rows,
            Duration::from_millis(postgres.linger_ms),
        );
        let mut tasks = StageTasks::default();
        let receiving = source.source;
        tasks.spawn(
            "source",
            async move { Ok(receiving.run(raw.0, token).await?) },
        );
        let s = stats.clone();
        tasks.spawn("parse", async move {
            run_parse_stage(raw.1, parsed.0, s).await;
            Ok(())
        });
        let s = stats.clone();
        tasks.spawn("transform", async move {
            run_transform_stage(transformer, parsed.1, rows.0, s).await;
            Ok(())
        });
        tasks.spawn("batcher", async move {
            run_batcher(rows.1, batches.0, batch_rows, linger).await;
            Ok(())
        });
        let queue = Arc::new(tokio::sync::Mutex::new(batches.1));
        for committer in committers {
            let (queue, acks) = (queue.clone(), acks.0.clone());
            tasks.spawn("sink", async move { Ok(committer.run(queue, acks).await?) });
        }
        drop(acks.0);
        let acknowledger = source.acknowledger;
        tasks.spawn("acknowledger", async move {
            acknowledge_committed(acknowledger, acks.1, stats).await;
            Ok(())
        });
        tasks
    }
}

/// A pipeline whose stages are running.
pub struct Running {
    tasks: StageTasks,
    token: Shutdown,
    limits: DrainLimits,
    acknowledger: Arc<dyn Acknowledger>,
    stats: Arc<Stats>,
    pruner: CancellationToken,
    endpoint: CancellationToken,
}

impl Running {
    /// Waits until the source ends, shutdown is requested, or a stage fails; then hands back what
    /// is unacknowledged and stops the background work.
    pub async fn finish(self) -> Result<Summary, PipelineError> {
        let outcome = supervise(self.tasks, &self.token, self.limits).await;
        self.acknowledger.finish().await;
        self.pruner.cancel();
        self.endpoint.cancel();
        outcome.map(|()| self.stats.summary())
    }
}

/// The stage tasks, each known by name so that a drain that times out can say which did not finish.
#[derive(Default)]
struct StageTasks {
    set: JoinSet<(&'static str, Result<(), PipelineError>)>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl StageTasks {
    fn spawn(
        &mut self,
        name: &'static str,
        work: impl Future<Output = Result<(), PipelineError>> + Send + 'static,
    ) {
        let handle = self.set.spawn(async move { (name, work.await) });
        self.names.insert(handle.id(), name);
    }
}

/// The acknowledging task: hands each committed batch's tokens to the source, in commit order.
async fn acknowledge_committed(
    acknowledger: Arc<dyn Acknowledger>,
    mut committed: mpsc::Receiver<Vec<AckToken>>,
    stats: Arc<Stats>,
) {
    while let Some(tokens) = committed.recv().await {
        let n = tokens.len();
        acknowledger.acknowledge(tokens).await;
        stats.record_acknowledged(n);
    }
}

/// The bounded channels between the stages, as (sender, receiver) pairs.
struct Channels {
    raw: (
        mpsc::Sender<Chunk<Envelope>>,
        mpsc::Receiver<Chunk<Envelope>>,
    ),
    parsed: (
        mpsc::Sender<Chunk<LoginEvent>>,
        mpsc::Receiver<Chunk<LoginEvent>>,
    ),
    rows: (
        mpsc::Sender<Chunk<LoginRow>>,
        mpsc::Receiver<Chunk<LoginRow>>,
    ),
    /// One batch in waiting: encoded while the previous one commits.
    batches: (mpsc::Sender<Batch>, mpsc::Receiver<Batch>),
    /// Acknowledgement tokens of committed batches.
    acks: (mpsc::Sender<Vec<AckToken>>, mpsc::Receiver<Vec<AckToken>>),
}

impl Channels {
    /// `capacity` messages per channel, as whole chunks of `chunk_messages`, at least two.
    fn new(capacity: usize, chunk_messages: usize) -> Channels {
        let chunks = (capacity / chunk_messages.max(1)).max(2);
        Channels {
            raw: mpsc::channel(chunks),
            parsed: mpsc::channel(chunks),
            rows: mpsc::channel(chunks),
            batches: mpsc::channel(1),
            acks: mpsc::channel(1),
        }
    }

    fn probes(&self) -> Vec<ChannelProbe> {
        vec![
            ChannelProbe::new("source_to_parse", &self.raw.0),
            ChannelProbe::new("parse_to_transform", &self.parsed.0),
            ChannelProbe::new("transform_to_batcher", &self.rows.0),
            ChannelProbe::new("batcher_to_sink", &self.batches.0),
            ChannelProbe::new("sink_to_acknowledger", &self.acks.0),
        ]
    }
}

/// How long a drain may take once a stop is requested.
#[derive(Debug, Clone, Copy)]
struct DrainLimits {
    /// `pipeline.shutdown_timeout_seconds`.
    timeout: Duration,
    /// Added when the stop lets receives in progress return (idle exit): waiting for a long poll
    /// is not draining.
    receive_allowance: Duration,
}

impl DrainLimits {
    fn for_stop(&self, token: &Shutdown) -> Duration {
        if token.finishes_receives() {
            self.timeout + self.receive_allowance
        } else {
            self.timeout
        }
    }
}

/// Waits for every task; the first failure cancels `token` so the rest drain. Gives up on the drain
/// once the stop has waited longer than `limits` allow, naming the tasks still running.
async fn supervise(
    tasks: StageTasks,
    token: &Shutdown,
    limits: DrainLimits,
) -> Result<(), PipelineError> {
    let StageTasks {
        set: mut tasks,
        names: mut running,
    } = tasks;
    let mut first_error = None;
    let deadline = async {
        token.requested().await;
        tokio::time::sleep(limits.for_stop(token)).await;
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next_with_id() => {
                let failure = match joined {
                    None => break,
                    Some(Ok((id, (_, Ok(()))))) => {
                        running.remove(&id);
                        continue;
                    }
                    Some(Ok((id, (name, Err(e))))) => {
                        running.remove(&id);
                        tracing::error!(task = name, error = %e, "pipeline task failed; stopping");
                        e
                    }
                    Some(Err(e)) => {
                        let name = running.remove(&e.id()).unwrap_or("pipeline");
                        PipelineError::Task(name, e.to_string())
                    }
                };
                token.stop();
                first_error.get_or_insert(failure);
            }
            _ = &mut deadline => {
                let timeout = limits.for_stop(token);
                let mut unfinished: Vec<&'static str> = running.into_values().collect();
                unfinished.sort_unstable();
                unfinished.dedup();
                tracing::error!(
                    timeout_seconds = timeout.as_secs(),
                    still_running = unfinished.join(", "),
                    "drain timed out; abandoning unfinished messages"
                );
                tasks.abort_all();
                return Err(first_error.unwrap_or(PipelineError::DrainTimeout { timeout, unfinished }));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn transformer(config: &Config) -> Result<Transformer, PipelineError> {
    let key = config.mask_key()?;
    if key.is_development_key() {
        tracing::warn!(
            "masking with the PUBLIC development key: masked values are NOT protected; set SLUICE_MASK_KEY or `mask.key_file` for real data"
        );
    }
    Ok(Transformer::new(
        Masker::new(config.mask.mode, &key),
        config.transform.app_version,
        config.transform.create_date,
    ))
}

/// The three tables named by the configuration.
pub fn tables(config: &Config) -> Tables {
    Tables {
        target: config.table(),
        dead_letter: config.dead_letter_table(),
        ledger: config.ledger_table(),
    }
}

async fn prepare_sink(
    config: &Config,
    stats: Arc<Stats>,
) -> Result<Vec<PgCopySink>, PipelineError> {
    let postgres = &config.sink.postgres;
    let timeout = Duration::from_secs(postgres.connect_timeout_seconds);
    let mut client = pg::connect(config.database_url(), "sluice", timeout)
        .await
        .map_err(|e| PipelineError::Connect(pg::describe(&e)))?;
    let tables = tables(config);
    let dedupe = config.dedupe_enabled();
    let columns = match schema::verify(&client, &tables, dedupe).await {
        Err(SchemaError::Missing { .. }) if postgres.create_tables => {
            for status in schema::migrate(&mut client, &tables, dedupe).await? {
                if status.created {
                    tracing::info!(table = status.table, "created missing table");
                }
            }
            schema::verify(&client, &tables, dedupe).await?
        }
        other => other?,
    };
    let dead_letter_queue = match &config.dead_letter.sqs_queue_url {
        Some(url) => Some(
            DeadLetterQueue::connect(
                aws::sqs_client(&config.source.sqs).await,
                url.clone(),
                stats.clone(),
            )
            .await,
        ),
        None => None,
    };
    let settings = SinkSettings {
        url: config.database_url().to_owned(),
        connect_timeout: timeout,
        tables,
        dead_letter_columns: columns,
        dedupe,
        dead_letter_queue,
    };
    let builder = PgCopySinkBuilder::new(settings, stats);
    let mut committers = Vec::with_capacity(postgres.connections);
    let mut first = Some(client);
    for _ in 0..postgres.connections {
        let mut committer = builder.committer(first.take());
        committer.open().await.map_err(PipelineError::Sink)?;
        committers.push(committer);
    }
    Ok(committers)
}

fn spawn_ledger_pruner(config: &Config) -> CancellationToken {
    let stop = CancellationToken::new();
    if config.dedupe_enabled() {
        let postgres = &config.sink.postgres;
        tokio::spawn(ledger::prune_periodically(
            Ledger::new(&config.ledger_table()),
            config.database_url().to_owned(),
            i32::try_from(postgres.ledger_retention_hours).unwrap_or(i32::MAX),
            Duration::from_secs(postgres.connect_timeout_seconds),
            stop.clone(),
        ));
    }
    stop
}

/// Builds the configured source.
pub async fn build_source(
    config: &Config,
    stats: Arc<Stats>,
) -> Result<BuiltSource, PipelineError> {
    match config.source.kind {
        SourceKind::Sqs => Ok(SqsSource::build(&config.source.sqs, stats).await?),
        SourceKind::File => {
            let path = file_path(config);
            Ok(FileSource::build(
                path,
                config.source.file.chunk_messages,
                stats,
            )?)
        }
    }
}

/// `source.file.path`, relative to the config file's directory like every path in it; `-` is stdin.
fn file_path(config: &Config) -> PathBuf {
    let path = config.source.file.path.clone().unwrap_or_default();
    if path.as_os_str() == "-" || path.is_absolute() {
        path
    } else {
        config.base_dir.join(path)
    }
}
