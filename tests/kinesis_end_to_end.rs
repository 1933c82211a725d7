//! The Kinesis source end to end through the real binary, the real PostgreSQL and the Kinesis
//! emulator: switching the demo from SQS to Kinesis changes the source, not the result.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::time::Duration;

use common::*;
use kinesis_common::TestStream;
use kinesis_run::kinesis_config;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/demo-logins.json");

async fn seed(config: &std::path::Path) {
    run_to_end(
        sluice(&["seed", "--config", path_str(config), "--file", DEMO]),
        Duration::from_secs(60),
    )
    .await
    .assert_success();
}

/// Every column of every row, in one order.
async fn rows(schema: &TestSchema) -> Vec<Vec<Option<String>>> {
    schema
        .client
        .query(
            &format!(
                "SELECT user_id, device_type, masked_ip, masked_device_id, locale,
                        app_version::text, create_date::text
                 FROM {} ORDER BY 1, 2, 3, 4, 5, 6, 7",
                schema.table()
            ),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (0..7).map(|i| r.get(i)).collect())
        .collect()
}

/// The demo through Kinesis: the same rows as through SQS (masks, versions, dates from the
/// arrival time), the rejects in the dead-letter table known by `shardId/sequenceNumber`, and a
/// second run adds nothing.
#[tokio::test]
async fn the_demo_through_kinesis_gives_the_rows_it_gives_through_sqs() {
    let (via_sqs, via_kinesis) = (TestSchema::new().await, TestSchema::new().await);
    let queue = TestQueue::new().await;
    let stream = TestStream::new(2).await;
    let sqs = TestConfig::write(&sqs_config(&queue, &via_sqs, "", "", ""));
    let kinesis = TestConfig::write(&kinesis_config(&stream, &via_kinesis, "", ""));

    let migrated = migrate(&kinesis.path).await;
    assert!(
        migrated.stdout.contains("kinesis_leases") && migrated.stdout.contains("created"),
        "{}",
        migrated.stdout
    );
    seed(&sqs.path).await;
    seed(&kinesis.path).await;
    run_until_idle(&sqs.path, 2).await.assert_success();
    let run = run_until_idle(&kinesis.path, 2).await;
    run.assert_success();
    let s = run.summary();
    assert_eq!(
        (s.received, s.loaded, s.rejected, s.duplicates),
        (100, 90, 10, 0),
        "{}",
        run.stderr
    );

    let through_kinesis = rows(&via_kinesis).await;
    assert_eq!(through_kinesis.len(), 90);
    assert_eq!(through_kinesis, rows(&via_sqs).await);
    let rejects = via_kinesis.rejects().await;
    assert_eq!(rejects.len(), 10);
    let ids = via_kinesis
        .client
        .query(
            &format!("SELECT message_id FROM {}", via_kinesis.dead_letters()),
            &[],
        )
        .await
        .expect("dead letters");
    for row in ids {
        let id: String = row.get(0);
        let (shard, sequence) = id.split_once('/').expect("shardId/sequenceNumber");
        assert!(shard.starts_with("shardId-"), "{id}");
        assert!(sequence.bytes().all(|b| b.is_ascii_digit()), "{id}");
    }
    let mut sqs_reasons: Vec<String> = via_sqs.rejects().await.into_iter().map(|r| r.0).collect();
    let mut kinesis_reasons: Vec<String> = rejects.into_iter().map(|r| r.0).collect();
    sqs_reasons.sort();
    kinesis_reasons.sort();
    assert_eq!(kinesis_reasons, sqs_reasons);

    // The checkpoints say where the first run ended: a second run reads nothing again.
    let again = run_until_idle(&kinesis.path, 2).await;
    again.assert_success();
    assert_eq!(again.summary().received, 0, "{}", again.stderr);
    assert_eq!(via_kinesis.rows_loaded().await, 90);
    assert_eq!(via_kinesis.count(&via_kinesis.dead_letters()).await, 10);

    let report = run_to_end(
        sluice(&["report", "--config", path_str(&kinesis.path)]),
        Duration::from_secs(30),
    )
    .await;
    report.assert_success();
    assert!(
        report.stdout.contains("2 shards known"),
        "{}",
        report.stdout
    );
    let check = run_to_end(
        sluice(&["check", "--config", path_str(&kinesis.path)]),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        check.stdout.contains("2 shards (2 open)") && check.stdout.contains("leases"),
        "{}",
        check.stdout
    );
}
