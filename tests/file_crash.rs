//! A file load killed (`kill -9`) part-way three times and run again to its end, with the dedupe
//! ledger off: the position each batch commits with its rows and dead letters
//! (`sluice_file_positions`) is all that tells a rerun where to continue, and it must be enough for
//! every valid line to land exactly once and every invalid one to be exactly one dead letter.
//!
//! A killed process drains nothing and says nothing: whatever it had read beyond its last commit is
//! simply gone, and a transaction it had open is rolled back by the server. So after each kill the
//! committed state must be exactly a prefix of the file: the recorded position equals the rows plus
//! the dead letters, with no line after it stored and none before it missing.
//!
//! A statement trigger on the table slows every batch down a little (the database's own
//! `pg_sleep`), so that a run takes seconds and each kill can be asserted to fall mid-file. The kill
//! moments come from a seeded generator whose seed is printed (`SLUICE_TEST_SEED` replays it).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::rngs::StdRng;

use common::*;

const LINES: usize = 6000;
/// Every this-many lines is one sluice must reject.
const BAD_EVERY: usize = 10;
const INVALID: usize = LINES / BAD_EVERY;
const VALID: usize = LINES - INVALID;
const KILLS: usize = 3;
const LIMIT: Duration = Duration::from_secs(120);

fn user(i: usize) -> String {
    format!("line-{i:05}")
}

/// Line `i` (0-based): a login, or one the parse stage rejects (an IP that is none), each unique.
fn line(i: usize) -> String {
    if (i + 1).is_multiple_of(BAD_EVERY) {
        bad_ip_login(&user(i), i)
    } else {
        login(&user(i))
    }
}

/// The ledger explicitly off (the default for files): only the position protects a rerun.
fn file_config(schema: &TestSchema, path: &str) -> String {
    common::file_config(
        schema,
        path,
        "",
        "chunk_messages = 20",
        "dedupe = false\nbatch_rows = 20\nlinger_ms = 10",
    )
}

/// Makes every batch's COPY into the table take at least `seconds` longer (a statement trigger).
async fn throttle(schema: &TestSchema, seconds: f64) {
    schema
        .client
        .batch_execute(&format!(
            "CREATE FUNCTION {s}.throttle() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
             CREATE TRIGGER throttle AFTER INSERT ON {t}
             FOR EACH STATEMENT EXECUTE FUNCTION {s}.throttle();",
            s = schema.name,
            t = schema.table(),
        ))
        .await
        .expect("throttle trigger");
}

/// What is committed: (position recorded for the file, rows, dead letters).
async fn committed(schema: &TestSchema) -> (i64, i64, i64) {
    let row = schema
        .client
        .query_one(
            &format!(
                "SELECT (SELECT coalesce(max(position), 0) FROM {s}.sluice_file_positions),
                        (SELECT count(*) FROM {t}), (SELECT count(*) FROM {d})",
                s = schema.name,
                t = schema.table(),
                d = schema.dead_letters(),
            ),
            &[],
        )
        .await
        .expect("committed state");
    (row.get(0), row.get(1), row.get(2))
}

/// The row count at which kill `k` (1-based) falls: within a third of a share of the valid lines
/// around `k` shares.
fn kill_threshold(rng: &mut StdRng, k: usize) -> i64 {
    let share = (VALID / (KILLS + 1)) as i64;
    k as i64 * share + rng.random_range(-share / 3..share / 3)
}

/// Runs the file until the table holds `threshold` rows, then kills the process with SIGKILL.
/// Fails if it exits on its own before.
async fn run_and_kill(config: &TestConfig, schema: &TestSchema, threshold: i64) {
    let daemon = spawn_until_rows(
        &config.path,
        schema,
        threshold,
        LIMIT,
        Duration::from_millis(50),
    )
    .await;
    daemon.kill_9().await;
}

#[tokio::test]
async fn a_file_killed_three_times_then_rerun_loads_every_line_once() {
    let mut rng = seeded_rng("these kill moments");

    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("backfill.ndjson");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    for i in 0..LINES {
        writeln!(file, "{}", line(i)).expect("write");
    }
    file.flush().expect("flush");
    drop(file);
    let config = TestConfig::write(&file_config(&schema, path_str(&path)));
    migrate(&config.path).await;
    throttle(&schema, 0.02).await;

    let started = Instant::now();
    let (mut rows_before, mut position_before) = (0, 0);
    for k in 1..=KILLS {
        let threshold = kill_threshold(&mut rng, k).max(rows_before + 20);
        run_and_kill(&config, &schema, threshold).await;
        let (position, rows, dead) = committed(&schema).await;
        println!(
            "kill {k} at {:.1} s: position {position}, {rows} rows, {dead} dead letters \
             (threshold {threshold})",
            started.elapsed().as_secs_f64()
        );
        assert!(rows > rows_before, "kill {k}: the run committed nothing");
        assert!(
            position < LINES as i64 && rows < VALID as i64,
            "kill {k}: the file was loaded before it (position {position}); it proves nothing"
        );
        assert_eq!(
            rows + dead,
            position,
            "kill {k}: what is committed is exactly the lines up to the position"
        );
        (rows_before, position_before) = (rows, position);
    }

    let rest = run_to_end(run_command(&config.path, None), LIMIT).await;
    rest.assert_success();
    println!(
        "the rerun finished at {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        rest.summary()
    );
    assert_eq!(
        rest.summary().received,
        LINES as u64 - position_before as u64,
        "the rerun read exactly the lines after the last committed position"
    );

    let expected: BTreeSet<String> = (0..LINES)
        .filter(|i| !(i + 1).is_multiple_of(BAD_EVERY))
        .map(user)
        .collect();
    assert_eq!(expected.len(), VALID);
    assert_exactly_once("loaded line", &schema.user_ids().await, &expected, "");

    let expected: BTreeSet<String> = (0..LINES)
        .filter(|i| (i + 1).is_multiple_of(BAD_EVERY))
        .map(line)
        .collect();
    assert_eq!(expected.len(), INVALID);
    assert_exactly_once("dead letter", &schema.reject_bodies().await, &expected, "");
    assert_eq!(
        committed(&schema).await.0,
        LINES as i64,
        "the position ends at the last line"
    );
}

/// Two runs of the same file at once (a second started by mistake), ledger off (`dedupe`) or on.
/// Each reads the committed position without a lock, so both load the same lines; the position is
/// written only while it is still before every line of its transaction, so only one of them
/// commits each line, and the other's transaction is rolled back and tried again, skipping what
/// the first committed. With the ledger on, both also claim the same keys: those claims wait for
/// the batch's turn, or a batch waiting for its turn while holding keys the other run's batch
/// waits for could close a circle of waits that PostgreSQL cannot see, and both runs would stall.
async fn two_runs_of_one_file_at_once(dedupe: bool) {
    const LINES: usize = 1500;
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("twice.ndjson");
    let body: String = (0..LINES).map(|i| line(i) + "\n").collect();
    std::fs::write(&path, body).expect("write");
    let config = TestConfig::write(&common::file_config(
        &schema,
        path_str(&path),
        "",
        "chunk_messages = 20",
        &format!("dedupe = {dedupe}\nbatch_rows = 20\nlinger_ms = 10"),
    ));
    migrate(&config.path).await;
    throttle(&schema, 0.01).await;

    // A few seconds' work each: a run still going after a minute is stalled.
    let limit = Duration::from_secs(60);
    let (first, second) = tokio::join!(
        run_to_end(run_command(&config.path, None), limit),
        run_to_end(run_command(&config.path, None), limit)
    );
    first.assert_success();
    second.assert_success();

    let valid: BTreeSet<String> = (0..LINES)
        .filter(|i| !(i + 1).is_multiple_of(BAD_EVERY))
        .map(user)
        .collect();
    assert_exactly_once("loaded line", &schema.user_ids().await, &valid, "");
    let invalid: BTreeSet<String> = (0..LINES)
        .filter(|i| (i + 1).is_multiple_of(BAD_EVERY))
        .map(line)
        .collect();
    assert_exactly_once("dead letter", &schema.reject_bodies().await, &invalid, "");
    assert_eq!(
        committed(&schema).await.0,
        LINES as i64,
        "the position ends at the last line"
    );
}

#[tokio::test]
async fn two_runs_of_one_file_at_once_load_every_line_once() {
    two_runs_of_one_file_at_once(false).await;
}

#[tokio::test]
async fn two_runs_of_one_deduplicated_file_at_once_load_every_line_once_and_never_stall() {
    two_runs_of_one_file_at_once(true).await;
}
