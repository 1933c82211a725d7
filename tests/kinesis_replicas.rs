//! Several `sluice run` processes sharing one 4-shard stream through the lease table: the shards
//! split between them, a third process gets its share, one killed (`kill -9`) has its shards taken
//! over within the lease bound, the survivors stopped by SIGTERM hand their leases back, and the
//! table ends with every record once.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::time::{Duration, Instant};

use common::*;
use kinesis_common::TestStream;
use kinesis_run::{kinesis_config, live_leases, pid};

const BAD_EVERY: usize = 50;
const LEASE_SECONDS: u64 = 3;

#[tokio::test]
async fn processes_share_a_stream_and_a_killed_ones_shards_move() {
    let schema = TestSchema::new().await;
    let stream = TestStream::new(4).await;
    let first: Vec<_> = (0..2000).map(|i| user_record(i, BAD_EVERY)).collect();
    stream.put(&first).await;
    let config = TestConfig::write(&kinesis_config(
        &stream,
        &schema,
        &format!("max_records_per_call = 10\nlease_duration_seconds = {LEASE_SECONDS}"),
        "batch_rows = 40\nlinger_ms = 50",
    ));
    migrate(&config.path).await;
    let start = || Watched::spawn(run_command(&config.path, None));

    let a = start();
    let b = start();
    let (pa, pb) = (pid(&a), pid(&b));
    eventually(
        Duration::from_secs(30),
        "two processes, two shards each",
        || {
            let schema = &schema;
            async move {
                let held = live_leases(schema).await;
                held.get(&pa) == Some(&2) && held.get(&pb) == Some(&2)
            }
        },
    )
    .await;

    let c = start();
    let pc = pid(&c);
    eventually(Duration::from_secs(30), "the third process's share", || {
        let schema = &schema;
        async move {
            let held = live_leases(schema).await;
            let mut counts: Vec<i64> = held.values().copied().collect();
            counts.sort();
            held.contains_key(&pc) && counts == [1, 1, 2]
        }
    })
    .await;

    let mut a = a;
    a.child.start_kill().expect("kill -9");
    a.child.wait().await.expect("reaped");
    let killed = Instant::now();
    let more: Vec<_> = (2000..3000).map(|i| user_record(i, BAD_EVERY)).collect();
    stream.put(&more).await;
    eventually(
        Duration::from_secs(LEASE_SECONDS * 5),
        "the killed process's shards taken over",
        || {
            let schema = &schema;
            async move {
                let held = live_leases(schema).await;
                !held.contains_key(&pa) && held.values().sum::<i64>() == 4
            }
        },
    )
    .await;
    let moved_after = killed.elapsed();

    let valid = 3000 - 3000 / BAD_EVERY;
    eventually(Duration::from_secs(60), "every record loaded", || {
        let schema = &schema;
        async move { schema.rows_so_far().await >= valid as i64 }
    })
    .await;
    for process in [&b, &c] {
        signal(&process.child, "TERM");
    }
    let c_out = c.finish(Duration::from_secs(30)).await;
    c_out.assert_success();
    let b_out = b.finish(Duration::from_secs(30)).await;
    b_out.assert_success();
    assert!(
        live_leases(&schema).await.is_empty(),
        "leases handed back on SIGTERM"
    );

    assert_distinct_count("loaded record", &schema.user_ids().await, valid);
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), 3000 / BAD_EVERY, "every reject stored once");
    eprintln!("shards of the killed process moved within {moved_after:?}");
}
