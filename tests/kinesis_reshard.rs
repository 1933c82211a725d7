//! A shard split while the daemon reads: the parent is read to its end and marked finished, its
//! children are found by the periodic listing and read after it, and every record lands once.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use kinesis_common::TestStream;
use kinesis_run::kinesis_config;

fn records(range: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|i| {
            let user = format!("user-{i:05}");
            let body = login(&user).into_bytes();
            (user, body)
        })
        .collect()
}

#[tokio::test]
async fn a_split_while_reading_drains_the_parent_then_reads_its_children() {
    let schema = TestSchema::new().await;
    let stream = TestStream::new(1).await;
    stream.put(&records(0..400)).await;
    let config = TestConfig::write(&kinesis_config(
        &stream,
        &schema,
        "max_records_per_call = 20",
        "batch_rows = 50\nlinger_ms = 50",
    ));
    migrate(&config.path).await;
    let run = Watched::spawn(run_command(&config.path, None));
    eventually(Duration::from_secs(30), "reading under way", || async {
        schema.rows_so_far().await > 50
    })
    .await;
    stream.split("shardId-000000000000").await;
    let after = stream.put(&records(400..800)).await;
    let children: HashSet<&str> = after.iter().map(|p| p.shard_id.as_str()).collect();
    assert!(
        !children.contains("shardId-000000000000"),
        "new records go to the children"
    );

    eventually(Duration::from_secs(60), "every record loaded", || async {
        schema.rows_so_far().await >= 800
    })
    .await;
    signal(&run.child, "TERM");
    let out = run.finish(Duration::from_secs(30)).await;
    out.assert_success();
    let parent_ended = out
        .stderr
        .find("shard read to its end")
        .expect("the parent is read to its end");
    for child in &children {
        let started = out
            .stderr
            .find(&format!("reading shard={child}"))
            .unwrap_or_else(|| panic!("{child} is read:\n{}", out.stderr));
        assert!(
            started > parent_ended,
            "{child} read before its parent ended"
        );
    }

    let users: Vec<String> = schema
        .client
        .query(&format!("SELECT user_id FROM {}", schema.table()), &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(users.len(), 800, "none loaded twice");
    assert_eq!(users.iter().collect::<HashSet<_>>().len(), 800);
    let shards: Vec<(String, bool, bool)> = schema
        .client
        .query(
            &format!(
                "SELECT shard_id, finished, checkpoint IS NOT NULL FROM {}.kinesis_leases
                 ORDER BY shard_id",
                schema.name
            ),
            &[],
        )
        .await
        .expect("lease rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(shards.len(), 3, "{shards:?}");
    assert_eq!(
        shards[0],
        ("shardId-000000000000".into(), true, true),
        "the parent is finished"
    );
    for (shard, finished, checkpointed) in &shards[1..] {
        assert!(
            children.contains(shard.as_str()) && !finished && *checkpointed,
            "{shards:?}"
        );
    }
}
