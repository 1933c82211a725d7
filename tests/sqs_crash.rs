//! The daemon reading an SQS queue, killed (`kill -9`) at random moments while a producer is still
//! sending, and started again each time: the dedupe ledger written in each batch's transaction makes
//! every valid message land exactly once and every invalid one become exactly one dead letter,
//! however often the process dies between a commit and the deletes that follow it, and the queue
//! ends empty.
//!
//! A killed daemon releases nothing: what it held stays invisible until its visibility timeout runs
//! out. So the queue and the config ask for a short timeout (the extender keeps renewing it while the
//! daemon lives) and a small in-flight bound, and each kill strands at most a hundred messages for a
//! few seconds instead of thousands for a minute. The emulator serves a few hundred messages a second
//! and slows as its queue grows, so the producer sends while the daemon consumes, as in production.
//!
//! The kill moments come from a seeded generator whose seed is printed (set `SLUICE_TEST_SEED` to
//! replay one): each kill waits for a row count drawn around its share of the stream, then a random
//! few hundred milliseconds more, so kills fall between and during commits, deletes and receives.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::rngs::StdRng;

use common::*;

const MESSAGES: usize = 2000;
/// Every this-many messages is one sluice must reject.
const BAD_EVERY: usize = 10;
const VALID: usize = MESSAGES - MESSAGES / BAD_EVERY;
const KILLS: usize = 5;
/// The queue's visibility timeout and the one sluice asks for: how long a killed daemon's messages
/// stay hidden.
const VISIBILITY_SECONDS: u32 = 5;
/// Messages the producer sends per call.
const SEND_BATCH: usize = 10;
/// Most messages the producer lets wait in the queue, visible or held: the emulator's calls slow
/// down as its queue grows (at a thousand messages it serves a few dozen a second). Above
/// `MAX_IN_FLIGHT`, so what a killed daemon strands never stops the producer on its own.
const BACKLOG: usize = 200;
/// `source.sqs.max_in_flight`: the most messages a kill strands.
const MAX_IN_FLIGHT: usize = 100;

fn user(i: usize) -> String {
    format!("crash-{i:05}")
}

fn body(i: usize) -> String {
    if i.is_multiple_of(BAD_EVERY) {
        bad_ip_login(&user(i), i)
    } else {
        login(&user(i))
    }
}

/// The producer: sends every body, a batch at a time, keeping at most [`BACKLOG`] messages ahead
/// of what the database holds (rows and dead letters), whether or not a daemon is running. Counts
/// what the queue has accepted.
fn feed(
    queue: Arc<TestQueue>,
    schema: &TestSchema,
    bodies: Vec<String>,
) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let sent = Arc::new(AtomicUsize::new(0));
    let counted = format!(
        "SELECT (SELECT count(*) FROM {}) + (SELECT count(*) FROM {})",
        schema.table(),
        schema.dead_letters()
    );
    let progress = sent.clone();
    let producer = tokio::spawn(async move {
        let db = pg().await;
        let mut stored = 0;
        for batch in bodies.chunks(SEND_BATCH) {
            let done = progress.load(Ordering::Relaxed);
            while done + batch.len() > stored + BACKLOG {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let row = db.query_one(&counted, &[]).await.expect("count");
                stored = row.get::<_, i64>(0) as usize;
            }
            queue.send(batch).await;
            progress.fetch_add(batch.len(), Ordering::Relaxed);
        }
    });
    (sent, producer)
}

/// The row count at which kill `k` (1-based) falls: within a third of a share of the valid messages
/// around `k` shares, so the ranges of neighbouring kills are a third of a share apart.
fn kill_threshold(rng: &mut StdRng, k: usize) -> i64 {
    let share = (VALID / (KILLS + 1)) as i64;
    k as i64 * share + rng.random_range(-share / 3..share / 3)
}

/// Runs the daemon until the table holds `threshold` rows (and then a random moment longer), kills
/// it with SIGKILL and returns the queue's depth (visible, held) just before the kill and the rows
/// committed by then. Fails at once if the daemon exits on its own.
async fn run_and_kill(
    config: &TestConfig,
    schema: &TestSchema,
    queue: &TestQueue,
    threshold: i64,
    extra: Duration,
) -> ((i64, i64), i64) {
    let daemon = spawn_until_rows(
        &config.path,
        schema,
        threshold,
        Duration::from_secs(60),
        Duration::from_millis(100),
    )
    .await;
    tokio::time::sleep(extra).await;
    let depth = queue.depth().await;
    daemon.kill_9().await;
    (depth, schema.rows_so_far().await)
}

#[tokio::test]
async fn killed_five_times_while_fed_every_message_lands_once() {
    let mut rng = seeded_rng("these kill moments");

    let schema = TestSchema::new().await;
    let queue = Arc::new(TestQueue::with_visibility(Some(VISIBILITY_SECONDS)).await);
    // Two pollers: the emulator may hand one message to both, which the ledger must absorb too.
    let config = TestConfig::write(&sqs_config(
        &queue,
        &schema,
        &format!(
            "pollers = 2\nmax_in_flight = {MAX_IN_FLIGHT}\n\
             visibility_timeout_seconds = {VISIBILITY_SECONDS}"
        ),
        "batch_rows = 50\nlinger_ms = 100",
        "",
    ));
    migrate(&config.path).await;

    let started = Instant::now();
    let (sent, producer) = feed(queue.clone(), &schema, (0..MESSAGES).map(body).collect());

    let mut committed = 0;
    for k in 1..=KILLS {
        // A kill never waits for less than some progress: each run must commit before it dies.
        let threshold = kill_threshold(&mut rng, k).max(committed + 20);
        let extra = Duration::from_millis(rng.random_range(0..400));
        let (depth, rows) = run_and_kill(&config, &schema, &queue, threshold, extra).await;
        println!(
            "kill {k} at {:.1} s: {rows} rows, threshold {threshold} + {extra:?}, {} sent, \
             queue (visible, held) {depth:?}",
            started.elapsed().as_secs_f64(),
            sent.load(Ordering::Relaxed)
        );
        assert!(
            depth.0 + depth.1 > 0,
            "kill {k}: the queue was empty when the daemon died; it proves nothing"
        );
        assert!(rows > committed, "kill {k}: the run committed nothing");
        assert!(
            rows < VALID as i64,
            "kill {k}: everything was loaded before it ({rows} rows); it proves nothing"
        );
        committed = rows;
    }
    // The last run is not killed: it takes the rest of the stream while the producer finishes,
    // then what the last kill stranded (visible again within the timeout), and stops once idle.
    // Should anything still be held when it stops, the queue is left to show it and read again.
    let (run, ()) = tokio::join!(run_until_idle(&config.path, 3), async {
        producer.await.expect("producer");
        println!(
            "all {MESSAGES} sent at {:.1} s",
            started.elapsed().as_secs_f64()
        );
    });
    run.assert_success();
    // Messages committed by a killed run but not deleted come back: the ledger skips them.
    println!("last run: {:?}", run.summary());
    let mut last_runs = 1;
    while queue.depth().await != (0, 0) {
        last_runs += 1;
        assert!(
            last_runs <= 3,
            "the queue still holds {:?} after two runs until idle",
            queue.depth().await
        );
        eventually(
            Duration::from_secs(30),
            "held messages to become visible again",
            || async { queue.depth().await.1 == 0 },
        )
        .await;
        run_until_idle(&config.path, 3).await.assert_success();
    }
    println!(
        "done at {:.1} s after {last_runs} run(s) until idle",
        started.elapsed().as_secs_f64()
    );

    let users = schema.user_ids().await;
    let expected: BTreeSet<String> = (0..MESSAGES)
        .filter(|i| !i.is_multiple_of(BAD_EVERY))
        .map(user)
        .collect();
    assert_exactly_once("row", &users, &expected, "");
    let rejects = schema.reject_bodies().await;
    let expected: BTreeSet<String> = (0..MESSAGES)
        .filter(|i| i.is_multiple_of(BAD_EVERY))
        .map(body)
        .collect();
    assert_exactly_once("dead letter", &rejects, &expected, "");
    assert_eq!(queue.depth().await, (0, 0), "the queue ends empty");
}
