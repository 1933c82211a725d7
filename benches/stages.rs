//! The CPU-bound stages, each alone on one core, and the cost of a channel hop between stages.
//!
//! ```sh
//! cargo bench --bench stages                 # everything here, about a minute
//! cargo bench --bench stages -- parse        # one group
//! ```
//!
//! Every benchmark reports throughput in messages (or rows): criterion prints it as `elem/s`.
//! Inputs are built outside the timed part (`iter_batched`, or `iter_custom` timing only the work),
//! so each number is the stage's own cost. `SLUICE_BENCH_SECONDS` sets the measurement time of each
//! benchmark (default 3 s).

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use sluice::envelope::{Chunk, Envelope};
use sluice::sink::copy_encode::encode_rows;
use sluice::stage::mask::MaskMode;
use sluice::stage::parse::{LoginEvent, parse_chunk};
use tokio::sync::mpsc;

/// Messages per chunk for the parse and transform stages: the file source's default chunk.
const CHUNK: usize = 256;
/// Distinct chunks the stage benchmarks rotate through, so they do not see one chunk only.
const POOL_CHUNKS: usize = 32;
/// Messages per channel, the pipeline's default `pipeline.channel_capacity`; the daemon turns it
/// into whole chunks, at least two.
const CHANNEL_MESSAGES: usize = 2048;
/// Messages carried per channel-hop iteration.
const HOP_MESSAGES: usize = 100_000;

fn configured<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(common::seconds_from_env("SLUICE_BENCH_SECONDS", 3.0));
    group.sample_size(50);
    group
}

/// `parse_chunk` on chunks of 256 realistic bodies, about 2.4% of them rejects.
fn parse(c: &mut Criterion) {
    let bodies = common::bodies(CHUNK * POOL_CHUNKS, 11);
    let pool: Vec<Vec<Envelope>> = common::into_chunks(common::envelopes(&bodies), CHUNK);
    let mut next = 0usize;
    let mut group = configured(c, "parse");
    group.throughput(Throughput::Elements(CHUNK as u64));
    group.bench_function(BenchmarkId::new("parse_chunk", CHUNK), |b| {
        b.iter_batched(
            || {
                next = (next + 1) % pool.len();
                Chunk::new(pool[next].clone())
            },
            |chunk| parse_chunk(black_box(chunk)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Chunks of exactly `CHUNK` valid events.
fn event_pool() -> Vec<Vec<LoginEvent>> {
    let bodies = common::bodies(CHUNK * (POOL_CHUNKS + 2), 12);
    let (events, _) = common::events(&bodies);
    let mut pool = common::into_chunks(events, CHUNK);
    pool.retain(|c| c.len() == CHUNK);
    pool.truncate(POOL_CHUNKS);
    pool
}

/// `Transformer::transform_chunk`: two keyed masks, the version and the date per message.
fn transform(c: &mut Criterion) {
    let pool = event_pool();
    let mut group = configured(c, "transform");
    group.throughput(Throughput::Elements(CHUNK as u64));
    for (name, mode) in [
        ("hmac-sha256", MaskMode::HmacSha256),
        ("salted-sha256", MaskMode::SaltedSha256),
    ] {
        let transformer = common::transformer(mode);
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new(name, CHUNK), |b| {
            b.iter_batched(
                || {
                    next = (next + 1) % pool.len();
                    Chunk::new(pool[next].clone())
                },
                |chunk| transformer.transform_chunk(black_box(chunk)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// `encode_rows`: rows to one binary COPY payload, at the default batch size and the backfill one.
fn encode(c: &mut Criterion) {
    let rows = common::rows(&common::bodies(10_500, 13));
    let mut group = configured(c, "encode");
    for n in [1_000usize, 10_000] {
        let slice = &rows[..n];
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("encode_rows", n), |b| {
            b.iter(|| encode_rows(slice.len(), black_box(slice).iter()))
        });
    }
    group.finish();
}

/// One bounded tokio channel between two tasks on the daemon's runtime (multi-threaded, one worker
/// per core), carrying `HOP_MESSAGES` messages in chunks of 1 to 1,000: what a stage boundary costs
/// per message at each chunk size. The same chunks travel in every iteration (the receiver hands them
/// back), so nothing is built or dropped in the timed part; spawning the two tasks is timed, which
/// adds a fixed few microseconds per iteration (visible only at 1,000 messages per chunk).
fn channel_hop(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut group = configured(c, "channel_hop");
    group.throughput(Throughput::Elements(HOP_MESSAGES as u64));
    for size in [1usize, 10, 100, 1_000] {
        let envelopes = common::envelopes(&common::bodies(HOP_MESSAGES, 14));
        let mut chunks: Option<Vec<Chunk<Envelope>>> = Some(
            common::into_chunks(envelopes, size)
                .into_iter()
                .map(Chunk::new)
                .collect(),
        );
        group.bench_function(BenchmarkId::new("chunk", size), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let sending = chunks.take().expect("the chunks came back");
                    let slots = (CHANNEL_MESSAGES / size).max(2);
                    let (elapsed, received) = runtime.block_on(hop(sending, slots));
                    total += elapsed;
                    chunks = Some(received);
                }
                total
            })
        });
    }
    group.finish();
}

async fn hop(chunks: Vec<Chunk<Envelope>>, slots: usize) -> (Duration, Vec<Chunk<Envelope>>) {
    let n = chunks.len();
    let (tx, mut rx) = mpsc::channel::<Chunk<Envelope>>(slots);
    let started = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut received = Vec::with_capacity(n);
        while let Some(chunk) = rx.recv().await {
            received.push(black_box(chunk));
        }
        (Instant::now(), received)
    });
    let producer = tokio::spawn(async move {
        for chunk in chunks {
            if tx.send(chunk).await.is_err() {
                panic!("the consumer stopped");
            }
        }
    });
    producer.await.expect("producer");
    let (finished, received) = consumer.await.expect("consumer");
    assert_eq!(received.len(), n);
    (finished - started, received)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    parse(&mut c);
    transform(&mut c);
    encode(&mut c);
    channel_hop(&mut c);
    c.final_summary();
}
