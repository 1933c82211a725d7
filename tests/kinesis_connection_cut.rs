//! The daemon reading a Kinesis stream while its database sessions are terminated again and again
//! (`pg_terminate_backend`, as a failover or an administrator would): the committers, the lease
//! keeper and the checkpoint writes reconnect and retry, and every valid record still lands exactly
//! once and every invalid one is exactly one dead letter.
//!
//! A cut can fall in a transaction (rolled back, retried with the records in hand), between two
//! batches, or during a lease renewal (the lease may expire meanwhile and be taken again, and a
//! batch read under the old epoch is then fenced off and read again from the checkpoint): none of
//! these may lose or double a record.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use kinesis_common::TestStream;
use kinesis_run::kinesis_config;

const RECORDS: usize = 1200;
/// Every this-many records is one sluice must reject.
const BAD_EVERY: usize = 20;
const INVALID: usize = RECORDS / BAD_EVERY;
const VALID: usize = RECORDS - INVALID;
/// Records put per call while the daemon runs, so the cuts land mid-stream.
const SLICE: usize = 100;

fn user(i: usize) -> String {
    format!("cut-{i:05}")
}

fn body(i: usize) -> String {
    if i.is_multiple_of(BAD_EVERY) {
        bad_ip_login(&user(i), i)
    } else {
        login(&user(i))
    }
}

/// Rows plus dead letters committed so far (0 while the tables do not exist yet).
async fn stored(schema: &TestSchema) -> i64 {
    if !schema.exists(&schema.dead_letters()).await {
        return 0;
    }
    schema.rows_so_far().await + schema.dead_letters_so_far().await
}

/// Polls `condition` until it holds; fails after 90 s or once the daemon fails, showing what it
/// logged.
async fn until<F, Fut>(daemon: &Watched, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let held = holds_within(Duration::from_secs(90), || {
        let check = condition();
        async move {
            let holds = check.await;
            assert!(
                holds || daemon.lines_containing("sluice: error").is_empty(),
                "sluice failed:\n{}",
                daemon.lines_containing("").join("\n")
            );
            holds
        }
    })
    .await;
    assert!(
        held,
        "timed out after 90 s waiting for {what}; sluice logged:\n{}",
        daemon.lines_containing("").join("\n")
    );
}

#[tokio::test]
async fn no_record_is_lost_or_doubled_when_the_database_connection_is_cut() {
    let schema = TestSchema::new().await;
    let stream = TestStream::new(2).await;
    let app = unique("sluice-kcut-");
    let url = format!("{}?application_name={app}", database_url());
    let toml = kinesis_config(
        &stream,
        &schema,
        "max_records_per_call = 50\nlease_duration_seconds = 4",
        "batch_rows = 40\nlinger_ms = 50",
    )
    .replace(
        &format!("url = \"{}\"", database_url()),
        &format!("url = \"{url}\""),
    );
    let config = TestConfig::write(&toml);
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| (user(i), body(i).into_bytes()))
        .collect();
    let (first, rest) = records.split_at(SLICE);

    // The cuts start once the pipeline runs (its first rows are in): a start-up that cannot reach
    // its database is a different matter, tested with the start-up retries.
    stream.put(first).await;
    let started = Instant::now();
    let daemon = Watched::spawn(run_command(&config.path, Some(5)));
    eventually(Duration::from_secs(60), "the first rows", || async {
        schema.rows_so_far().await > 0
    })
    .await;

    let cutter = SessionCutter::start(&app);
    for slice in rest.chunks(SLICE) {
        stream.put(slice).await;
        let progress = stored(&schema).await;
        until(&daemon, "the stream to be read", || async {
            stored(&schema).await > progress
        })
        .await;
    }
    // Keep cutting until most of the stream is in, so cuts also fall while the last slices load.
    until(&daemon, "most of the stream", || async {
        stored(&schema).await >= (RECORDS * 3 / 4) as i64
    })
    .await;
    let cut = cutter.stop().await;
    println!(
        "{cut} sessions cut over {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let run = daemon.finish(Duration::from_secs(180)).await;
    run.assert_success();
    assert!(cut >= 5, "the test must actually cut connections ({cut})");
    assert!(
        run.stderr.contains("retrying"),
        "the cuts should have been noticed:\n{}",
        run.stderr
    );

    let expected: BTreeSet<String> = (0..RECORDS)
        .filter(|i| !i.is_multiple_of(BAD_EVERY))
        .map(user)
        .collect();
    assert_eq!(expected.len(), VALID);
    assert_exactly_once(
        "loaded record",
        &schema.user_ids().await,
        &expected,
        &run.stderr,
    );

    let expected: BTreeSet<String> = (0..RECORDS)
        .filter(|i| i.is_multiple_of(BAD_EVERY))
        .map(body)
        .collect();
    assert_eq!(expected.len(), INVALID);
    assert_exactly_once("dead letter", &schema.reject_bodies().await, &expected, "");
}
