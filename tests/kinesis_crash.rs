//! The daemon killed (`kill -9`) mid-stream and started again, reading a 4-shard stream: the
//! checkpoints committed with the rows make every valid record land exactly once and every reject
//! once, however often the process dies between a commit and the next.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use kinesis_common::TestStream;
use kinesis_run::kinesis_config;

const RECORDS: usize = 3000;
/// Every this-many records is one sluice must reject.
const BAD_EVERY: usize = 50;

fn record(i: usize) -> (String, Vec<u8>) {
    let user = format!("user-{i:05}");
    let body = if i.is_multiple_of(BAD_EVERY) {
        format!(r#"{{"user_id": "{user}", "ip": "not an address {i}"}}"#)
    } else {
        login(&user)
    };
    (user, body.into_bytes())
}

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
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS).map(record).collect();
    let puts = stream.put(&records).await;
    let shards: HashSet<&str> = puts.iter().map(|p| p.shard_id.as_str()).collect();
    assert_eq!(shards.len(), 4, "records on every shard");
    // Small pages and batches: many commits, each a point where a kill can fall.
    let config = TestConfig::write(&kinesis_config(
        &stream,
        &schema,
        "max_records_per_call = 25\nlease_duration_seconds = 3",
        "batch_rows = 40\nlinger_ms = 50",
    ));

    let mut seen = 0;
    for round in 0..3 {
        let mut child = run_command(&config.path, None)
            .spawn()
            .expect("spawn sluice");
        rows_beyond(&schema, seen + 200).await;
        child.start_kill().expect("kill -9");
        child.wait().await.expect("reaped");
        seen = schema.rows_so_far().await;
        assert!(
            (seen as usize) < RECORDS - RECORDS / BAD_EVERY,
            "round {round}: everything loaded before the kill ({seen} rows); the test proves nothing"
        );
    }
    let last = run_until_idle(&config.path, 3).await;
    last.assert_success();

    let valid = RECORDS - RECORDS / BAD_EVERY;
    let users: Vec<String> = schema
        .client
        .query(&format!("SELECT user_id FROM {}", schema.table()), &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let distinct: HashSet<&String> = users.iter().collect();
    assert_eq!(distinct.len(), valid, "every valid record loaded");
    assert_eq!(users.len(), valid, "none loaded twice");
    let rejects = schema.rejects().await;
    let distinct: HashSet<&String> = rejects.iter().map(|r| &r.2).collect();
    assert_eq!(distinct.len(), RECORDS / BAD_EVERY, "every reject stored");
    assert_eq!(rejects.len(), RECORDS / BAD_EVERY, "none stored twice");
}
