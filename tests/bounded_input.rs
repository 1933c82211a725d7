//! Input is bounded in bytes: a message over `source.max_message_bytes` (an SQS body, a Kinesis
//! record or KPL user record, a file line, a gzip bomb) becomes a dead letter naming its size, its
//! neighbours load and the daemon runs on (the SQS and Kinesis emulators and PostgreSQL, the real
//! binary).

mod common;
mod kinesis_common;
mod kinesis_run;

use std::io::Write;
use std::time::Duration;

use common::*;
use kinesis_common::TestStream;
use kinesis_run::kinesis_config;
use sluice::source::kinesis::kpl::{UserRecord, aggregate};

fn file_config(schema: &TestSchema, path: &str, extra_source: &str) -> String {
    common::file_config(
        schema,
        path,
        extra_source,
        "",
        "batch_rows = 50\nlinger_ms = 50",
    )
}

/// A gzip bomb (a few hundred KiB inflating to 64 MiB in one line) between two good lines: one dead
/// letter naming its size, the good lines load, the run ends cleanly.
#[tokio::test]
async fn a_gzip_bomb_in_a_file_is_one_dead_letter_naming_its_size() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bomb.ndjson.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    writeln!(gz, "{}", login("before")).expect("compress");
    let zeros = vec![b' '; 1024 * 1024];
    gz.write_all(b"{\"user_id\": \"").expect("compress");
    for _ in 0..64 {
        gz.write_all(&zeros).expect("compress");
    }
    writeln!(gz, "\"}}").expect("compress");
    writeln!(gz, "{}", login("after")).expect("compress");
    std::fs::write(&path, gz.finish().expect("finish")).expect("write");
    let config = TestConfig::write(&file_config(&schema, path_str(&path), ""));
    let run = run_to_end(run_command(&config.path, None), Duration::from_secs(90)).await;
    run.assert_success();
    assert_eq!(schema.rows_loaded().await, 2);
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    let (reason, stage, body) = &rejects[0];
    assert_eq!(
        reason,
        "message is 67108879 bytes, more than `source.max_message_bytes` (1048576); its first 1024 bytes are kept"
    );
    assert_eq!(stage, "source");
    assert_eq!(body.len(), 1024);
}

/// An SQS body over a lowered limit: a dead letter with its size and its start, deleted from the
/// queue like any other; the message beside it loads.
#[tokio::test]
async fn an_sqs_body_over_the_limit_is_a_dead_letter_naming_its_size() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let big = login(&"u".repeat(100)).replace("\"RU\"", &format!("\"{}\"", "x".repeat(9000)));
    queue.send(&[login("small"), big.clone()]).await;
    let extra = "[source]\nkind = \"sqs\"\nmax_message_bytes = 4096\n";
    let config =
        sqs_config(&queue, &schema, "", "", "").replace("[source]\nkind = \"sqs\"\n", extra);
    let config = TestConfig::write(&config);
    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(schema.rows_loaded().await, 1);
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    let (reason, stage, body) = &rejects[0];
    assert_eq!(
        reason,
        &format!(
            "message is {} bytes, more than `source.max_message_bytes` (4096); its first 1024 bytes are kept",
            big.len()
        )
    );
    assert_eq!(stage, "source");
    assert_eq!(body.as_str(), &big[..1024]);
    assert_eq!(queue.depth().await, (0, 0));
}

/// A Kinesis record over a lowered limit, and a user record over it inside a KPL aggregate: each a
/// dead letter with its size and its start, checkpointed like any other record (a second run reads
/// nothing again); the messages beside them load.
#[tokio::test]
async fn kinesis_records_and_user_records_over_the_limit_are_dead_letters_naming_their_size() {
    let schema = TestSchema::new().await;
    let stream = TestStream::new(1).await;
    let big = login(&"u".repeat(100)).replace("\"RU\"", &format!("\"{}\"", "x".repeat(9000)));
    let users: Vec<UserRecord> = [login("in-aggregate"), big.clone()]
        .into_iter()
        .map(|body| UserRecord {
            partition_key: "k".into(),
            explicit_hash_key: None,
            data: body.into_bytes(),
        })
        .collect();
    stream
        .put(&[
            ("k".into(), login("plain").into_bytes()),
            ("k".into(), big.clone().into_bytes()),
            ("k".into(), aggregate(&users)),
        ])
        .await;
    let config = kinesis_config(&stream, &schema, "", "").replace(
        "[source]\nkind = \"kinesis\"\n",
        "[source]\nkind = \"kinesis\"\nmax_message_bytes = 4096\n",
    );
    let config = TestConfig::write(&config);
    migrate(&config.path).await;
    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(schema.rows_loaded().await, 2, "{}", run.stderr);
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    let reason = format!(
        "message is {} bytes, more than `source.max_message_bytes` (4096); its first 1024 bytes are kept",
        big.len()
    );
    for (got, stage, body) in &rejects {
        assert_eq!(got, &reason);
        assert_eq!(stage, "source");
        assert_eq!(body.as_str(), &big[..1024]);
    }
    let again = run_until_idle(&config.path, 2).await;
    again.assert_success();
    assert_eq!(again.summary().received, 0, "{}", again.stderr);
}
