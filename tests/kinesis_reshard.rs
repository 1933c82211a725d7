//! A shard split while the daemon reads: the parent is read to its end and marked finished, its
//! children are found by the periodic listing and read after it, and every record lands once; and
//! a split and a merge under a steady stream of writes, with a `kill -9` mid-split and a SIGTERM
//! mid-merge: per shard, per partition key and per parent and child, rows commit in order, once.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::collections::{BTreeMap, HashMap, HashSet};
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

    assert_distinct_count("loaded record", &schema.user_ids().await, 800);
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

/// Records `range` spread over a few partition keys, so each key has a history across the reshards.
fn keyed(range: std::ops::Range<usize>) -> Vec<(usize, String, Vec<u8>)> {
    range
        .map(|i| {
            let body = login(&format!("user-{i:05}")).into_bytes();
            (i, format!("key-{:02}", i % KEYS), body)
        })
        .collect()
}

const KEYS: usize = 64;

/// Puts `records`, retrying what the stream refuses while it reshards; returns each record's index
/// and where it landed, in the order the stream accepted them.
async fn put_accepted(stream: &TestStream, records: Vec<(usize, String, Vec<u8>)>) -> Vec<Landed> {
    let started = std::time::Instant::now();
    let mut pending = records;
    let mut landed = Vec::new();
    while !pending.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "records still refused after 60 s"
        );
        let entries = pending
            .iter()
            .map(|(_, key, data)| {
                aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(aws_sdk_kinesis::primitives::Blob::new(data.clone()))
                    .build()
                    .expect("entry")
            })
            .collect();
        let sent = stream
            .client
            .put_records()
            .stream_name(&stream.name)
            .set_records(Some(entries))
            .send()
            .await;
        let Ok(out) = sent else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut refused = Vec::new();
        for (entry, record) in out.records.into_iter().zip(pending) {
            match (entry.shard_id, entry.sequence_number) {
                (Some(shard), Some(sequence)) if entry.error_code.is_none() => {
                    landed.push(Landed {
                        index: record.0,
                        key: record.1,
                        shard,
                        sequence,
                    })
                }
                _ => refused.push(record),
            }
        }
        pending = refused;
    }
    landed
}

#[derive(Debug, Clone)]
struct Landed {
    index: usize,
    key: String,
    shard: String,
    sequence: String,
}

/// Sequence numbers as numbers: decimal digits without leading zeros compare by length first.
fn by_sequence(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Every shard of the stream with its parents, as ListShards reports them.
async fn parents(stream: &TestStream) -> Vec<(String, Vec<String>, u128, u128)> {
    let shards = stream
        .client
        .list_shards()
        .stream_name(&stream.name)
        .send()
        .await
        .expect("ListShards")
        .shards
        .unwrap_or_default();
    shards
        .into_iter()
        .map(|s| {
            let range = s.hash_key_range.expect("hash key range");
            let parents = [s.parent_shard_id, s.adjacent_parent_shard_id]
                .into_iter()
                .flatten()
                .collect();
            (
                s.shard_id,
                parents,
                range.starting_hash_key.parse().expect("hash key"),
                range.ending_hash_key.parse().expect("hash key"),
            )
        })
        .collect()
}

/// A lease row's (finished, checkpointed), or `None` when the shard is not registered yet.
async fn lease_state(
    schema: &TestSchema,
    stream: &TestStream,
    shard: &str,
) -> Option<(bool, bool)> {
    schema
        .client
        .query_opt(
            &format!(
                "SELECT finished, checkpoint IS NOT NULL FROM {}.kinesis_leases
                 WHERE stream = $1 AND shard_id = $2",
                schema.name
            ),
            &[&stream.name, &shard],
        )
        .await
        .expect("lease row")
        .map(|r| (r.get(0), r.get(1)))
}

/// Makes the target table note the order in which transactions writing to it commit: a deferred
/// trigger runs as its transaction commits and draws a number from a sequence, so a transaction
/// that commits after another draws a larger one (sluice sends a batch's COMMIT only once the
/// batch before it has committed, while their COPYs may overlap).
async fn note_commit_order(schema: &TestSchema) {
    let s = &schema.name;
    schema
        .client
        .batch_execute(&format!(
            "CREATE SEQUENCE {s}.commit_seq;
             CREATE TABLE {s}.commit_order (xid bigint PRIMARY KEY, seq bigint NOT NULL);
             CREATE FUNCTION {s}.note_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO {s}.commit_order
               VALUES (pg_current_xact_id()::text::bigint % 4294967296, nextval('{s}.commit_seq'))
               ON CONFLICT DO NOTHING;
               RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER note_commit AFTER INSERT ON {table}
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {s}.note_commit();",
            table = schema.table()
        ))
        .await
        .expect("commit order trigger");
}

/// The place of the transaction that wrote each row in the order of commits, by user (see
/// [`note_commit_order`]): rows of one transaction share it.
async fn writers(schema: &TestSchema) -> Vec<(String, i64)> {
    schema
        .client
        .query(
            &format!(
                "SELECT t.user_id, c.seq FROM {} t
                 JOIN {}.commit_order c ON c.xid = t.xmin::text::bigint",
                schema.table(),
                schema.name
            ),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn a_split_and_a_merge_under_writes_and_restarts_drain_parents_before_children() {
    const INITIAL: usize = 2400;
    let schema = TestSchema::new().await;
    let stream = TestStream::new(2).await;
    let mut landed = put_accepted(&stream, keyed(0..INITIAL)).await;
    // Small pages: the parents' backlog takes tens of seconds to read, so both restarts land
    // while a reshard is under way.
    let config = TestConfig::write(&kinesis_config(
        &stream,
        &schema,
        "max_records_per_call = 10\nlease_duration_seconds = 3",
        "batch_rows = 50\nlinger_ms = 50",
    ));
    migrate(&config.path).await;
    note_commit_order(&schema).await;
    let start = || Watched::spawn(run_command(&config.path, None));
    let rows_beyond = |rows: i64| {
        let schema = &schema;
        async move {
            eventually(Duration::from_secs(60), "rows to grow", || async move {
                schema.rows_so_far().await > rows
            })
            .await;
        }
    };

    let writing = std::sync::atomic::AtomicBool::new(true);
    let writer = async {
        let mut next = INITIAL;
        let mut landed = Vec::new();
        while writing.load(std::sync::atomic::Ordering::Relaxed) {
            landed.extend(put_accepted(&stream, keyed(next..next + 10)).await);
            next += 10;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        landed
    };
    let resharding = async {
        let first = start();
        rows_beyond(100).await;
        stream.split("shardId-000000000000").await;
        // Killed mid-split: the parent is not read to its end yet.
        let mut first = first;
        first.child.start_kill().expect("kill -9");
        first.child.wait().await.expect("reaped");
        let parent = lease_state(&schema, &stream, "shardId-000000000000").await;
        assert!(
            matches!(parent, Some((false, _))),
            "the kill must land before the split parent is drained: {parent:?}"
        );
        let killed_at = schema.rows_so_far().await;

        let second = start();
        rows_beyond(killed_at + 50).await;
        let shards = parents(&stream).await;
        let (_, _, low1, _) = shards
            .iter()
            .find(|s| s.0 == "shardId-000000000001")
            .expect("shard 1")
            .clone();
        let upper_child = shards
            .iter()
            .find(|s| s.1 == ["shardId-000000000000"] && s.3 + 1 == low1)
            .expect("the split's upper child, adjacent to shard 1")
            .0
            .clone();
        stream.merge(&upper_child, "shardId-000000000001").await;
        let merged = parents(&stream)
            .await
            .into_iter()
            .find(|s| s.1.len() == 2)
            .expect("the merge's child")
            .0;
        rows_beyond(schema.rows_so_far().await + 50).await;
        signal(&second.child, "TERM");
        let stopped = second.finish(Duration::from_secs(30)).await;
        stopped.assert_success();
        let merged_state = lease_state(&schema, &stream, &merged).await;
        assert!(
            !matches!(merged_state, Some((_, true))),
            "the stop must land before the merge's child is read: {merged_state:?}"
        );

        let third = start();
        (third, merged)
    };
    let ((third, merged), written) = tokio::join!(
        async {
            let out = resharding.await;
            writing.store(false, std::sync::atomic::Ordering::Relaxed);
            out
        },
        writer
    );
    landed.extend(written);
    let total = landed.len() as i64;
    eventually(Duration::from_secs(90), "every record loaded", || {
        let schema = &schema;
        async move { schema.rows_so_far().await >= total }
    })
    .await;
    signal(&third.child, "TERM");
    third.finish(Duration::from_secs(30)).await.assert_success();

    let rows = writers(&schema).await;
    assert_eq!(rows.len() as i64, total, "none lost, none loaded twice");
    let commit: HashMap<String, i64> = rows.into_iter().collect();
    assert_eq!(commit.len() as i64, total, "none loaded twice");
    let wrote = |l: &Landed| -> i64 {
        let user = format!("user-{:05}", l.index);
        *commit.get(&user).unwrap_or_else(|| panic!("{user} lost"))
    };

    // Within a shard, rows commit in sequence order.
    let mut by_shard: BTreeMap<&str, Vec<&Landed>> = BTreeMap::new();
    for l in &landed {
        by_shard.entry(l.shard.as_str()).or_default().push(l);
    }
    for (shard, records) in &mut by_shard {
        records.sort_by(|a, b| by_sequence(&a.sequence, &b.sequence));
        for pair in records.windows(2) {
            assert!(
                wrote(pair[0]) <= wrote(pair[1]),
                "{shard}: record {} committed before {}, which precedes it",
                pair[1].index,
                pair[0].index
            );
        }
    }
    // A child's first rows commit after its parents' last.
    let graph = parents(&stream).await;
    let mut reshards = 0;
    for (child, parent_ids, _, _) in &graph {
        for parent in parent_ids {
            let (Some(child_rows), Some(parent_rows)) =
                (by_shard.get(child.as_str()), by_shard.get(parent.as_str()))
            else {
                panic!("{parent} and its child {child} both hold records: {by_shard:?}");
            };
            let first_child = child_rows.iter().map(|l| wrote(l)).min().expect("rows");
            let last_parent = parent_rows.iter().map(|l| wrote(l)).max().expect("rows");
            assert!(
                first_child > last_parent,
                "{child} committed rows before its parent {parent} was drained"
            );
            reshards += 1;
        }
    }
    assert_eq!(
        reshards, 4,
        "two children of the split, two parents of the merge"
    );
    // Per partition key, rows commit in the order the stream accepted them.
    let mut by_key: HashMap<&str, Vec<&Landed>> = HashMap::new();
    for l in &landed {
        by_key.entry(l.key.as_str()).or_default().push(l);
    }
    for (key, records) in &by_key {
        for pair in records.windows(2) {
            assert!(
                wrote(pair[0]) <= wrote(pair[1]),
                "{key}: record {} committed before {}, put before it",
                pair[1].index,
                pair[0].index
            );
        }
    }
    for (shard, _, _, _) in &graph {
        let state = lease_state(&schema, &stream, shard).await;
        let closed = graph.iter().any(|(_, ps, _, _)| ps.contains(shard));
        assert_eq!(
            state,
            Some((closed, true)),
            "{shard}: parents finished, open shards checkpointed"
        );
    }
    eprintln!("{total} records through a split, a merge ({merged}) and two restarts");
}
