//! Wiring the stages into a running pipeline, and taking it down cleanly.
//!
//! ```text
//! source ─▶ parse ─▶ mask/transform ─▶ batcher ─▶ committers ─▶ acknowledger
//! ```
//!
//! Each arrow is a bounded channel (capacity `pipeline.channel_capacity` chunks; one batch between
//! batcher and committers, so the next batch is encoded while the current one commits). When any
//! stage is slower, the channels in front of it fill and everything upstream waits, down to the
//! source, which stops receiving. Rejects ride along in the same chunks as good rows, so one
//! transaction commits both and one rule covers acknowledgement: after commit, never before. The
//! committers (PostgreSQL's, or a fake in tests) write each batch with the source's commit record;
//! the pipeline only hands it over, and hands out batches with their turns when the record needs
//! them committed in order ([`crate::sink::commit_order`]).
//!
//! [`Pipeline::run`] supervises the tasks, the stages and the background work beside them
//! ([`crate::background`]): the first failure or panic of either stops the source, the stages drain
//! as in a graceful shutdown, and the run ends with that error. A drain that exceeds `pipeline.shutdown_timeout_seconds` is abandoned:
//! the unfinished messages are handed back to the source and the run ends with an error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::background::{BackgroundError, BackgroundTask};
use crate::config::{Config, ConfigError, KeySource};
use crate::envelope::{AckToken, Chunk, Envelope};
use crate::error_chain::Chain;
use crate::metrics::{self, ChannelProbe};
use crate::progress;
use crate::shutdown::{self, Shutdown};
use crate::sink::batch::{Batch, BatchLimits, run_batcher};
use crate::sink::commit_order::BatchQueue;
use crate::sink::{self, Sink, SinkError, run_committer};
use crate::source::{Acknowledger, BuiltSource, SourceError};
use crate::stage::mask::{MaskKey, Masker};
use crate::stage::parse::{LoginEvent, run_parse_stage};
use crate::stage::transform::{LoginRow, Transformer, run_transform_stage};
use crate::stats::{Stats, Summary};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("cannot listen on {addr} for the metrics endpoint")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("masking key from AWS KMS")]
    Kms(#[from] crate::kms::KmsKeyError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(
        "shutdown did not drain within {timeout:?} (still running: {}); unfinished messages were handed back to the source",
        .unfinished.join(", ")
    )]
    DrainTimeout {
        timeout: Duration,
        unfinished: Vec<&'static str>,
    },
    #[error("the {0} task stopped abnormally")]
    Task(&'static str, #[source] tokio::task::JoinError),
    #[error("the {0} failed")]
    Background(&'static str, #[source] BackgroundError),
}

/// How a run ends, besides the source running dry.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Stop once the source has delivered nothing for this long and everything is acknowledged.
    pub exit_when_idle: Option<Duration>,
    /// Install SIGINT/SIGTERM handlers (the daemon does; benchmarks and tests driving the library
    /// do not).
    pub handle_signals: bool,
    /// The run's stop request: whoever holds a clone may stop it.
    pub shutdown: Shutdown,
}

/// A pipeline whose sink is connected and whose tables are checked, ready for a source.
pub struct Pipeline {
    config: Config,
    stats: Arc<Stats>,
    transformer: Transformer,
    sink: Sink,
}

impl Pipeline {
    /// Loads the mask key, connects to PostgreSQL, creates missing tables (if allowed) and checks
    /// them. Everything that can be wrong with the setup fails here, before any message is touched.
    pub async fn prepare(config: &Config) -> Result<Pipeline, PipelineError> {
        let stats = Arc::new(Stats::default());
        let transformer = transformer(config, mask_key(config).await?)?;
        let sink = sink::prepare(config, stats.clone()).await?;
        Ok(Pipeline {
            config: config.clone(),
            stats,
            transformer,
            sink,
        })
    }

    /// A pipeline over a sink of the caller's (tests of the delivery rules use a fake committer).
    pub fn with_sink(
        config: &Config,
        stats: Arc<Stats>,
        sink: Sink,
    ) -> Result<Pipeline, PipelineError> {
        Ok(Pipeline {
            config: config.clone(),
            stats,
            transformer: transformer(config, config.mask_key()?)?,
            sink,
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
    /// idle watch, the source's and sink's background work and the stage tasks. An error here means
    /// nothing ran and no message was touched.
    pub async fn start(
        mut self,
        mut source: BuiltSource,
        options: RunOptions,
    ) -> Result<Running, PipelineError> {
        let channels = Channels::new(self.config.pipeline.channel_capacity, source.chunk_messages);
        let token = options.shutdown.clone();
        let mut background = Background::default();
        if let Some(endpoint) = self.endpoint(&channels).await? {
            background.spawn(endpoint);
        }
        let progress_every = self.config.log.progress_interval_seconds;
        if progress_every > 0 {
            background.spawn(progress::task(
                self.stats.clone(),
                Duration::from_secs(progress_every),
            ));
        }
        if options.handle_signals {
            let listener = shutdown::listen_for_signals(token.clone());
            match listener {
                Ok(listener) => background.spawn(listener),
                Err(e) => {
                    // Nothing has run yet; the failure to start is the error that matters.
                    let _ = background.stop().await;
                    return Err(PipelineError::Signals(e));
                }
            }
        }
        if let Some(idle) = options.exit_when_idle {
            background.spawn(shutdown::exit_when_idle(
                token.clone(),
                self.stats.clone(),
                idle,
            ));
        }
        if let Some(pruner) = self.sink.ledger_pruning() {
            background.spawn(pruner);
        }
        for task in std::mem::take(&mut source.background) {
            background.spawn(task);
        }
        let acknowledger = source.acknowledger.clone();
        let stats = self.stats.clone();
        let limits = DrainLimits {
            timeout: Duration::from_secs(self.config.pipeline.shutdown_timeout_seconds),
            receive_allowance: source.receive_allowance,
        };
        let tasks = self.spawn_stages(source, channels, token.clone());
        Ok(Running {
            tasks,
            background,
            token,
            limits,
            acknowledger,
            stats,
        })
    }

    /// `/metrics`, `/healthz` and `/readyz`, if configured: bound now, served by the task.
    async fn endpoint(&self, channels: &Channels) -> Result<Option<BackgroundTask>, PipelineError> {
        let Some(addr) = self.config.metrics.listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| PipelineError::MetricsListen { addr, source })?;
        let stall_after = Duration::from_secs(self.config.metrics.stall_after_seconds);
        Ok(Some(metrics::serve(
            listener,
            self.stats.clone(),
            channels.probes(),
            stall_after,
        )))
    }

    /// One task per stage, joined by the channels.
    fn spawn_stages(self, source: BuiltSource, channels: Channels, token: Shutdown) -> StageTasks {
        let Pipeline {
            config,
            stats,
            transformer,
            sink,
        } = self;
        let Channels {
            raw,
            parsed,
            rows,
            batches,
            acks,
        } = channels;
        let postgres = &config.sink.postgres;
        let limits = BatchLimits {
            rows: postgres.batch_rows,
            bytes: postgres.batch_bytes,
            linger: Duration::from_millis(postgres.linger_ms),
        };
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
        let record = source.commit_record;
        let preparing = record.clone();
        tasks.spawn("batcher", async move {
            run_batcher(rows.1, batches.0, limits, preparing).await;
            Ok(())
        });
        let queue = BatchQueue::new(batches.1, record.ordered());
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        for committer in sink.committers {
            let (queue, acks, record, s) =
                (queue.clone(), acks.0.clone(), record.clone(), stats.clone());
            tasks.spawn("sink", async move {
                Ok(run_committer(committer, record, queue, acks, s).await?)
            });
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
    background: Background,
    token: Shutdown,
    limits: DrainLimits,
    acknowledger: Arc<dyn Acknowledger>,
    stats: Arc<Stats>,
}

impl Running {
    /// Waits until the source ends, shutdown is requested, or a task fails (a stage or a background
    /// task); then stops the background work and hands back what is unacknowledged.
    pub async fn finish(mut self) -> Result<Summary, PipelineError> {
        let outcome = supervise(self.tasks, &mut self.background, &self.token, self.limits).await;
        let stopped = self.background.stop().await;
        self.acknowledger.finish().await;
        outcome.and(stopped).map(|()| self.stats.summary())
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

/// How long background tasks get to end once told to stop, after the stages have finished.
const BACKGROUND_STOP: Duration = Duration::from_secs(5);

/// The run's background tasks (see [`crate::background`]), all stopped by one token.
#[derive(Default)]
struct Background {
    set: JoinSet<(&'static str, Result<(), BackgroundError>)>,
    names: HashMap<tokio::task::Id, &'static str>,
    stop: CancellationToken,
}

impl Background {
    fn spawn(&mut self, task: BackgroundTask) {
        let name = task.name;
        let work = task.start(self.stop.clone());
        let handle = self.set.spawn(async move { (name, work.await) });
        self.names.insert(handle.id(), name);
    }

    /// The next task to end, as an error if it failed or panicked; `None` when none is left.
    async fn next_failure(&mut self) -> Option<Option<PipelineError>> {
        let joined = self.set.join_next_with_id().await?;
        Some(match joined {
            Ok((id, (_, Ok(())))) => {
                self.names.remove(&id);
                None
            }
            Ok((id, (name, Err(e)))) => {
                self.names.remove(&id);
                tracing::error!(task = name, error = %Chain(&e), "background task failed; stopping");
                Some(PipelineError::Background(name, e))
            }
            Err(e) => {
                let name = self.names.remove(&e.id()).unwrap_or("background");
                if e.is_cancelled() {
                    return Some(None);
                }
                tracing::error!(task = name, error = %Chain(&e), "background task stopped abnormally; stopping");
                Some(PipelineError::Task(name, e))
            }
        })
    }

    /// Stops every task and waits for them (at most [`BACKGROUND_STOP`]; then they are aborted).
    /// Returns the first failure among them.
    async fn stop(&mut self) -> Result<(), PipelineError> {
        self.stop.cancel();
        let mut first = None;
        let all = async {
            while let Some(failure) = self.next_failure().await {
                if let Some(e) = failure {
                    first.get_or_insert(e);
                }
            }
        };
        if tokio::time::timeout(BACKGROUND_STOP, all).await.is_err() {
            let mut late: Vec<&str> = self.names.values().copied().collect();
            late.sort_unstable();
            tracing::warn!(
                tasks = late.join(", "),
                "background tasks did not stop in time; aborted"
            );
            self.set.abort_all();
        }
        first.map_or(Ok(()), Err)
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

/// Waits for every stage task, watching the background tasks meanwhile; the first failure of either
/// cancels `token` so the stages drain. Gives up on the drain
/// once the stop has waited longer than `limits` allow, naming the tasks still running.
async fn supervise(
    tasks: StageTasks,
    background: &mut Background,
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
                        tracing::error!(task = name, error = %Chain(&e), "pipeline task failed; stopping");
                        e
                    }
                    Some(Err(e)) => {
                        let name = running.remove(&e.id()).unwrap_or("pipeline");
                        tracing::error!(task = name, error = %Chain(&e), "pipeline task stopped abnormally; stopping");
                        PipelineError::Task(name, e)
                    }
                };
                token.stop();
                first_error.get_or_insert(failure);
            }
            Some(Some(failure)) = background.next_failure(), if !background.set.is_empty() => {
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

/// The masking key from where `mask.key_source` says: the environment or a file, or the data keys
/// decrypted by AWS KMS.
pub async fn mask_key(config: &Config) -> Result<MaskKey, PipelineError> {
    match config.mask.key_source {
        KeySource::Local => Ok(config.mask_key()?),
        KeySource::Kms => {
            let client = crate::kms::client(config.mask.kms_endpoint_url.as_deref()).await;
            Ok(crate::kms::mask_key(&client, &config.mask).await?)
        }
    }
}

fn transformer(config: &Config, key: MaskKey) -> Result<Transformer, PipelineError> {
    if key.is_development_key() {
        tracing::warn!(
            "masking with the PUBLIC development key: masked values are NOT protected; set SLUICE_MASK_KEY or `mask.key_file` for real data"
        );
    }
    let masker = Masker::new(config.mask.mode, &key).map_err(ConfigError::from)?;
    Ok(Transformer::new(
        masker,
        config.transform.app_version,
        config.transform.create_date,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use crate::config::EnvOverrides;
    use crate::envelope::{Envelope, Meta};
    use crate::sink::commit_order::Turn;
    use crate::sink::commit_record::{CommitRecord, NoCommitRecord};
    use crate::sink::{Commit, CommitCounts, Committed, Committer};
    use crate::source::memory::MemorySource;

    /// What the fakes saw, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Committed(Vec<String>),
        Acknowledged(Vec<String>),
        Finished,
    }

    type Log = Arc<Mutex<Vec<Event>>>;

    fn log_of(log: &Log) -> Vec<Event> {
        log.lock().expect("log").clone()
    }

    fn handle(meta: &Meta) -> String {
        handle_of(&meta.ack)
    }

    fn handle_of(token: &AckToken) -> String {
        match token {
            AckToken::Sqs { receipt_handle } => receipt_handle.clone(),
            _ => String::new(),
        }
    }

    /// Commits by waiting `takes`, or never; drops the messages `fenced` names.
    struct FakeCommitter {
        log: Log,
        takes: Duration,
        stuck: bool,
        fenced: fn(&Meta) -> bool,
    }

    #[async_trait]
    impl Committer for FakeCommitter {
        async fn commit(
            &mut self,
            mut batch: Batch,
            _record: &dyn CommitRecord,
            turn: &mut Turn,
        ) -> Result<sink::Commit, SinkError> {
            if self.stuck {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(self.takes).await;
            turn.wait().await?;
            let dropped = batch.drop_where(self.fenced);
            let handles = batch.metas().map(handle).collect();
            self.log
                .lock()
                .expect("log")
                .push(Event::Committed(handles));
            let counts = CommitCounts {
                loaded: batch.row_count(),
                rejected: batch.rejects.len(),
                duplicates: 0,
            };
            Ok(Commit {
                committed: vec![Committed {
                    batch,
                    counts,
                    took: self.takes,
                }],
                dropped,
            })
        }
    }

    struct FakeAcknowledger {
        log: Log,
    }

    #[async_trait]
    impl Acknowledger for FakeAcknowledger {
        async fn acknowledge(&self, tokens: Vec<AckToken>) {
            let handles = tokens.iter().map(handle_of).collect();
            self.log
                .lock()
                .expect("log")
                .push(Event::Acknowledged(handles));
        }

        async fn finish(&self) -> usize {
            self.log.lock().expect("log").push(Event::Finished);
            0
        }
    }

    fn config() -> Config {
        let text = "[source]\nkind = \"file\"\n[source.file]\npath = \"unused\"\n\
                    [sink.postgres]\nurl = \"postgres://x@y/z\"\nbatch_rows = 10\nlinger_ms = 100\n\
                    [pipeline]\nshutdown_timeout_seconds = 5\nchannel_capacity = 20\n";
        let env = EnvOverrides {
            mask_key: Some("a pipeline test key of 16+ bytes".into()),
            ..EnvOverrides::default()
        };
        Config::from_toml(text, std::path::Path::new("test.toml"), env).expect("valid")
    }

    /// `n` valid logins, acknowledged by handles `m0`, `m1`, …
    fn messages(n: usize) -> Vec<Envelope> {
        (0..n)
            .map(|i| {
                let mut meta = Meta::at_position(i as u64 + 1, std::time::SystemTime::now());
                meta.ack = AckToken::Sqs {
                    receipt_handle: format!("m{i}"),
                };
                let body = format!(
                    r#"{{"user_id": "u{i}", "app_version": "2.3.0", "device_type": "ios", "ip": "10.0.0.1", "device_id": "d"}}"#
                );
                Envelope { body, meta }
            })
            .collect()
    }

    struct Run {
        log: Log,
        result: Result<Summary, PipelineError>,
        stats: Arc<Stats>,
    }

    /// Runs `n` messages through the pipeline with the fake committers `committers` makes;
    /// `stop_after` requests a stop.
    async fn run(
        n: usize,
        committers: impl FnOnce(&Log) -> Vec<FakeCommitter>,
        stop_after: Option<Duration>,
    ) -> Run {
        run_with(n, committers, stop_after, Vec::new()).await
    }

    /// [`run`], with background tasks of the source's.
    async fn run_with(
        n: usize,
        committers: impl FnOnce(&Log) -> Vec<FakeCommitter>,
        stop_after: Option<Duration>,
        background: Vec<BackgroundTask>,
    ) -> Run {
        let record: Arc<dyn CommitRecord> = Arc::new(NoCommitRecord);
        run_source(n, committers, stop_after, background, record).await
    }

    /// [`run_with`], with the source's commit record.
    async fn run_source(
        n: usize,
        committers: impl FnOnce(&Log) -> Vec<FakeCommitter>,
        stop_after: Option<Duration>,
        background: Vec<BackgroundTask>,
        record: Arc<dyn CommitRecord>,
    ) -> Run {
        let log = Log::default();
        let stats = Arc::new(Stats::default());
        let committers = committers(&log)
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Committer>)
            .collect();
        let pipeline =
            Pipeline::with_sink(&config(), stats.clone(), Sink::of(committers)).expect("pipeline");
        let acknowledger = Arc::new(FakeAcknowledger { log: log.clone() });
        // One message per chunk, so a stop can come between them.
        let mut source =
            MemorySource::build_with(messages(n), 1, stats.clone(), acknowledger, record);
        source.background = background;
        let options = RunOptions::default();
        if let Some(after) = stop_after {
            let stop = options.shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                stop.stop();
            });
        }
        let result = pipeline.run(source, options).await;
        Run { log, result, stats }
    }

    fn committer(log: &Log, takes: Duration) -> FakeCommitter {
        FakeCommitter {
            log: log.clone(),
            takes,
            stuck: false,
            fenced: |_| false,
        }
    }

    /// Every acknowledged message was committed before, and everything committed is acknowledged
    /// once.
    fn assert_acknowledged_after_commit(events: &[Event]) -> Vec<String> {
        let mut committed = std::collections::HashSet::new();
        let mut acknowledged = Vec::new();
        for event in events {
            match event {
                Event::Committed(handles) => committed.extend(handles.iter().cloned()),
                Event::Acknowledged(handles) => {
                    for h in handles {
                        assert!(committed.contains(h), "{h} acknowledged before its commit");
                        acknowledged.push(h.clone());
                    }
                }
                Event::Finished => {}
            }
        }
        assert_eq!(acknowledged.len(), committed.len(), "{events:?}");
        acknowledged.sort();
        acknowledged
    }

    #[tokio::test(start_paused = true)]
    async fn messages_are_acknowledged_only_after_their_commit() {
        let slow = Duration::from_secs(1);
        let two = |log: &Log| vec![committer(log, slow), committer(log, slow)];
        let done = run(25, two, None).await;
        let summary = done.result.expect("a clean run");
        assert_eq!((summary.received, summary.loaded), (25, 25));
        let events = log_of(&done.log);
        assert_eq!(assert_acknowledged_after_commit(&events).len(), 25);
        assert_eq!(events.last(), Some(&Event::Finished));
    }

    /// A commit record whose batches must commit in delivery order.
    struct InOrder;

    #[async_trait]
    impl CommitRecord for InOrder {
        fn ordered(&self) -> bool {
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ordered_source_commits_and_acknowledges_in_delivery_order_on_every_connection() {
        // The slow committer takes a batch first; the fast one must not commit the next before it.
        let slow_and_fast = |log: &Log| {
            vec![
                committer(log, Duration::from_secs(1)),
                committer(log, Duration::from_millis(10)),
            ]
        };
        let started = tokio::time::Instant::now();
        let done = run_source(45, slow_and_fast, None, Vec::new(), Arc::new(InOrder)).await;
        let took = started.elapsed();
        assert_eq!(done.result.expect("a clean run").loaded, 45);
        let events = log_of(&done.log);
        assert_acknowledged_after_commit(&events);
        let order = |committed: bool| -> Vec<usize> {
            events
                .iter()
                .filter_map(|e| match (e, committed) {
                    (Event::Committed(h), true) | (Event::Acknowledged(h), false) => Some(h),
                    _ => None,
                })
                .flatten()
                .map(|h| h[1..].parse().expect("m<n>"))
                .collect()
        };
        let delivered: Vec<usize> = (0..45).collect();
        assert_eq!(order(true), delivered, "committed in delivery order");
        assert_eq!(order(false), delivered, "acknowledged in delivery order");
        // Five batches of ten or fewer: on the slow committer alone they would take five seconds.
        assert!(
            took < Duration::from_secs(4),
            "the fast committer took batches while the slow one worked: {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_drains_everything_received() {
        let one = |log: &Log| vec![committer(log, Duration::from_millis(100))];
        let done = run(1000, one, Some(Duration::from_millis(20))).await;
        let summary = done.result.expect("a drained stop");
        assert!(summary.received < 1000, "stopped too late: {summary:?}");
        assert_eq!(summary.loaded, summary.received, "{summary:?}");
        let acknowledged = assert_acknowledged_after_commit(&log_of(&done.log));
        assert_eq!(acknowledged.len() as u64, summary.received);
        assert_eq!(done.stats.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_cannot_finish_times_out_and_acknowledges_nothing() {
        let stuck = |log: &Log| {
            vec![FakeCommitter {
                stuck: true,
                ..committer(log, Duration::ZERO)
            }]
        };
        let started = tokio::time::Instant::now();
        let done = run(50, stuck, Some(Duration::from_secs(1))).await;
        match done.result {
            Err(PipelineError::DrainTimeout {
                timeout,
                unfinished,
            }) => {
                assert_eq!(timeout, Duration::from_secs(5));
                assert!(unfinished.contains(&"sink"), "{unfinished:?}");
            }
            other => panic!("expected a drain timeout, got {other:?}"),
        }
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(6),
            "stop at 1 s, then 5 s of drain"
        );
        assert_eq!(log_of(&done.log), [Event::Finished], "nothing acknowledged");
    }

    #[tokio::test(start_paused = true)]
    async fn fenced_messages_are_neither_loaded_nor_acknowledged() {
        let fencing = |log: &Log| {
            vec![FakeCommitter {
                fenced: |meta| handle(meta).ends_with('7'),
                ..committer(log, Duration::from_millis(10))
            }]
        };
        let done = run(30, fencing, None).await;
        let summary = done.result.expect("a clean run");
        assert_eq!((summary.loaded, summary.released), (27, 3));
        let acknowledged = assert_acknowledged_after_commit(&log_of(&done.log));
        assert!(acknowledged.iter().all(|h| !h.ends_with('7')));
        assert_eq!(
            done.stats.in_flight(),
            0,
            "dropped messages do not stay in flight"
        );
    }

    /// A background task that fails after `after`, by panicking or with an error.
    fn failing(after: Duration, panics: bool) -> BackgroundTask {
        BackgroundTask::new("visibility extender", move |_stop| async move {
            tokio::time::sleep(after).await;
            if panics {
                panic!("injected fault");
            }
            Err(BackgroundError::new(std::io::Error::other(
                "injected fault",
            )))
        })
    }

    /// A background task that dies (panic or error) stops the run: everything received is still
    /// committed and acknowledged, as after a signal, and the run ends with an error naming it.
    #[tokio::test(start_paused = true)]
    async fn a_failing_background_task_ends_the_run_after_the_drain() {
        for panics in [true, false] {
            let one = |log: &Log| vec![committer(log, Duration::from_millis(100))];
            let fault = failing(Duration::from_millis(250), panics);
            let done = run_with(1000, one, None, vec![fault]).await;
            match &done.result {
                Err(PipelineError::Task("visibility extender", _)) if panics => {}
                Err(PipelineError::Background("visibility extender", _)) if !panics => {}
                other => panic!("expected the extender's failure, got {other:?}"),
            }
            let summary = done.stats.summary();
            assert!(
                summary.received > 0 && summary.received < 1000,
                "{summary:?}"
            );
            assert_eq!(summary.loaded, summary.received, "drained: {summary:?}");
            let events = log_of(&done.log);
            let acknowledged = assert_acknowledged_after_commit(&events);
            assert_eq!(acknowledged.len() as u64, summary.received);
            assert_eq!(events.last(), Some(&Event::Finished));
        }
    }

    /// Background tasks are stopped once the stages are done, before the acknowledger finishes.
    #[tokio::test(start_paused = true)]
    async fn background_tasks_stop_when_the_run_ends() {
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = stopped.clone();
        let task = BackgroundTask::new("visibility extender", move |stop| async move {
            stop.cancelled().await;
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        });
        let one = |log: &Log| vec![committer(log, Duration::from_millis(10))];
        let done = run_with(20, one, None, vec![task]).await;
        assert_eq!(done.result.expect("a clean run").loaded, 20);
        assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
    }

    fn limits(timeout: u64) -> DrainLimits {
        DrainLimits {
            timeout: Duration::from_secs(timeout),
            receive_allowance: Duration::from_secs(20),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_failure_stops_the_rest_which_drain() {
        let token = Shutdown::new();
        let mut tasks = StageTasks::default();
        tasks.spawn("sink", async {
            Err(PipelineError::Sink(SinkError::AcknowledgerStopped))
        });
        let waiting = token.clone();
        tasks.spawn("source", async move {
            waiting.requested().await;
            Ok(())
        });
        let result = supervise(tasks, &mut Background::default(), &token, limits(5)).await;
        assert!(
            matches!(
                result,
                Err(PipelineError::Sink(SinkError::AcknowledgerStopped))
            ),
            "{result:?}"
        );
        assert!(token.is_requested());
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_named() {
        let token = Shutdown::new();
        let mut tasks = StageTasks::default();
        tasks.spawn("transform", async { panic!("a bug") });
        let result = supervise(tasks, &mut Background::default(), &token, limits(5)).await;
        assert!(
            matches!(result, Err(PipelineError::Task("transform", _))),
            "{result:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stop_adds_the_receive_allowance_to_the_drain() {
        let token = Shutdown::new();
        let mut tasks = StageTasks::default();
        tasks.spawn("source", std::future::pending());
        token.stop_after_receives();
        let started = tokio::time::Instant::now();
        let result = supervise(tasks, &mut Background::default(), &token, limits(5)).await;
        assert!(
            matches!(&result, Err(PipelineError::DrainTimeout { unfinished, .. }) if unfinished == &["source"]),
            "{result:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(25));
    }
}
