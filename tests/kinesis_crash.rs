//! The daemon killed (`kill -9`) mid-stream and started again, reading a 4-shard stream: the
//! checkpoints committed with the rows make every valid record land exactly once and every reject
//! once, however often the process dies between a commit and the next. Each kill is checked to
//! have landed mid-stream (rows still missing), so the restarts really resume from checkpoints.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use kinesis_common::TestStream;
use kinesis_run::kinesis_config;

const RECORDS: usize = 10_000;
/// Every this-many records is one sluice must reject.
const BAD_EVERY: usize = 50;

/// Rows loaded between two kills: far enough apart that each run commits many batches, close
/// enough that three runs leave most of the stream unread.
const ROWS_PER_RUN: i64 = 1500;

/// Waits until the table holds more than `rows` rows.
async fn rows_beyond(schema: &TestSchema, rows: i64) {
    eventually(Duration::from_secs(60), "rows to grow", || async move {
        schema.rows_so_far().await > rows
    })
    .await;
}

#[tokio::test]
async fn killed_three_times_mid_stream_every_record_lands_once() {
    let schema = TestSchema::new().await;
    let stream = TestStream::new(4).await;
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS).map(|i| user_record(i, BAD_EVERY)).collect();
    let putting = Instant::now();
    let puts = stream.put(&records).await;
    eprintln!("{RECORDS} records put in {:?}", putting.elapsed());
    let shards: HashSet<&str> = puts.iter().map(|p| p.shard_id.as_str()).collect();
    assert_eq!(shards.len(), 4, "records on every shard");
    // Pages of 100 and batches of at most 200: dozens of commits per run, each a point where a
    // kill can fall, yet 10,000 records go through in seconds.
    let config = TestConfig::write(&kinesis_config(
        &stream,
        &schema,
        "max_records_per_call = 100\nlease_duration_seconds = 3",
        "batch_rows = 200\nlinger_ms = 50",
    ));

    let mut seen = 0;
    for round in 0..3 {
        let mut child = run_command(&config.path, None)
            .spawn()
            .expect("spawn sluice");
        rows_beyond(&schema, seen + ROWS_PER_RUN).await;
        child.start_kill().expect("kill -9");
        child.wait().await.expect("reaped");
        seen = schema.rows_so_far().await;
        assert!(
            (seen as usize) < RECORDS - RECORDS / BAD_EVERY,
            "round {round}: everything loaded before the kill ({seen} rows); the test proves nothing"
        );
        eprintln!("round {round}: killed with {seen} rows loaded");
    }
    let last = run_until_idle(&config.path, 3).await;
    last.assert_success();
    let resumed = last.summary();
    assert!(
        resumed.loaded + resumed.rejected < RECORDS as u64,
        "the last run read from the checkpoints, not from the start: {resumed:?}"
    );

    let valid = RECORDS - RECORDS / BAD_EVERY;
    assert_distinct_count("loaded record", &schema.user_ids().await, valid);
    assert_distinct_count(
        "dead letter",
        &schema.reject_bodies().await,
        RECORDS / BAD_EVERY,
    );
}
