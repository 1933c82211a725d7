//! File loads resume exactly once: SIGTERM part-way through a file ends the run saying it stopped
//! before the end (summary and exit status), and the next run of the same file loads exactly the
//! rest (the real binary, PostgreSQL).

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

fn file_config(schema: &TestSchema, path: &str) -> String {
    common::file_config(
        schema,
        path,
        "",
        "chunk_messages = 100",
        "batch_rows = 500\nlinger_ms = 20",
    )
}

#[tokio::test]
async fn a_file_stopped_by_sigterm_is_continued_by_the_next_run_exactly_once() {
    const LINES: usize = 60_000;
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("backfill.ndjson");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    for i in 0..LINES {
        if i % 10 == 9 {
            writeln!(file, "{{\"user_id\": \"bad-{i}\"}}").expect("write");
        } else {
            writeln!(file, "{}", login(&format!("line-{i}"))).expect("write");
        }
    }
    file.flush().expect("flush");
    drop(file);
    let config = TestConfig::write(&file_config(&schema, path_str(&path)));

    let daemon = run_command(&config.path, None).spawn().expect("spawn");
    eventually(LIMIT, "the first rows", || async {
        schema.rows_so_far().await >= 2000
    })
    .await;
    signal(&daemon, "TERM");
    let stopped = finish(daemon, LIMIT).await;
    assert_eq!(
        stopped.code,
        Some(3),
        "stopped before the end\nstdout:\n{}\nstderr:\n{}",
        stopped.stdout,
        stopped.stderr
    );
    assert!(
        stopped.stdout.contains(r#""stopped_before_end":true"#),
        "{}",
        stopped.stdout
    );
    let first = stopped.summary();
    assert!(first.received < LINES as u64, "stopped too late: {first:?}");
    assert_eq!(first.loaded + first.rejected, first.received, "{first:?}");

    let rest = run_to_end(run_command(&config.path, None), LIMIT).await;
    rest.assert_success();
    let second = rest.summary();
    assert!(
        !rest.stdout.contains(r#""stopped_before_end":true"#),
        "{}",
        rest.stdout
    );
    assert_eq!(
        first.received + second.received,
        LINES as u64,
        "the rest exactly: {first:?} then {second:?}"
    );
    let (rows, users) = schema.rows_and_users().await;
    assert_eq!(
        (rows, users),
        (54_000, 54_000),
        "every good line exactly once"
    );
    let dead: i64 = schema
        .client
        .query_one(
            &format!("SELECT count(DISTINCT body) FROM {}", schema.dead_letters()),
            &[],
        )
        .await
        .expect("dead letters")
        .get(0);
    assert_eq!(dead, 6_000);
    assert_eq!(schema.count(&schema.dead_letters()).await, 6_000);

    let again = run_to_end(run_command(&config.path, None), LIMIT).await;
    again.assert_success();
    assert_eq!(
        again.summary().received,
        0,
        "a finished file loads nothing again"
    );
}
