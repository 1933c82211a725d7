//! The report's context: one struct per section, built from the measurements by the figures'
//! rules and handed to the templates, which only choose words and lay out tables.
//!
//! A new section is a struct here, a field of [`Report`], a builder fed by what it measured, and
//! a template under `xtask/templates/capacity/` included by `capacity.md`.

use anyhow::{Result, ensure};
use serde::Serialize;

use super::figures::{self, PerShardCost, ShardsNeeded};
use super::inputs::{Bench, Criterion, Machine, PostgresRun};
use crate::memory::MemoryResult;
use crate::stats;

/// What the project aims for; the report marks each as met or not.
const TARGET_PARSE: f64 = 1_000_000.0; // messages/s on one core
const TARGET_TRANSFORM: f64 = 1_000_000.0; // messages/s on one core
const TARGET_ENCODE: f64 = 3_000_000.0; // rows/s on one core
const TARGET_VS_COPY: f64 = 0.95; // pipeline rate / COPY ceiling
const TARGET_VS_NAIVE: f64 = 20.0; // pipeline rate / naive loader
const TARGET_RSS_MIB: f64 = 64.0; // peak RSS for the large memory run
const TARGET_LEDGER_SHARE: f64 = 0.6; // sink rate with the ledger / without, same batch size
const TARGET_VS_PSQL: f64 = 1.2; // the binary's rows/s over psql \copy's, large memory run
const RSS_GROWTH_TOLERANCE: f64 = 0.10; // "does not grow": large run's peak within 10% of the small one's

/// sluice's default `source.sqs.pollers`.
const DEFAULT_POLLERS: f64 = 4.0;
/// Receive latencies the poller table shows, in milliseconds.
const SQS_LATENCIES_MS: [f64; 3] = [20.0, 50.0, 100.0];
/// Example rates of the sizing tables, besides this machine's pipeline rate.
const POLLER_EXAMPLE_RATES: [f64; 2] = [10_000.0, 100_000.0];
const SHARD_EXAMPLE_RATES: [f64; 3] = [1_000.0, 10_000.0, 100_000.0];
/// The rate the "cores for sluice" example is worked for.
const CORES_EXAMPLE_RATE: f64 = 100_000.0;

/// Everything the templates see.
#[derive(Serialize)]
pub struct Report {
    pub run: Run,
    pub rules: Rules,
    pub targets: Targets,
    pub stages: Stages,
    pub hops: Hops,
    pub sink: Sink,
    pub end_to_end: EndToEnd,
    pub kinesis: Kinesis,
    pub memory: Memory,
    pub sizing: Sizing,
    /// The charts drawn beside the report, as the markdown links them.
    pub charts: Vec<ChartLink>,
}

/// A chart file beside the report.
#[derive(Serialize, Clone)]
pub struct ChartLink {
    /// The file name, relative to the report.
    pub file: String,
    pub title: String,
}

/// What the report is built from.
pub struct Measured {
    pub criterion: Criterion,
    pub postgres: PostgresRun,
    pub memory_large: MemoryResult,
    pub memory_small: MemoryResult,
    pub run: Run,
}

impl Report {
    pub fn build(measured: Measured) -> Result<Self> {
        let c = &measured.criterion;
        let stages = Stages::build(c)?;
        let end_to_end = EndToEnd::build(c, &measured.postgres)?;
        let sink = Sink::build(c, &measured.postgres)?;
        let kinesis = Kinesis::build(c, &measured.postgres, &end_to_end)?;
        let memory = Memory::build(measured.memory_large, measured.memory_small);
        let targets = Targets::build(&stages, &end_to_end, &sink, &memory);
        let sizing = Sizing::build(&stages, &end_to_end, &sink, &kinesis, &memory);
        Ok(Self {
            run: measured.run,
            rules: Rules::default(),
            targets,
            stages,
            hops: Hops::build(c)?,
            sink,
            end_to_end,
            kinesis,
            memory,
            sizing,
            charts: Vec::new(),
        })
    }
}

/// The header: when, where, by what.
#[derive(Serialize)]
pub struct Run {
    /// "YYYY-MM-DD HH:MM", UTC.
    pub measured: String,
    pub command: String,
    /// How long the whole run took, when its start is known.
    pub took: Option<String>,
    pub machine: Machine,
    /// The load average when the run started, and whether other work was running then.
    pub load: Option<Load>,
    pub postgres: Server,
    /// Share of the benchmark messages that are rejects.
    pub reject_share: f64,
    pub avg_message_bytes: f64,
}

#[derive(Serialize)]
pub struct Load {
    pub value: f64,
    pub busy: bool,
}

impl Load {
    /// A load of half the cores or more means the figures shared the machine.
    pub fn new(value: f64, cores: usize) -> Self {
        Self {
            value,
            busy: value >= 0.5 * cores.max(1) as f64,
        }
    }
}

#[derive(Serialize)]
pub struct Server {
    pub version: String,
    pub synchronous_commit: String,
    pub fsync: String,
    pub shared_buffers: String,
}

impl Server {
    pub fn of(run: &PostgresRun) -> Self {
        Self {
            version: run.server_version.clone(),
            synchronous_commit: run.synchronous_commit.clone(),
            fsync: run.fsync.clone(),
            shared_buffers: run.shared_buffers.clone(),
        }
    }
}

/// The report's fixed rules of thumb, so the prose states the numbers the arithmetic uses.
#[derive(Serialize)]
pub struct Rules {
    pub noisy_ci: f64,
    pub headroom: f64,
    pub sqs_batch: f64,
    pub kinesis_write_records: f64,
    pub default_pollers: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            noisy_ci: figures::NOISY_CI,
            headroom: figures::PLANNING_HEADROOM,
            sqs_batch: figures::SQS_BATCH,
            kinesis_write_records: figures::KINESIS_WRITE_RECORDS,
            default_pollers: DEFAULT_POLLERS,
        }
    }
}

/// A criterion result as the templates show it.
#[derive(Serialize)]
pub struct Measure {
    pub size: u64,
    pub elements: f64,
    pub rate: f64,
    pub rate_low: f64,
    pub rate_high: f64,
    pub noisy: bool,
    pub ns_per_element: f64,
    pub ms_per_iteration: f64,
}

impl From<&Bench> for Measure {
    fn from(b: &Bench) -> Self {
        Self {
            size: b.size(),
            elements: b.elements,
            rate: b.rate(),
            rate_low: b.rate_low(),
            rate_high: b.rate_high(),
            noisy: figures::is_noisy(b.rate_low(), b.rate_high(), b.rate()),
            ns_per_element: b.ns_per_element(),
            ms_per_iteration: b.ns / 1e6,
        }
    }
}

/// A goal and what was measured against it.
#[derive(Serialize)]
pub struct Target {
    pub goal: f64,
    pub measured: f64,
    pub met: bool,
}

impl Target {
    fn at_least(goal: f64, measured: f64) -> Self {
        Self {
            goal,
            measured,
            met: measured >= goal,
        }
    }

    fn at_most(goal: f64, measured: f64) -> Self {
        Self {
            goal,
            measured,
            met: measured <= goal,
        }
    }
}

#[derive(Serialize)]
pub struct Targets {
    pub parse: Target,
    pub transform: Target,
    pub encode: Target,
    pub vs_copy: Target,
    pub vs_naive: Target,
    pub rss_mib: Target,
    pub rss_growth: Target,
    pub vs_psql: Target,
    /// `None` when the plain sink was not measured at the ledger's batch size.
    pub ledger_share: Option<Target>,
}

impl Targets {
    fn build(stages: &Stages, end_to_end: &EndToEnd, sink: &Sink, memory: &Memory) -> Self {
        Self {
            parse: Target::at_least(TARGET_PARSE, stages.parse.rate),
            transform: Target::at_least(TARGET_TRANSFORM, stages.hmac.rate),
            encode: Target::at_least(TARGET_ENCODE, stages.slowest_encode_rate),
            vs_copy: Target::at_least(TARGET_VS_COPY, end_to_end.vs_copy),
            vs_naive: Target::at_least(TARGET_VS_NAIVE, end_to_end.vs_naive),
            rss_mib: Target::at_most(TARGET_RSS_MIB, memory.large.rss_mib),
            rss_growth: Target::at_most(RSS_GROWTH_TOLERANCE, memory.growth),
            vs_psql: Target::at_least(TARGET_VS_PSQL, memory.large.vs_psql),
            ledger_share: sink
                .ledger_cost
                .as_ref()
                .map(|cost| Target::at_least(TARGET_LEDGER_SHARE, cost.share)),
        }
    }
}

/// Each stage alone on one core, and what a message costs through all of them.
#[derive(Serialize)]
pub struct Stages {
    pub parse: Measure,
    pub hmac: Measure,
    pub salted: Measure,
    pub encodes: Vec<Measure>,
    pub slowest_encode_rate: f64,
    /// parse + mask/transform + the slowest encoding, ns of CPU per message.
    pub cpu_ns: f64,
    /// The channel hop the cost is computed with (the measured chunk size nearest a file chunk).
    pub hop_chunk: u64,
    /// `cpu_ns` plus the channel hops between the stages.
    pub cpu_ns_with_hops: f64,
    /// Messages per second one core carries through the stages.
    pub core_rate: f64,
}

impl Stages {
    fn build(c: &Criterion) -> Result<Self> {
        let parse = c.one("parse", "parse_chunk")?;
        let hmac = c.one("transform", "hmac-sha256")?;
        let encodes = c.all("encode", "encode_rows")?;
        let slowest = encodes
            .iter()
            .min_by(|a, b| a.rate().total_cmp(&b.rate()))
            .expect("at least one");
        let hops = c.all("channel_hop", "chunk")?;
        let hop = hops
            .iter()
            .min_by_key(|h| h.size().abs_diff(figures::COST_CHUNK))
            .expect("at least one");
        let cpu_ns = parse.ns_per_element() + hmac.ns_per_element() + slowest.ns_per_element();
        let cpu_ns_with_hops = cpu_ns + figures::STAGE_HOPS * hop.ns_per_element();
        Ok(Self {
            parse: (&parse).into(),
            hmac: (&hmac).into(),
            salted: (&c.one("transform", "salted-sha256")?).into(),
            slowest_encode_rate: slowest.rate(),
            encodes: encodes.iter().map(Measure::from).collect(),
            cpu_ns,
            hop_chunk: hop.size(),
            cpu_ns_with_hops,
            core_rate: figures::per_core_rate(cpu_ns_with_hops),
        })
    }
}

#[derive(Serialize)]
pub struct Hops {
    /// Messages each hop benchmark carries per iteration.
    pub messages: f64,
    pub rows: Vec<Hop>,
}

#[derive(Serialize)]
pub struct Hop {
    pub measure: Measure,
    pub ns_per_chunk: f64,
}

impl Hops {
    fn build(c: &Criterion) -> Result<Self> {
        let hops = c.all("channel_hop", "chunk")?;
        Ok(Self {
            messages: hops[0].elements,
            rows: hops
                .iter()
                .map(|h| Hop {
                    measure: h.into(),
                    ns_per_chunk: h.ns_per_element() * h.size() as f64,
                })
                .collect(),
        })
    }
}

/// The sink alone at several batch sizes, and with the dedupe ledger.
#[derive(Serialize)]
pub struct Sink {
    pub plain: Vec<Measure>,
    /// The ledger with the SQS source's usual keys: by message id, ordered by sent time.
    pub ledger: Measure,
    /// The ledger with producers' idempotency keys, which are unordered.
    pub producer_ledger: Measure,
    /// The producer keys' rate as a share of the plain sink's, when measured at the same size: the
    /// median of the paired rounds where the run has them, else the ratio of criterion medians.
    pub producer_ledger_share: Option<f64>,
    /// Producer keys ÷ plain in each paired round, smallest first (empty without them).
    pub producer_pair_ratios: Vec<f64>,
    /// The ledger's cost against the plain sink at the same batch size, when both were measured.
    pub ledger_cost: Option<LedgerCost>,
}

#[derive(Serialize)]
pub struct LedgerCost {
    /// Milliseconds per batch more than the plain sink: the median of the paired rounds where the
    /// run has them, else the difference of the two criterion medians.
    pub ms_per_batch: f64,
    /// The ledger's rate as a share of the plain sink's: the median of the paired rounds where the
    /// run has them, else the ratio of the two criterion medians.
    pub share: f64,
    /// Ledger ÷ plain in each paired round, smallest first (empty for a run without them).
    pub pair_ratios: Vec<f64>,
    /// The ratio of the two criterion medians, measured minutes apart.
    pub medians_share: f64,
}

impl Sink {
    fn build(c: &Criterion, run: &PostgresRun) -> Result<Self> {
        let plain = c.all("sink", "copy")?;
        let ledger = c.one("sink", "copy+ledger")?;
        let producer_ledger = c.one("sink", "copy+producer-ledger")?;
        let producer_pair_ratios = figures::producer_ledger_ratios(&run.sink_paired_seconds);
        let producer_ledger_share = plain
            .iter()
            .find(|p| p.size() == producer_ledger.size())
            .map(|p| {
                stats::median(&producer_pair_ratios).unwrap_or(producer_ledger.rate() / p.rate())
            });
        let ledger_cost = plain.iter().find(|p| p.size() == ledger.size()).map(|p| {
            let medians_share = ledger.rate() / p.rate();
            let pair_ratios = figures::ledger_ratios(&run.sink_paired_seconds);
            let pair_costs: Vec<f64> = run
                .sink_paired_seconds
                .iter()
                .map(|r| (r.ledger - r.plain) * 1e3)
                .collect();
            LedgerCost {
                ms_per_batch: stats::median(&pair_costs).unwrap_or((ledger.ns - p.ns) / 1e6),
                share: stats::median(&pair_ratios).unwrap_or(medians_share),
                pair_ratios,
                medians_share,
            }
        });
        Ok(Self {
            plain: plain.iter().map(Measure::from).collect(),
            ledger: (&ledger).into(),
            producer_ledger: (&producer_ledger).into(),
            producer_ledger_share,
            producer_pair_ratios,
            ledger_cost,
        })
    }
}

/// The whole pipeline beside PostgreSQL's own COPY ceiling and a naive loader.
#[derive(Serialize)]
pub struct EndToEnd {
    pub pipeline: Measure,
    pub ceiling: Measure,
    pub naive: Measure,
    pub messages: u64,
    pub loaded: u64,
    pub rejected: u64,
    /// Pipeline ÷ ceiling in each paired round, smallest first, and their median.
    pub pair_ratios: Vec<f64>,
    pub vs_copy: f64,
    /// The median ratio counting loaded rows only.
    pub vs_copy_rows: f64,
    /// The ratio of the two criterion medians, measured minutes apart.
    pub vs_copy_medians: f64,
    pub vs_naive: f64,
}

impl EndToEnd {
    fn build(c: &Criterion, run: &PostgresRun) -> Result<Self> {
        let pipeline = c.one("pipeline", "memory_to_postgres")?;
        let ceiling = c.one("postgres_ceiling", "binary_copy")?;
        let naive = c.one("postgres_ceiling", "naive_insert")?;
        let counts = run.pipeline;
        ensure!(
            counts.messages as f64 == pipeline.elements,
            "postgres-run.json and the pipeline result come from different runs ({} vs {} messages)",
            counts.messages,
            pipeline.elements
        );
        let pair_ratios = figures::paired_ratios(
            counts.messages as f64,
            ceiling.elements,
            &run.paired_seconds,
        );
        let Some(vs_copy) = stats::median(&pair_ratios) else {
            anyhow::bail!(
                "postgres-run.json has no paired rounds; run `cargo bench --bench postgres`"
            );
        };
        let loaded_share = counts.loaded as f64 / counts.messages as f64;
        Ok(Self {
            vs_copy_rows: vs_copy * loaded_share,
            vs_copy_medians: pipeline.rate() / ceiling.rate(),
            vs_naive: pipeline.rate() / naive.rate(),
            vs_copy,
            pair_ratios,
            messages: counts.messages,
            loaded: counts.loaded,
            rejected: counts.rejected,
            pipeline: (&pipeline).into(),
            ceiling: (&ceiling).into(),
            naive: (&naive).into(),
        })
    }
}

/// The Kinesis source's commit record, fenced shard checkpoints written in every batch's
/// transaction: what it costs the sink per batch, and what the whole pipeline keeps with it.
#[derive(Serialize)]
pub struct Kinesis {
    /// The sink alone with checkpoints, one row per shard count, fewest shards first.
    pub sink: Vec<KinesisSink>,
    /// The plain sink at the same batch size, the comparison for the checkpoints' cost.
    pub plain_sink: Option<Measure>,
    /// The checkpoints' cost per batch as a fixed part plus a part per shard.
    pub cost: Option<PerShardCost>,
    /// That cost spread over a pipeline batch with the most shards measured, µs per message.
    pub cost_per_message_us: Option<f64>,
    /// The most shards a measured pipeline batch carried.
    pub most_shards: u64,
    /// The whole pipeline with checkpoints, one row per shard count.
    pub pipeline: Vec<KinesisPipeline>,
    /// Rows per batch of the pipeline runs (the ceiling's batches too).
    pub pipeline_batch_rows: u64,
    /// The slowest of the Kinesis pipeline runs: what one process drains, for the sizing rules.
    pub drain_rate: f64,
    pub drain_shards: u64,
}

#[derive(Serialize)]
pub struct KinesisSink {
    pub shards: u64,
    pub measure: Measure,
    /// Milliseconds per batch more than the plain sink at the same batch size: the median of the
    /// paired rounds where the run has them, else the difference of the two criterion medians.
    pub ms_per_batch: Option<f64>,
    /// Its rate as a share of the plain sink's, from the same figures.
    pub share: Option<f64>,
    /// Checkpoints ÷ plain in each paired round, smallest first (empty without them).
    pub pair_ratios: Vec<f64>,
}

#[derive(Serialize)]
pub struct KinesisPipeline {
    pub shards: u64,
    pub measure: Measure,
    /// Its rate as a share of the pipeline without a commit record, and of the COPY ceiling: the
    /// medians of the paired rounds where the run has them, else ratios of criterion medians
    /// measured minutes apart.
    pub vs_pipeline: f64,
    pub vs_copy: f64,
    /// Its rate over the plain pipeline's in each paired round, smallest first (empty without them).
    pub pair_ratios: Vec<f64>,
}

/// The Kinesis pipeline runs commit batches of this many rows (`batch_rows` in the benchmark).
const PIPELINE_BATCH_ROWS: u64 = 10_000;

impl Kinesis {
    fn build(c: &Criterion, run: &PostgresRun, end_to_end: &EndToEnd) -> Result<Self> {
        let sinks = c.all("kinesis_sink", "checkpoints")?;
        let plain = c.all("sink", "copy")?;
        // The benchmark's parameter is the shard count; its elements are the rows per batch.
        let plain_sink = plain
            .iter()
            .find(|p| p.elements == sinks[0].elements)
            .cloned();
        let rounds = &run.sink_paired_seconds;
        let sink: Vec<KinesisSink> = sinks
            .iter()
            .map(|k| {
                let shards = k.size();
                let pair_ratios = figures::checkpoint_ratios(rounds, shards);
                let pair_costs = figures::checkpoint_costs_ms(rounds, shards);
                KinesisSink {
                    shards,
                    measure: k.into(),
                    ms_per_batch: stats::median(&pair_costs)
                        .or_else(|| plain_sink.as_ref().map(|p| (k.ns - p.ns) / 1e6)),
                    share: stats::median(&pair_ratios)
                        .or_else(|| plain_sink.as_ref().map(|p| k.rate() / p.rate())),
                    pair_ratios,
                }
            })
            .collect();
        let points: Vec<(f64, f64)> = sink
            .iter()
            .filter_map(|k| Some((k.shards as f64, k.ms_per_batch?)))
            .collect();
        let pipelines = c.all("kinesis_pipeline", "checkpoints")?;
        let pipeline: Vec<KinesisPipeline> = pipelines
            .iter()
            .map(|k| {
                let shards = k.size();
                let pair_ratios = figures::stream_vs_pipeline(&run.paired_seconds, shards);
                let vs_copy = figures::stream_vs_copy(
                    end_to_end.messages as f64,
                    end_to_end.ceiling.elements,
                    &run.paired_seconds,
                    shards,
                );
                KinesisPipeline {
                    shards,
                    measure: k.into(),
                    vs_pipeline: stats::median(&pair_ratios)
                        .unwrap_or(k.rate() / end_to_end.pipeline.rate),
                    vs_copy: stats::median(&vs_copy).unwrap_or(k.rate() / end_to_end.ceiling.rate),
                    pair_ratios,
                }
            })
            .collect();
        let slowest = pipelines
            .iter()
            .min_by(|a, b| a.rate().total_cmp(&b.rate()))
            .expect("at least one");
        let cost = figures::per_shard_cost(&points);
        let most_shards = pipeline.iter().map(|k| k.shards).max().unwrap_or(0);
        Ok(Self {
            cost_per_message_us: cost.map(|c| {
                (c.fixed_ms + c.per_shard_ms * most_shards as f64) * 1000.0
                    / PIPELINE_BATCH_ROWS as f64
            }),
            cost,
            most_shards,
            plain_sink: plain_sink.as_ref().map(Measure::from),
            sink,
            pipeline,
            pipeline_batch_rows: PIPELINE_BATCH_ROWS,
            drain_rate: slowest.rate(),
            drain_shards: slowest.size(),
        })
    }
}

/// The memory runs of the release binary.
#[derive(Serialize)]
pub struct Memory {
    pub large: MemoryRow,
    pub small: MemoryRow,
    /// Peak RSS growth from the small run to the large one.
    pub growth: f64,
    pub growth_tolerance: f64,
    /// How many times more messages the large run has.
    pub ratio: f64,
    pub runs: usize,
    /// CPU microseconds per message of the large run.
    pub cpu_us_per_message: f64,
}

#[derive(Serialize)]
pub struct MemoryRow {
    pub messages: u64,
    pub file_mib: f64,
    pub rss_mib: f64,
    pub rss_mib_min: f64,
    pub rss_mib_max: f64,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    pub rate: f64,
    pub loaded: u64,
    pub rejected: u64,
    pub avg_message_bytes: f64,
    /// Loaded rows per second of the binary (median wall time), and of `psql \copy`.
    pub row_rate: f64,
    pub psql_seconds: f64,
    pub psql_rate: f64,
    pub vs_psql: f64,
    pub psql_each: Vec<f64>,
}

impl From<&MemoryResult> for MemoryRow {
    fn from(m: &MemoryResult) -> Self {
        Self {
            messages: m.messages,
            file_mib: m.file_bytes as f64 / 1024.0 / 1024.0,
            rss_mib: m.max_rss_mib,
            rss_mib_min: m.max_rss_mib_min,
            rss_mib_max: m.max_rss_mib_max,
            wall_seconds: m.wall_seconds,
            cpu_seconds: m.user_seconds + m.system_seconds,
            rate: m.messages_per_second,
            loaded: m.loaded,
            rejected: m.rejected,
            avg_message_bytes: m.avg_message_bytes,
            row_rate: m.loaded as f64 / m.wall_seconds,
            psql_seconds: m.psql_copy_seconds,
            psql_rate: m.loaded as f64 / m.psql_copy_seconds,
            vs_psql: m.vs_psql,
            psql_each: m.each_psql_copy_seconds.clone(),
        }
    }
}

impl Memory {
    fn build(large: MemoryResult, small: MemoryResult) -> Self {
        Self {
            growth: figures::growth(large.max_rss_mib, small.max_rss_mib),
            growth_tolerance: RSS_GROWTH_TOLERANCE,
            ratio: large.messages as f64 / small.messages as f64,
            runs: large.runs,
            cpu_us_per_message: figures::cpu_us_per_message(
                large.user_seconds,
                large.system_seconds,
                large.messages as f64,
            ),
            large: (&large).into(),
            small: (&small).into(),
        }
    }
}

/// The sizing rules with this machine's numbers plugged in.
#[derive(Serialize)]
pub struct Sizing {
    pub pollers: Pollers,
    pub shards: Shards,
    pub database: Database,
}

#[derive(Serialize)]
pub struct Pollers {
    pub rates: Vec<f64>,
    pub rows: Vec<PollerRow>,
    /// What the default pollers carry at 50 ms.
    pub default_intake: f64,
    /// The sink's rate with the ledger at the default batch size.
    pub ledger_rate: f64,
}

#[derive(Serialize)]
pub struct PollerRow {
    pub latency_ms: f64,
    pub per_poller: f64,
    pub needed: Vec<u64>,
}

#[derive(Serialize)]
pub struct Shards {
    pub message_bytes: f64,
    pub record_limit_decides: bool,
    /// KiB/s of one shard's record limit at this message size.
    pub record_limit_kib: f64,
    pub rows: Vec<ShardRow>,
    /// The measured Kinesis pipeline rate (the slowest shard count) and the rate to plan with.
    pub drain_rate: f64,
    pub drain_shards: u64,
    pub plan_drain: f64,
    /// Shards one process keeps up with when each is written at its full record rate.
    pub shards_at_write_limit: f64,
    /// Messages per second one shard is read at while catching up, and how many shards one
    /// process drains at that speed at once.
    pub catch_up_per_shard: f64,
    pub shards_catching_up: f64,
    /// What the checkpoints cost per batch, when the sink was measured beside them.
    pub cost: Option<PerShardCost>,
    /// The most shards a measured batch carried checkpoints for.
    pub most_shards_measured: u64,
}

#[derive(Serialize)]
pub struct ShardRow {
    pub rate: f64,
    pub mib_per_second: f64,
    pub need: ShardsNeeded,
    /// sluice processes needed at the planned Kinesis pipeline rate.
    pub processes: u64,
    pub this_machine: bool,
}

#[derive(Serialize)]
pub struct Database {
    pub pipeline_rate: f64,
    pub plan_pipeline: f64,
    pub ledger_rate: f64,
    pub plan_ledger: f64,
    pub copy_rate: f64,
    pub plan_copy: f64,
    pub stage_us_per_message: f64,
    pub binary_us_per_message: f64,
    pub binary_messages: u64,
    pub example_rate: f64,
    pub example_cores: f64,
}

impl Sizing {
    fn build(
        stages: &Stages,
        end_to_end: &EndToEnd,
        sink: &Sink,
        kinesis: &Kinesis,
        memory: &Memory,
    ) -> Self {
        let pipeline_rate = end_to_end.pipeline.rate;
        let poller_rates = figures::table_rates(&POLLER_EXAMPLE_RATES, pipeline_rate);
        let bytes = memory.large.avg_message_bytes;
        let drain = kinesis.drain_rate;
        let plan_drain = figures::planned(drain);
        let kinesis_machine = figures::round_to_thousand(drain);
        let catch_up = figures::catch_up_rate_per_shard(bytes);
        Self {
            pollers: Pollers {
                rows: SQS_LATENCIES_MS
                    .iter()
                    .map(|&ms| PollerRow {
                        latency_ms: ms,
                        per_poller: figures::poller_rate(ms),
                        needed: poller_rates
                            .iter()
                            .map(|&r| figures::pollers_needed(r, ms))
                            .collect(),
                    })
                    .collect(),
                rates: poller_rates,
                default_intake: DEFAULT_POLLERS * figures::poller_rate(50.0),
                ledger_rate: sink.ledger.rate,
            },
            shards: Shards {
                message_bytes: bytes,
                record_limit_decides: figures::record_limit_decides(bytes),
                record_limit_kib: bytes * figures::KINESIS_WRITE_RECORDS / 1024.0,
                rows: figures::table_rates(&SHARD_EXAMPLE_RATES, drain)
                    .into_iter()
                    .map(|rate| ShardRow {
                        rate,
                        mib_per_second: rate * bytes / 1024.0 / 1024.0,
                        need: figures::shards_needed(rate, bytes),
                        processes: figures::processes_needed(rate, plan_drain),
                        this_machine: rate == kinesis_machine,
                    })
                    .collect(),
                drain_rate: drain,
                drain_shards: kinesis.drain_shards,
                plan_drain,
                shards_at_write_limit: figures::shards_drained(
                    plan_drain,
                    figures::KINESIS_WRITE_RECORDS,
                ),
                catch_up_per_shard: catch_up,
                shards_catching_up: figures::shards_drained(plan_drain, catch_up),
                cost: kinesis.cost,
                most_shards_measured: kinesis
                    .sink
                    .iter()
                    .map(|k| k.shards)
                    .chain(kinesis.pipeline.iter().map(|k| k.shards))
                    .max()
                    .unwrap_or(0),
            },
            database: Database {
                pipeline_rate,
                plan_pipeline: figures::planned(pipeline_rate),
                ledger_rate: sink.ledger.rate,
                plan_ledger: figures::planned(sink.ledger.rate),
                copy_rate: end_to_end.ceiling.rate,
                plan_copy: figures::planned(end_to_end.ceiling.rate),
                stage_us_per_message: stages.cpu_ns_with_hops / 1000.0,
                binary_us_per_message: memory.cpu_us_per_message,
                binary_messages: memory.large.messages,
                example_rate: CORES_EXAMPLE_RATE,
                example_cores: figures::cores_needed(CORES_EXAMPLE_RATE, memory.cpu_us_per_message),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_of_half_the_cores_is_busy() {
        assert!(Load::new(1.2, 2).busy);
        assert!(!Load::new(0.4, 2).busy);
        assert!(
            Load::new(0.5, 0).busy,
            "no core count: judged against one core"
        );
    }

    #[test]
    fn targets_compare_in_their_direction() {
        assert!(Target::at_least(1.0, 1.0).met);
        assert!(!Target::at_least(1.0, 0.99).met);
        assert!(Target::at_most(64.0, 54.0).met);
        assert!(!Target::at_most(0.1, 0.11).met);
    }
}
