//! Scale-out on SQS: several sluice processes on one queue are competing consumers. The queue hands
//! each message to one of them at a time, and the shared ledger recognises a message that two of
//! them received anyway (a visibility timeout that ran out, the emulator's own races), so each
//! message lands exactly once however the work is split.

mod common;

use std::time::Duration;

use common::*;

const REPLICAS: usize = 3;
const BEFORE: usize = 300;
const WHILE_RUNNING: usize = 600;

#[tokio::test]
async fn three_replicas_on_one_fed_queue_load_each_message_once() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "pollers = 2", "", ""));
    migrate(&config.path).await;
    let body = |i: usize| login(&format!("replica-{i}"));
    let first: Vec<String> = (0..BEFORE).map(body).collect();
    queue.send(&first).await;

    let replicas: Vec<Watched> = (0..REPLICAS)
        .map(|_| Watched::spawn(run_command(&config.path, None)))
        .collect();
    for replica in &replicas {
        replica
            .line_containing("SQS source ready", Duration::from_secs(30))
            .await;
    }
    // Fed while the replicas consume.
    let more: Vec<String> = (BEFORE..BEFORE + WHILE_RUNNING).map(body).collect();
    queue.send(&more).await;

    let total = (BEFORE + WHILE_RUNNING) as i64;
    eventually(Duration::from_secs(120), "every message loaded", || async {
        schema.rows_so_far().await >= total
    })
    .await;
    eventually(Duration::from_secs(60), "the queue emptied", || async {
        queue.depth().await == (0, 0)
    })
    .await;
    for replica in &replicas {
        signal(&replica.child, "TERM");
    }
    let mut summaries = Vec::new();
    for replica in replicas {
        let out = replica.finish(Duration::from_secs(60)).await;
        out.assert_success();
        summaries.push(out.summary());
    }

    let (rows, users) = schema.rows_and_users().await;
    assert_eq!((rows, users), (total, total), "each message exactly once");
    let loaded: u64 = summaries.iter().map(|s| s.loaded).sum();
    assert_eq!(loaded as i64, total, "{summaries:?}");
    assert!(
        summaries.iter().all(|s| s.loaded > 0),
        "every replica took a share: {summaries:?}"
    );
    let received: u64 = summaries.iter().map(|s| s.received).sum();
    let duplicates: u64 = summaries.iter().map(|s| s.duplicates).sum();
    assert_eq!(received, loaded + duplicates, "{summaries:?}");
}
