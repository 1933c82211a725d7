//! Everything that talks to PostgreSQL: the sink alone at three batch sizes (and with the dedupe
//! ledger), the whole pipeline from the in-memory source into PostgreSQL, the same two with the
//! Kinesis source's commit record (fenced shard checkpoints, every batch holding messages of 4 or of
//! 64 shards), and, on the same rows, PostgreSQL's own ceiling (one connection doing binary COPY of
//! pre-encoded batches) and a naive loader (one autocommitted INSERT per row).
//!
//! ```sh
//! make up                                     # PostgreSQL, writes .stack/env
//! set -a && . .stack/env && set +a
//! cargo bench --bench postgres                # about a minute and a half
//! cargo bench --bench postgres -- pipeline    # one group
//! cargo bench --bench postgres -- kinesis     # the Kinesis commit record, sink and pipeline
//! ```
//!
//! The database is `SLUICE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! Each run works in its own schema `bench_<pid>` and drops it at the end; tables are truncated
//! between iterations, outside the timed part. Knobs: `SLUICE_BENCH_PIPELINE_MESSAGES` (default
//! 600,000 messages per pipeline iteration, also the COPY ceiling's row source: enough that filling
//! the pipeline at the start and committing its last batch at the end weigh little against the
//! steady rate an operator plans with) and
//! `SLUICE_BENCH_NAIVE_ROWS` (default 2,000 rows per naive-loader iteration).
//!
//! The report's comparisons of one measurement with another (the pipeline, and the pipeline with
//! Kinesis checkpoints, against the ceiling and each other; the sink with the ledger, and with
//! checkpoints, against without) are also measured in paired rounds, `SLUICE_BENCH_PAIRED_ROUNDS`
//! of each (default 9), the sides back to back from emptied tables, so that the machine's drift
//! between criterion groups minutes apart does not enter them.
//!
//! Besides criterion's results, the run writes `target/bench/postgres-run.json`: the server's
//! version and durability settings, the paired rounds, and the pipeline's own counts, for the
//! capacity report.

mod common;

use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use futures::SinkExt;
use sluice::config::{Config, EnvOverrides};
use sluice::envelope::{AckToken, Envelope, MessageId, Meta};
use sluice::login_table::column_list;
use sluice::pg::Connector;
use sluice::pipeline::{Pipeline, RunOptions};
use sluice::sink::Committer;
use sluice::sink::batch::Batch;
use sluice::sink::commit_order::Turn;
use sluice::sink::commit_record::{CommitRecord, NoCommitRecord};
use sluice::sink::copy_encode::{copy_statement, encode_rows};
use sluice::sink::ledger::LedgerRecord;
use sluice::sink::postgres::{PgCopySink, PgCopySinkBuilder, SinkSettings};
use sluice::sink::schema::{self, DeadLetterColumns};
use sluice::source::NoAcknowledger;
use sluice::source::kinesis::KinesisAck;
use sluice::source::kinesis::api::ShardDescription;
use sluice::source::kinesis::lease::{LeaseClaim, LeaseScope, Leases, lease_ddl};
use sluice::source::kinesis::metrics::KinesisStats;
use sluice::source::kinesis::record::ShardCheckpoints;
use sluice::source::kinesis::sequence::SequenceNumber;
use sluice::source::memory::MemorySource;
use sluice::source::sqs::SqsLedgerKeys;
use sluice::stage::transform::LoginRow;
use sluice::stats::{Stats, Summary};
use sluice::table_name::{TableName, Tables};
use tokio::runtime::Runtime;
use tokio_postgres::Client;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pipeline's batch size in this benchmark and the COPY ceiling's (the backfill setting).
const BATCH_ROWS: usize = 10_000;
/// Truncate the sink's tables once this many rows have accumulated (never inside the timed part).
const TRUNCATE_AFTER_ROWS: usize = 300_000;
/// Shards the Kinesis benchmarks spread their messages over: a small stream and a large one.
const KINESIS_SHARDS: [usize; 2] = [4, 64];
/// How long the benchmark's leases last: longer than any run, so nothing needs renewing.
const BENCH_LEASE: Duration = Duration::from_secs(6 * 3600);

fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Where side results go: `target/bench/` (or `$CARGO_TARGET_DIR/bench/`).
fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench")
}

/// The benchmark's database: a runtime, an admin connection and a schema of its own, dropped when
/// the run ends (also when a benchmark panics).
struct Db {
    runtime: Runtime,
    url: String,
    schema: String,
    admin: Client,
    tables: Tables,
    dead_letter_columns: DeadLetterColumns,
    /// The Kinesis lease and checkpoint table, as `migrate` creates it for a Kinesis source.
    leases: TableName,
}

impl Db {
    fn open() -> Db {
        let url = std::env::var("SLUICE_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        // The daemon's runtime: multi-threaded, one worker per core.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut admin =
            match runtime.block_on(Connector::new(&url, CONNECT_TIMEOUT).connect("sluice-bench")) {
                Ok(client) => client,
                Err(e) => panic!(
                    "{}. Start PostgreSQL with `make up` (which writes SLUICE_TEST_DATABASE_URL to \
                     .stack/env), or point SLUICE_TEST_DATABASE_URL at a server.",
                    sluice::error_chain::Chain(&e)
                ),
            };
        let schema = format!("bench_{}", std::process::id());
        let table =
            |name: &str| TableName::parse(&format!("{schema}.{name}")).expect("a valid table name");
        let tables = Tables {
            target: table("user_logins"),
            dead_letter: table("user_logins_rejected"),
            ledger: table("sluice_ledger"),
        };
        let leases = table("kinesis_leases");
        let dead_letter_columns = runtime.block_on(async {
            admin
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .await
                .expect("drop a leftover bench schema");
            schema::migrate(&mut admin, &tables, true)
                .await
                .expect("create the bench tables");
            for statement in lease_ddl(&leases) {
                admin
                    .batch_execute(&statement)
                    .await
                    .expect("create the lease table");
            }
            let columns = schema::verify(&admin, &tables, true)
                .await
                .expect("check the bench tables");
            // Autovacuum waking up on a freshly loaded table would steal CPU from whichever
            // benchmark happens to run then; the production tables keep it, the bench's do not.
            for table in [&tables.target, &tables.dead_letter, &tables.ledger] {
                admin
                    .batch_execute(&format!(
                        "ALTER TABLE {table} SET (autovacuum_enabled = off)"
                    ))
                    .await
                    .expect("turn autovacuum off for a bench table");
            }
            columns
        });
        Db {
            runtime,
            url,
            schema,
            admin,
            tables,
            dead_letter_columns,
            leases,
        }
    }

    fn execute(&self, sql: &str) {
        self.runtime
            .block_on(self.admin.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {}", sluice::pg::describe(&e)));
    }

    /// Empties the tables and starts every timed iteration from the same state: no Kinesis
    /// checkpoint yet (a run replays the same sequence numbers, which must not look like a step
    /// backwards), and a CHECKPOINT (outside the timing) so that no iteration pays for a checkpoint
    /// that an earlier one's WAL triggered. Needs the right to checkpoint (superuser or
    /// `pg_checkpoint`); without it the iterations are just noisier.
    fn truncate_all(&self) {
        let t = &self.tables;
        self.execute(&format!(
            "TRUNCATE {}, {}, {}",
            t.target, t.dead_letter, t.ledger
        ));
        self.execute(&format!(
            "UPDATE {} SET checkpoint = NULL, finished = false",
            self.leases
        ));
        if let Err(e) = self
            .runtime
            .block_on(self.admin.batch_execute("CHECKPOINT"))
        {
            eprintln!("CHECKPOINT not allowed ({e}); iterations may pay for checkpoints");
        }
    }

    fn count(&self, table: &TableName) -> i64 {
        self.runtime
            .block_on(
                self.admin
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[]),
            )
            .expect("count rows")
            .get(0)
    }

    /// How many shards of `stream` have a checkpoint.
    fn committed_checkpoints(&self, stream: &str) -> usize {
        let sql = format!(
            "SELECT count(checkpoint) FROM {} WHERE stream = $1",
            self.leases
        );
        let n: i64 = self
            .runtime
            .block_on(self.admin.query_one(&sql, &[&stream]))
            .expect("count checkpoints")
            .get(0);
        n as usize
    }

    fn connect(&self) -> Client {
        self.runtime
            .block_on(Connector::new(&self.url, CONNECT_TIMEOUT).connect("sluice-bench"))
            .expect("a second connection")
    }

    fn setting(&self, name: &str) -> String {
        self.runtime
            .block_on(self.admin.query_one(&format!("SHOW {name}"), &[]))
            .map(|row| row.get::<_, String>(0))
            .unwrap_or_else(|_| "unknown".into())
    }

    /// A committer, and the commit record its batches write: the dedupe ledger (keys scoped as an SQS
    /// queue's) or nothing.
    fn sink(&self, dedupe: bool) -> (PgCopySink, Arc<dyn CommitRecord>) {
        let settings = SinkSettings {
            connector: Connector::new(self.url.clone(), CONNECT_TIMEOUT),
            tables: self.tables.clone(),
            dead_letter_columns: self.dead_letter_columns,
            dead_letter_queue: None,
        };
        let record: Arc<dyn CommitRecord> = if dedupe {
            let keys = Arc::new(SqsLedgerKeys::new("arn:aws:sqs:bench"));
            Arc::new(LedgerRecord::new(&self.tables.ledger, keys))
        } else {
            Arc::new(NoCommitRecord)
        };
        let committer = PgCopySinkBuilder::new(settings, Arc::new(Stats::default()))
            .committer(Some(self.connect()));
        (committer, record)
    }

    /// A committer whose batches write the Kinesis source's commit record.
    fn kinesis_sink(&self) -> (PgCopySink, Arc<dyn CommitRecord>) {
        let (committer, _) = self.sink(false);
        let record = Arc::new(ShardCheckpoints::new(Arc::new(KinesisStats::default())));
        (committer, record)
    }

    /// The leases of `stream`, of `shards` shards, registered and taken by one owner as a Kinesis
    /// source does at start, so that the fenced checkpoint update finds its rows.
    fn shard_leases(&self, stream: &str, shards: usize) -> Vec<Arc<LeaseClaim>> {
        let scope = LeaseScope {
            table: self.leases.clone(),
            application: "bench".into(),
            stream: stream.to_owned(),
        };
        let leases = Leases::new(scope, "bench-owner", BENCH_LEASE);
        let described: Vec<ShardDescription> = (0..shards)
            .map(|i| ShardDescription {
                shard_id: format!("shardId-{i:012}"),
                parent_shard_id: None,
                adjacent_parent_shard_id: None,
                closed: false,
            })
            .collect();
        let ids: Vec<&str> = described.iter().map(|s| s.shard_id.as_str()).collect();
        let mut claims = self.runtime.block_on(async {
            leases
                .register(&self.admin, &described)
                .await
                .expect("register the shards");
            leases
                .acquire(&self.admin, &ids)
                .await
                .expect("take the leases")
        });
        assert_eq!(claims.len(), shards, "one owner takes every shard");
        claims.sort_by(|a, b| a.claim.shard_id.cmp(&b.claim.shard_id));
        claims.into_iter().map(|t| Arc::new(t.claim)).collect()
    }
}

/// A Kinesis sequence number of the usual 56 digits, the `n`th of the benchmark.
fn sequence(n: u64) -> SequenceNumber {
    SequenceNumber::parse(&format!("49590338271490256608559692538{n:027}"))
        .expect("a sequence number")
}

/// Makes `meta` a message read from `lease`'s shard at `sequence`, as a shard reader does.
fn read_from_shard(meta: &mut Meta, lease: &Arc<LeaseClaim>, sequence: SequenceNumber) {
    meta.message_id = MessageId::Text(format!("{}/{sequence}", lease.shard_id));
    meta.ack = AckToken::Kinesis(KinesisAck {
        lease: lease.clone(),
        sequence,
        user_record: 0,
        completes_record: true,
        ends_shard: false,
    });
}

impl Drop for Db {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        if let Err(e) = self.runtime.block_on(self.admin.batch_execute(&sql)) {
            eprintln!("could not drop the bench schema {}: {e}", self.schema);
        }
    }
}

/// A group for benchmarks whose iterations take milliseconds to seconds.
fn db_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    measurement: Duration,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(measurement);
    group
}

/// Gives a benchmark message its identity at the source: its id and its place among the messages.
type Identify = fn(&mut Meta, String, u64);

/// A committer and the commit record its batches write.
type Committing = (PgCopySink, Arc<dyn CommitRecord>);

/// Batches per side of a paired sink round: enough that a side lasts a good part of a second.
const SINK_PAIR_BATCHES: u64 = 100;

/// One paired round of the sink at 1,000 rows per batch, seconds per batch, measured back to back:
/// without a commit record, with the ledger for messages known by SQS message id and for producer
/// keys, and with the Kinesis checkpoints of each shard count measured.
struct SinkPair {
    plain: f64,
    ledger: f64,
    producer_ledger: f64,
    /// Shard count and seconds per batch.
    checkpoints: Vec<(usize, f64)>,
}

/// The committers the sink benchmarks kept, one connection each, for the paired rounds: the plain
/// sink, and each ledger with how its messages are identified.
struct SinkSides {
    plain: Committing,
    ledgers: Vec<(Committing, Identify)>,
    /// The last ledger key handed out: keys stay unique across the criterion samples and the rounds.
    key: u64,
}

/// `template`'s rows identified by fresh keys, counting on from the last handed out, `*key`.
fn keyed_rows(template: &[LoginRow], identify: Identify, key: &mut u64) -> Vec<LoginRow> {
    let pid = std::process::id();
    let mut rows = template.to_vec();
    for row in &mut rows {
        *key += 1;
        identify(&mut row.event.meta, format!("bench-{pid}-{key}"), *key);
    }
    rows
}

/// The SQS source's usual messages are known by message id, their keys ordered by
/// `SentTimestamp` (here 100 messages sent per millisecond); messages carrying a producer's
/// idempotency key are known by it, and their keys are unordered.
const LEDGER_KINDS: [(&str, Identify); 2] = [
    ("copy+ledger", |meta, id, n| {
        meta.message_id = MessageId::Text(id);
        meta.sent_at_ms = Some(common::SENT_AT_MS + (n / 100) as i64);
    }),
    ("copy+producer-ledger", |meta, id, _| {
        meta.dedupe_key = Some(id);
    }),
];

/// Rows per batch where the sink's commit records are compared.
const RECORD_BATCH_ROWS: usize = 1_000;

/// `PgCopySink::commit` of one batch of rows: a transaction with the binary COPY, at 100, 1,000 and
/// 10,000 rows, and at 1,000 with the dedupe ledger (every key new, as for fresh SQS traffic), for
/// messages known by their SQS message id (ordered keys) and by a producer's key (unordered).
/// Building, encoding and preparing the batch (the ledger's keys) is not timed: the batcher does it
/// while the previous batch commits. Returns the committers for the paired rounds
/// ([`paired_sinks`]), when the filter let every one of them run.
fn sink(c: &mut Criterion, db: &OnceCell<Db>, template: &[LoginRow]) -> Option<SinkSides> {
    assert!(template.len() >= 10_000);
    let mut group = db_group(c, "sink", Duration::from_secs(4));
    let mut pending = 0usize;
    let mut plain: Option<Committing> = None;
    for n in [100usize, RECORD_BATCH_ROWS, 10_000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("copy", n), |b| {
            let db = db.get_or_init(Db::open);
            let (sink, record) = plain.get_or_insert_with(|| db.sink(false));
            b.iter_custom(|iters| {
                timed_commits(db, sink, &**record, iters, &mut pending, || {
                    template[..n].to_vec()
                })
            })
        });
    }
    let n = RECORD_BATCH_ROWS;
    let mut key = 0u64;
    group.throughput(Throughput::Elements(n as u64));
    let mut ledgers: Vec<(Committing, Identify)> = Vec::with_capacity(LEDGER_KINDS.len());
    for (name, identify) in LEDGER_KINDS {
        // Criterion calls the closure once per sample: one committer, on one connection, serves
        // every sample, as in a running daemon and as for the plain sink above. (A committer per
        // sample made each sample pay a fresh backend's first transactions.)
        let mut held: Option<Committing> = None;
        group.bench_function(BenchmarkId::new(name, n), |b| {
            let db = db.get_or_init(Db::open);
            let (sink, record) = held.get_or_insert_with(|| db.sink(true));
            b.iter_custom(|iters| {
                timed_commits(db, sink, &**record, iters, &mut pending, || {
                    keyed_rows(&template[..n], identify, &mut key)
                })
            })
        });
        if let Some(committer) = held {
            ledgers.push((committer, identify));
        }
    }
    group.finish();
    let plain = plain?;
    (ledgers.len() == LEDGER_KINDS.len()).then_some(SinkSides {
        plain,
        ledgers,
        key,
    })
}

/// A committer with the Kinesis commit record, and the leases its batches are read under.
struct ShardCommitter {
    leases: Vec<Arc<LeaseClaim>>,
    sink: PgCopySink,
    record: Arc<dyn CommitRecord>,
}

/// `template`'s rows read from `leases`' shards in turn, from sequence number `*read` on.
fn shard_rows(template: &[LoginRow], leases: &[Arc<LeaseClaim>], read: &mut u64) -> Vec<LoginRow> {
    let mut rows = template.to_vec();
    for (i, row) in rows.iter_mut().enumerate() {
        *read += 1;
        read_from_shard(
            &mut row.event.meta,
            &leases[i % leases.len()],
            sequence(*read),
        );
    }
    rows
}

/// `PgCopySink::commit` of 1,000-row batches with the Kinesis source's commit record: the
/// messages of each batch spread evenly over 4, then 64 shards, so that every batch moves each
/// shard's fenced checkpoint (one locking SELECT and one UPDATE over the batch's shards). Compared
/// with `sink/copy/1000`, it gives what checkpointing costs per batch. The benchmark's parameter is
/// the shard count. Returns the committers that ran, with their shard counts, for the paired rounds.
fn kinesis_sink(
    c: &mut Criterion,
    db: &OnceCell<Db>,
    template: &[LoginRow],
) -> Vec<(usize, ShardCommitter)> {
    let n = RECORD_BATCH_ROWS;
    assert!(template.len() >= n);
    let mut group = db_group(c, "kinesis_sink", Duration::from_secs(4));
    group.throughput(Throughput::Elements(n as u64));
    let mut pending = 0usize;
    let mut read = 0u64;
    let mut kept = Vec::with_capacity(KINESIS_SHARDS.len());
    for shards in KINESIS_SHARDS {
        // Criterion calls the closure once per sample: the leases are taken once.
        let mut held: Option<ShardCommitter> = None;
        group.bench_function(BenchmarkId::new("checkpoints", shards), |b| {
            let db = db.get_or_init(Db::open);
            let committer = held.get_or_insert_with(|| {
                let (sink, record) = db.kinesis_sink();
                ShardCommitter {
                    leases: db.shard_leases(&format!("sink-{shards}"), shards),
                    sink,
                    record,
                }
            });
            let ShardCommitter {
                leases,
                sink,
                record,
            } = committer;
            b.iter_custom(|iters| {
                timed_commits(db, sink, &**record, iters, &mut pending, || {
                    shard_rows(&template[..n], leases, &mut read)
                })
            })
        });
        kept.extend(held.map(|committer| (shards, committer)));
    }
    group.finish();
    kept
}

/// The report's ledger target compares two sink rates, and its checkpoint costs are differences of
/// sink times; criterion measures the groups minutes apart, while this shared machine's speed
/// drifts by more than those margins, so the sides are also measured in rounds, back to back, on
/// the committers the criterion groups used. Each side commits [`SINK_PAIR_BATCHES`] batches of
/// the same 1,000 rows from emptied tables and a checkpoint, and the order flips every round so
/// that no side always follows another.
fn paired_sinks(
    db: &Db,
    template: &[LoginRow],
    sides: &mut SinkSides,
    shard_sides: &mut [(usize, ShardCommitter)],
    rounds: usize,
) -> Vec<SinkPair> {
    let template = &template[..RECORD_BATCH_ROWS];
    let mut pending = 0usize;
    let mut read = 0u64;
    let SinkSides {
        plain,
        ledgers,
        key,
    } = sides;
    // Side 0 is the plain sink, then one per kind of ledger key, then one per shard count.
    let ledger_sides = ledgers.len();
    let count = 1 + ledger_sides + shard_sides.len();
    (0..rounds)
        .map(|round| {
            let mut seconds = vec![0.0; count];
            for side in side_order(round, count) {
                db.truncate_all();
                pending = 0;
                let total = if side == 0 {
                    let (sink, record) = &mut *plain;
                    timed_commits(db, sink, &**record, SINK_PAIR_BATCHES, &mut pending, || {
                        template.to_vec()
                    })
                } else if let Some(((sink, record), identify)) = ledgers.get_mut(side - 1) {
                    let identify = *identify;
                    timed_commits(db, sink, &**record, SINK_PAIR_BATCHES, &mut pending, || {
                        keyed_rows(template, identify, key)
                    })
                } else {
                    let (_, committer) = &mut shard_sides[side - 1 - ledger_sides];
                    let ShardCommitter {
                        leases,
                        sink,
                        record,
                    } = committer;
                    timed_commits(db, sink, &**record, SINK_PAIR_BATCHES, &mut pending, || {
                        shard_rows(template, leases, &mut read)
                    })
                };
                seconds[side] = total.as_secs_f64() / SINK_PAIR_BATCHES as f64;
            }
            let pair = SinkPair {
                plain: seconds[0],
                ledger: seconds[1],
                producer_ledger: seconds[2],
                checkpoints: by_shards(shard_sides, &seconds[1 + ledger_sides..]),
            };
            let checkpoints: Vec<String> = pair
                .checkpoints
                .iter()
                .map(|(shards, s)| format!(", {:.2} with checkpoints over {shards} shards", s * 1e3))
                .collect();
            eprintln!(
                "paired sink round {}: ms per batch without a commit record {:.2}, with the ledger {:.2} (message ids), {:.2} (producer keys){}",
                round + 1,
                pair.plain * 1e3,
                pair.ledger * 1e3,
                pair.producer_ledger * 1e3,
                checkpoints.concat()
            );
            pair
        })
        .collect()
}

/// Commits `iters` batches of the rows `make_rows` returns, timing only the commits; `pending`
/// counts rows since the tables were last emptied, so they never grow through a long run.
fn timed_commits(
    db: &Db,
    sink: &mut PgCopySink,
    record: &dyn CommitRecord,
    iters: u64,
    pending: &mut usize,
    mut make_rows: impl FnMut() -> Vec<LoginRow>,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if *pending > TRUNCATE_AFTER_ROWS {
            db.truncate_all();
            *pending = 0;
        }
        let mut batch = Batch::new(make_rows(), Vec::new());
        batch.prepare(record);
        let n = batch.len();
        let started = Instant::now();
        let done = db
            .runtime
            .block_on(sink.commit(batch, record, &mut Turn::free()))
            .expect("commit");
        total += started.elapsed();
        assert_eq!(
            done.committed.iter().map(|c| c.batch.len()).sum::<usize>(),
            n
        );
        *pending += n;
    }
    total
}

/// What the end-to-end benchmark saw, for the report.
#[derive(Default, Clone, Copy)]
struct PipelineCounts {
    messages: usize,
    summary: Summary,
    rows_in_table: i64,
    dead_letters_in_table: i64,
}

fn pipeline_config(db: &Db) -> Config {
    let schema = &db.schema;
    let text = format!(
        r#"
[source]
kind = "file"
[source.file]
path = "unused"

[sink.postgres]
table = "{schema}.user_logins"
ledger_table = "{schema}.sluice_ledger"
dedupe = false
batch_rows = {BATCH_ROWS}
linger_ms = 50

[dead_letter]
table = "{schema}.user_logins_rejected"
"#
    );
    let env = EnvOverrides {
        mask_key: Some(String::from_utf8(common::BENCH_KEY.to_vec()).expect("ascii key")),
        database_url: Some(db.url.clone()),
        ..Default::default()
    };
    Config::from_toml(&text, Path::new("bench-pipeline.toml"), env)
        .expect("the bench configuration is valid")
}

/// The whole pipeline: in-memory source → parse → mask/transform → batcher → PgCopySink →
/// acknowledger, every message committed and acknowledged before the run returns. Timed: the run
/// only; `Pipeline::prepare` (connecting, checking the tables) and cloning the input are not.
fn pipeline(c: &mut Criterion, db: &OnceCell<Db>, bodies: &[String], counts: &mut PipelineCounts) {
    let n = bodies.len();
    let template = common::envelopes(bodies);
    let mut group = db_group(c, "pipeline", Duration::from_secs(12));
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(BenchmarkId::new("memory_to_postgres", n), |b| {
        let db = db.get_or_init(Db::open);
        let config = pipeline_config(db);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (elapsed, summary) = pipeline_once(db, &config, &template, no_record());
                assert_eq!(summary.received as usize, n);
                assert_eq!((summary.loaded + summary.rejected) as usize, n);
                counts.summary = summary;
                total += elapsed;
            }
            counts.messages = n;
            counts.rows_in_table = db.count(&db.tables.target);
            counts.dead_letters_in_table = db.count(&db.tables.dead_letter);
            total
        })
    });
    group.finish();
}

/// The in-memory source's own commit record: nothing.
fn no_record() -> Arc<dyn CommitRecord> {
    Arc::new(NoCommitRecord)
}

/// The pipeline's messages read from a stream's shards, and the commit record that checkpoints
/// them: what a Kinesis pipeline run starts from.
type ShardMessages = (Vec<Envelope>, Arc<dyn CommitRecord>);

/// The whole pipeline as [`pipeline`] runs it, with the messages read from Kinesis: spread evenly
/// over 4, then 64 shards (each held under a lease), so that every 10,000-row batch commits with a
/// fenced checkpoint for each shard, in the order they were read as the Kinesis source's record
/// requires (on the default two connections: each batch's COPY overlaps the COMMIT before it). The benchmark's parameter is the shard count.
fn kinesis_pipeline(
    c: &mut Criterion,
    db: &OnceCell<Db>,
    bodies: &[String],
) -> Vec<(usize, ShardMessages)> {
    let n = bodies.len();
    let mut group = db_group(c, "kinesis_pipeline", Duration::from_secs(12));
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(n as u64));
    let mut kept = Vec::with_capacity(KINESIS_SHARDS.len());
    for shards in KINESIS_SHARDS {
        let stream = format!("pipeline-{shards}");
        // Criterion calls the closure once per sample: the leases are taken and the messages
        // made once.
        let mut made: Option<ShardMessages> = None;
        group.bench_function(BenchmarkId::new("checkpoints", shards), |b| {
            let db = db.get_or_init(Db::open);
            let config = pipeline_config(db);
            let (template, record) = made.get_or_insert_with(|| {
                let leases = db.shard_leases(&stream, shards);
                let mut template = common::envelopes(bodies);
                for (i, envelope) in template.iter_mut().enumerate() {
                    let lease = &leases[i % shards];
                    read_from_shard(&mut envelope.meta, lease, sequence(i as u64 + 1));
                }
                let record: Arc<dyn CommitRecord> =
                    Arc::new(ShardCheckpoints::new(Arc::new(KinesisStats::default())));
                (template, record)
            });
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (elapsed, summary) = pipeline_once(db, &config, template, record.clone());
                    assert_eq!((summary.loaded + summary.rejected) as usize, n);
                    total += elapsed;
                }
                assert_eq!(
                    db.committed_checkpoints(&stream),
                    shards,
                    "every shard checkpointed"
                );
                total
            })
        });
        kept.extend(made.map(|messages| (shards, messages)));
    }
    group.finish();
    kept
}

/// One pipeline run over `template` into emptied tables, its batches writing `record`; the time
/// excludes preparing.
fn pipeline_once(
    db: &Db,
    config: &Config,
    template: &[Envelope],
    record: Arc<dyn CommitRecord>,
) -> (Duration, Summary) {
    db.truncate_all();
    let envelopes: Vec<Envelope> = template.to_vec();
    db.runtime.block_on(async {
        let pipeline = Pipeline::prepare(config)
            .await
            .expect("prepare the pipeline");
        let source = MemorySource::build_with(
            envelopes,
            256,
            pipeline.stats(),
            Arc::new(NoAcknowledger),
            record,
        );
        let started = Instant::now();
        let summary = pipeline
            .run(source, RunOptions::default())
            .await
            .expect("the pipeline run");
        (started.elapsed(), summary)
    })
}

/// One ceiling run: the pre-encoded batches, each COPYed and committed on one connection.
fn ceiling_once(
    db: &Db,
    client: &mut tokio_postgres::Client,
    copy: &str,
    payloads: &[Bytes],
) -> Duration {
    db.truncate_all();
    let started = Instant::now();
    db.runtime.block_on(async {
        for payload in payloads {
            let tx = client.transaction().await.expect("begin");
            let sink = tx.copy_in::<_, Bytes>(copy).await.expect("COPY");
            futures::pin_mut!(sink);
            sink.send(payload.clone()).await.expect("COPY data");
            sink.finish().await.expect("COPY end");
            tx.commit().await.expect("commit");
        }
    });
    started.elapsed()
}

/// The order in which round `round` runs its `count` sides: reversed every other round, so that no
/// side always follows another.
fn side_order(round: usize, count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Each side's shard count with its seconds, `seconds` holding one entry per side in order.
fn by_shards<T>(sides: &[(usize, T)], seconds: &[f64]) -> Vec<(usize, f64)> {
    sides
        .iter()
        .zip(seconds)
        .map(|((shards, _), s)| (*shards, *s))
        .collect()
}

/// One round of the whole pipeline beside PostgreSQL's ceiling, seconds each: the pipeline, the
/// ceiling, and the pipeline with Kinesis checkpoints over each shard count measured.
struct PipelinePair {
    pipeline: f64,
    ceiling: f64,
    /// Shard count and seconds.
    checkpoints: Vec<(usize, f64)>,
}

/// The pipeline and the ceiling, and the pipeline with each stream's checkpoints, back to back,
/// `rounds` times (`SLUICE_BENCH_PAIRED_ROUNDS`, default 9): on a shared machine whose speed
/// drifts (other tenants, the host), the sides of a round see the same conditions, so a ratio
/// within a round is steadier than the ratio of two medians taken minutes apart. The ceiling sits
/// next to the plain pipeline and the Kinesis runs on its other side, and the order reverses every
/// other round, so that the target's two sides always run one after the other.
fn paired(
    db: &Db,
    bodies: &[String],
    streams: &[(usize, ShardMessages)],
    rounds: usize,
) -> Vec<PipelinePair> {
    let template = common::envelopes(bodies);
    let payloads = encoded_batches(&common::rows(bodies));
    let config = pipeline_config(db);
    let mut client = db.connect();
    let copy = copy_statement(&db.tables.target);
    let messages = template.len();
    // Side 0 is the ceiling, 1 the plain pipeline, then one per stream.
    let count = 2 + streams.len();
    (0..rounds)
        .map(|round| {
            let mut seconds = vec![0.0; count];
            for side in side_order(round, count) {
                let elapsed = match side {
                    0 => ceiling_once(db, &mut client, &copy, &payloads),
                    1 => pipeline_once(db, &config, &template, no_record()).0,
                    _ => {
                        let (_, (messages_read, record)) = &streams[side - 2];
                        let (elapsed, summary) =
                            pipeline_once(db, &config, messages_read, record.clone());
                        assert_eq!((summary.loaded + summary.rejected) as usize, messages);
                        elapsed
                    }
                };
                seconds[side] = elapsed.as_secs_f64();
            }
            let pair = PipelinePair {
                ceiling: seconds[0],
                pipeline: seconds[1],
                checkpoints: by_shards(streams, &seconds[2..]),
            };
            let checkpoints: Vec<String> = pair
                .checkpoints
                .iter()
                .map(|(shards, s)| format!(", with checkpoints over {shards} shards {s:.3} s"))
                .collect();
            eprintln!(
                "paired round {}: pipeline {:.3} s, ceiling {:.3} s{}",
                round + 1,
                pair.pipeline,
                pair.ceiling,
                checkpoints.concat()
            );
            pair
        })
        .collect()
}

/// The rows in COPY form, in batches of [`BATCH_ROWS`] as the pipeline commits them.
fn encoded_batches(rows: &[LoginRow]) -> Vec<Bytes> {
    rows.chunks(BATCH_ROWS)
        .map(|batch| encode_rows(batch.len(), batch.iter()))
        .collect()
}

/// PostgreSQL's own ceiling on the pipeline's rows: one connection, binary COPY of pre-encoded
/// batches of 10,000 rows, each its own transaction. And a naive loader: one prepared INSERT per
/// row, each its own autocommitted transaction, on fewer rows because it is slow.
fn ceiling(c: &mut Criterion, db: &OnceCell<Db>, bodies: &[String]) {
    let rows: Vec<LoginRow> = common::rows(bodies);
    let payloads = encoded_batches(&rows);
    let total_rows = rows.len();
    let naive_rows = count_from_env("SLUICE_BENCH_NAIVE_ROWS", 2_000).min(total_rows);
    let naive: Vec<NaiveRow> = rows[..naive_rows].iter().map(NaiveRow::from).collect();
    drop(rows);

    let mut group = db_group(c, "postgres_ceiling", Duration::from_secs(10));
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(total_rows as u64));
    group.bench_function(BenchmarkId::new("binary_copy", total_rows), |b| {
        let db = db.get_or_init(Db::open);
        let mut client = db.connect();
        let copy = copy_statement(&db.tables.target);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += ceiling_once(db, &mut client, &copy, &payloads);
            }
            assert_eq!(db.count(&db.tables.target) as usize, total_rows);
            total
        })
    });

    group.throughput(Throughput::Elements(naive_rows as u64));
    group.bench_function(BenchmarkId::new("naive_insert", naive_rows), |b| {
        let db = db.get_or_init(Db::open);
        let client = db.connect();
        let insert = format!(
            "INSERT INTO {} ({}) VALUES ($1, $2, $3, $4, $5, $6, $7::text::date)",
            db.tables.target,
            column_list()
        );
        let statement = db
            .runtime
            .block_on(client.prepare(&insert))
            .expect("prepare");
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                db.truncate_all();
                let started = Instant::now();
                db.runtime.block_on(async {
                    for row in &naive {
                        client
                            .execute(
                                &statement,
                                &[
                                    &row.user_id,
                                    &row.device_type,
                                    &row.masked_ip,
                                    &row.masked_device_id,
                                    &row.locale,
                                    &row.app_version,
                                    &row.create_date,
                                ],
                            )
                            .await
                            .expect("insert");
                    }
                });
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
}

/// A row as a per-message loader script would hold it: plain values, ready to bind.
struct NaiveRow {
    user_id: String,
    device_type: String,
    masked_ip: String,
    masked_device_id: String,
    locale: Option<String>,
    app_version: i32,
    create_date: String,
}

impl From<&LoginRow> for NaiveRow {
    fn from(row: &LoginRow) -> NaiveRow {
        let hex = |m: &sluice::stage::mask::Masked| m.to_text();
        NaiveRow {
            user_id: row.event.user_id().to_owned(),
            device_type: row.event.device_type().to_owned(),
            masked_ip: hex(&row.masked_ip),
            masked_device_id: hex(&row.masked_device_id),
            locale: row.event.locale().map(str::to_owned),
            app_version: row.app_version,
            create_date: row.create_date.format("%Y-%m-%d").to_string(),
        }
    }
}

/// Seconds per shard count, as the report reads them.
fn shard_seconds(sides: &[(usize, f64)]) -> Vec<serde_json::Value> {
    sides
        .iter()
        .map(|(shards, seconds)| serde_json::json!({"shards": shards, "seconds": seconds}))
        .collect()
}

/// Facts about the server and the pipeline run that the report states next to the numbers.
fn write_run_facts(
    db: &Db,
    counts: &PipelineCounts,
    pairs: &[PipelinePair],
    sink_pairs: &[SinkPair],
) {
    let dir = output_dir();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return;
    }
    let facts = serde_json::json!({
        "paired_seconds": pairs
            .iter()
            .map(|p| {
                serde_json::json!({
                    "pipeline": p.pipeline,
                    "ceiling": p.ceiling,
                    "checkpoints": shard_seconds(&p.checkpoints),
                })
            })
            .collect::<Vec<_>>(),
        "sink_paired_seconds": sink_pairs
            .iter()
            .map(|p| {
                serde_json::json!({
                    "plain": p.plain,
                    "ledger": p.ledger,
                    "producer_ledger": p.producer_ledger,
                    "checkpoints": shard_seconds(&p.checkpoints),
                })
            })
            .collect::<Vec<_>>(),
        "server_version": db.setting("server_version"),
        "synchronous_commit": db.setting("synchronous_commit"),
        "fsync": db.setting("fsync"),
        "shared_buffers": db.setting("shared_buffers"),
        "pipeline": {
            "messages": counts.messages,
            "received": counts.summary.received,
            "loaded": counts.summary.loaded,
            "rejected": counts.summary.rejected,
            "duplicates": counts.summary.duplicates,
            "rows_in_table": counts.rows_in_table,
            "dead_letters_in_table": counts.dead_letters_in_table,
        },
    });
    let path = dir.join("postgres-run.json");
    let text = format!("{facts:#}\n");
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    // Opened by the first benchmark that runs, so a filter that selects none needs no database.
    let db: OnceCell<Db> = OnceCell::new();
    let bodies = common::bodies(
        count_from_env("SLUICE_BENCH_PIPELINE_MESSAGES", 600_000),
        31,
    );
    let mut counts = PipelineCounts::default();
    let template = common::rows(&common::bodies(10_600, 21));
    let sides = sink(&mut c, &db, &template);
    let mut shard_sides = kinesis_sink(&mut c, &db, &template);
    let rounds = count_from_env("SLUICE_BENCH_PAIRED_ROUNDS", 9);
    let sink_pairs = match (db.get(), sides) {
        (Some(db), Some(mut sides)) => {
            paired_sinks(db, &template, &mut sides, &mut shard_sides, rounds)
        }
        _ => Vec::new(),
    };
    // Their connections are not needed by the benchmarks that follow.
    drop(shard_sides);
    pipeline(&mut c, &db, &bodies, &mut counts);
    let streams = kinesis_pipeline(&mut c, &db, &bodies);
    ceiling(&mut c, &db, &bodies);
    c.final_summary();
    if let Some(db) = db.get()
        && counts.messages > 0
    {
        let pairs = paired(db, &bodies, &streams, rounds);
        write_run_facts(db, &counts, &pairs, &sink_pairs);
    }
}
