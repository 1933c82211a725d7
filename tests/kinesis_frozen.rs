//! A process frozen (SIGSTOP) past its lease while it holds records read but not committed, and
//! resumed (SIGCONT) once another process has taken its shards and loaded them: its next commit is
//! fenced off by the lease epoch and rolled back, so the table ends with every record exactly once.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::time::Duration;

use common::*;
use kinesis_common::TestStream;
use kinesis_run::{kinesis_config, live_leases, pid};

const RECORDS: usize = 4000;
const BAD_EVERY: usize = 50;
const LEASE_SECONDS: u64 = 3;
const METRICS: &str = "\n[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// One counter of a scrape of `addr`, 0 when absent.
async fn counter(addr: &str, name: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    metric_value(&body, name).unwrap_or(0.0)
}

/// The lease rows and the sessions in the database, to show why loading stalled.
async fn state(schema: &TestSchema) -> String {
    let leases = schema
        .client
        .query(
            &format!(
                "SELECT shard_id, owner, epoch, expires_at > now(), checkpoint::text
                 FROM {}.kinesis_leases ORDER BY shard_id",
                schema.name
            ),
            &[],
        )
        .await
        .expect("leases");
    let sessions = schema
        .client
        .query(
            "SELECT pid, state, coalesce(wait_event_type, ''), left(query, 120)
             FROM pg_stat_activity WHERE application_name LIKE 'sluice%'",
            &[],
        )
        .await
        .expect("sessions");
    let mut out = String::new();
    for r in leases {
        let row: (String, Option<String>, i64, Option<bool>, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        out.push_str(&format!("{row:?}\n"));
    }
    for r in sessions {
        let row: (i32, Option<String>, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        out.push_str(&format!("{row:?}\n"));
    }
    out
}

#[tokio::test]
async fn a_process_frozen_past_its_lease_has_its_next_commit_fenced_off() {
    let schema = TestSchema::new().await;
    let stream = TestStream::new(4).await;
    stream
        .put(
            &(0..RECORDS)
                .map(|i| user_record(i, BAD_EVERY))
                .collect::<Vec<_>>(),
        )
        .await;
    let valid = (RECORDS - RECORDS / BAD_EVERY) as i64;
    let rejects = (RECORDS / BAD_EVERY) as i64;
    let lease = format!("lease_duration_seconds = {LEASE_SECONDS}");
    // The frozen one reads large pages and commits one message per transaction: when it stops, it
    // holds thousands of records read but not committed, in thousands of batches. Once one commit
    // of a shard is fenced off, the rest of that shard's batches are dropped without a transaction,
    // so its drain stays short and its SIGTERM exit fits in time.
    let slow = TestConfig::write(&format!(
        "{}{METRICS}",
        kinesis_config(
            &stream,
            &schema,
            &format!("max_records_per_call = 1000\n{lease}"),
            "batch_rows = 1\nlinger_ms = 0",
        )
    ));
    let fast = TestConfig::write(&kinesis_config(
        &stream,
        &schema,
        &format!("max_records_per_call = 1000\n{lease}"),
        "batch_rows = 1000\nlinger_ms = 50",
    ));
    migrate(&slow.path).await;

    let frozen = Watched::spawn(run_command(&slow.path, None));
    let metrics = frozen.metrics_address().await;
    eventually(Duration::from_secs(60), "the first process loading", || {
        let schema = &schema;
        async move { schema.rows_so_far().await > 20 }
    })
    .await;
    let received = counter(&metrics, "sluice_messages_received_total").await;
    let settled = counter(&metrics, "sluice_rows_loaded_total").await
        + counter(&metrics, "sluice_dead_letters_total").await;
    signal(&frozen.child, "STOP");
    let loaded_before = schema.rows_so_far().await;
    assert!(
        received - settled > 100.0,
        "the process must hold records in hand when frozen: {received} received, {settled} settled"
    );
    assert!(
        loaded_before < valid / 2,
        "frozen mid-stream ({loaded_before} rows)"
    );

    let other = Watched::spawn(run_command(&fast.path, None));
    let (pf, po) = (pid(&frozen), pid(&other));
    eventually(
        Duration::from_secs(LEASE_SECONDS * 10),
        "the frozen process's shards taken over",
        || {
            let schema = &schema;
            async move {
                let held = live_leases(schema).await;
                !held.contains_key(&pf) && held.get(&po) == Some(&4)
            }
        },
    )
    .await;
    let loading = std::time::Instant::now();
    while schema.rows_so_far().await < valid || schema.count(&schema.dead_letters()).await < rejects
    {
        if loading.elapsed() > Duration::from_secs(60) {
            panic!(
                "not everything loaded after 60 s: {} rows, {} rejects\n{}\nlog of the other process:\n{}",
                schema.rows_so_far().await,
                schema.count(&schema.dead_letters()).await,
                state(&schema).await,
                other.lines_containing("").join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    signal(&frozen.child, "CONT");
    eventually(
        Duration::from_secs(30),
        "the resumed process's commit fenced off",
        || {
            let metrics = &metrics;
            async move { counter(metrics, "sluice_kinesis_fenced_commits_total").await >= 1.0 }
        },
    )
    .await;
    let fenced = frozen
        .line_containing("commit fenced off by the source", Duration::from_secs(10))
        .await;
    let dropped: u64 = fenced
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dropped="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no dropped count in {fenced:?}"));
    assert!(dropped > 0, "records in hand dropped unloaded: {fenced}");

    // Frozen between its checkpoint write and its COMMIT, its session was ended by the database
    // and the commit tried again on a new one; frozen elsewhere, the first try was fenced.
    let retried = frozen
        .lines_containing("commit failed; keeping the batch and retrying")
        .len();
    // One fenced-off transaction per lost claim at most: the other batches in hand under it are
    // dropped before their transactions begin, so the thousands of records in hand are settled
    // (committed before the freeze, or dropped) promptly.
    eventually(
        Duration::from_secs(30),
        "the resumed process settled every record in hand",
        || {
            let metrics = &metrics;
            async move {
                let received = counter(metrics, "sluice_messages_received_total").await;
                let settled = counter(metrics, "sluice_messages_acknowledged_total").await
                    + counter(metrics, "sluice_messages_released_total").await;
                settled >= received
            }
        },
    )
    .await;
    let fenced_commits = counter(&metrics, "sluice_kinesis_fenced_commits_total").await;
    assert!(
        fenced_commits <= 4.0,
        "{fenced_commits} fenced-off commits for 4 lost claims"
    );
    for process in [&frozen, &other] {
        signal(&process.child, "TERM");
    }
    let frozen_out = frozen.finish(Duration::from_secs(60)).await;
    frozen_out.assert_success();
    let other_out = other.finish(Duration::from_secs(60)).await;
    other_out.assert_success();
    let (f, o) = (frozen_out.summary(), other_out.summary());

    assert_distinct_count("loaded record", &schema.user_ids().await, valid as usize);
    assert_eq!(
        (f.loaded + o.loaded) as i64,
        valid,
        "each row loaded by one process: {f:?} {o:?}"
    );
    let stored = schema.rejects().await;
    assert_eq!(stored.len() as i64, rejects, "every reject stored once");
    eprintln!(
        "frozen with {} in hand, {loaded_before} rows loaded; {dropped} dropped at the fenced \
         commit, after {retried} retries; {fenced_commits} fenced-off commits",
        received - settled
    );
}
