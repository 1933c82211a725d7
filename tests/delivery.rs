//! The delivery rules, proven against the real services: nothing acknowledged before commit, nothing
//! lost when the database goes away, bounded memory when the sink stalls, a clean drain on SIGTERM,
//! redeliveries skipped, and a poison row isolated.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sluice::sink::commit_record::Outcome;
use sluice::sink::ledger::LedgerKey;

/// Terminating sluice's database sessions again and again while messages flow: every message still
/// lands exactly once, and the queue ends empty.
#[tokio::test]
async fn no_message_is_lost_when_the_database_connection_is_cut() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let app = unique("sluice-cut-");
    let url = format!("{}?application_name={app}", database_url());
    let toml = sqs_config(
        &queue,
        &schema,
        "pollers = 2",
        "batch_rows = 40\nlinger_ms = 50",
        "",
    )
    .replace(
        &format!("url = \"{}\"", database_url()),
        &format!("url = \"{url}\""),
    );
    let config = TestConfig::write(&toml);
    const TOTAL: usize = 600;
    let bodies: Vec<String> = (0..TOTAL).map(|i| login(&format!("cut-{i}"))).collect();
    // The cuts start once the pipeline runs (its first rows are in): a start-up that cannot reach
    // its database is a different matter, tested with the start-up retries.
    let (first, rest) = bodies.split_at(50);
    queue.send(first).await;
    let daemon = run_command(&config.path, Some(4)).spawn().expect("spawn");
    eventually(Duration::from_secs(60), "the first rows", || async {
        schema.rows_so_far().await > 0
    })
    .await;
    let cutter = SessionCutter::start(&app);
    // Feed while sluice consumes, in slices, so the cuts land mid-stream.
    for slice in rest.chunks(50) {
        queue.send(slice).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kills = cutter.stop().await;

    let run = finish(daemon, Duration::from_secs(180)).await;
    run.assert_success();
    assert!(kills >= 3, "the test must actually cut connections");
    assert_eq!(
        schema.rows_and_users().await,
        (TOTAL as i64, TOTAL as i64),
        "{}",
        run.stderr
    );
    let summary = run.summary();
    assert_eq!(
        summary.loaded + summary.duplicates,
        summary.received,
        "{summary:?}"
    );
    assert!(
        run.stderr.contains("retrying"),
        "the cuts should have been noticed:\n{}",
        run.stderr
    );
    assert_eq!(queue.depth().await, (0, 0));
}

/// While the table is locked the sink cannot commit: the pollers stop at `max_in_flight`, the rest
/// stays in the queue, and visibility is extended so nothing held is redelivered meanwhile.
#[tokio::test]
async fn a_stalled_sink_bounds_the_messages_in_flight() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    const MAX_IN_FLIGHT: i64 = 40;
    // One poller (the default here): this test counts receives to prove visibility extension.
    let toml = sqs_config(
        &queue,
        &schema,
        &format!("max_in_flight = {MAX_IN_FLIGHT}\nvisibility_timeout_seconds = 4"),
        "batch_rows = 10\nlinger_ms = 50",
        "[pipeline]\nchannel_capacity = 2\n",
    );
    let config = TestConfig::write(&toml);
    migrate(&config.path).await;

    // Hold an exclusive lock: every COPY into the table waits.
    let mut locker = pg().await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        schema.table()
    ))
    .await
    .expect("lock");

    let daemon = run_command(&config.path, Some(3)).spawn().expect("spawn");
    const TOTAL: usize = 300;
    let bodies: Vec<String> = (0..TOTAL).map(|i| login(&format!("stall-{i}"))).collect();
    queue.send(&bodies).await;

    // Over twice the visibility timeout, the queue never shows more than the bound in flight.
    let mut peak = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (visible, in_flight) = queue.depth().await;
        assert!(
            in_flight <= MAX_IN_FLIGHT,
            "{in_flight} in flight, bound is {MAX_IN_FLIGHT}"
        );
        assert!(
            visible >= TOTAL as i64 - MAX_IN_FLIGHT,
            "only {visible} left in the queue"
        );
        peak = peak.max(in_flight);
    }
    assert!(peak > 0, "sluice should hold some messages while stalled");

    lock.rollback().await.expect("release the lock");
    let run = finish(daemon, Duration::from_secs(180)).await;
    run.assert_success();
    assert_eq!(schema.rows_loaded().await, TOTAL as i64);
    let summary = run.summary();
    assert_eq!(summary.loaded, TOTAL as u64);
    assert_eq!(
        summary.received, TOTAL as u64,
        "visibility was not extended: messages were redelivered\n{}",
        run.stderr
    );
    assert_eq!(queue.depth().await, (0, 0));
}

/// SIGTERM stops receiving, drains what was received into the table, acknowledges it and exits 0;
/// the rest stays in the queue, visible, for the next run.
#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    const TOTAL: usize = 400;
    let bodies: Vec<String> = (0..TOTAL).map(|i| login(&format!("term-{i}"))).collect();
    queue.send(&bodies).await;
    let config = TestConfig::write(&sqs_config(
        &queue,
        &schema,
        "",
        "batch_rows = 20\nlinger_ms = 50",
        "",
    ));
    let daemon = run_command(&config.path, None).spawn().expect("spawn");

    eventually(Duration::from_secs(60), "the first rows", || async {
        schema.rows_so_far().await >= 20
    })
    .await;
    signal(&daemon, "TERM");
    let run = finish(daemon, Duration::from_secs(40)).await;
    run.assert_success();
    let summary = run.summary();
    assert!(
        summary.received < TOTAL as u64,
        "stopped too late to prove anything: {summary:?}"
    );
    assert_eq!(
        summary.loaded, summary.received,
        "everything received is committed: {summary:?}"
    );
    assert_eq!(schema.rows_loaded().await as u64, summary.loaded);
    let (visible, in_flight) = queue.depth().await;
    assert_eq!(in_flight, 0, "nothing may stay held after the drain");
    assert_eq!(visible as u64, TOTAL as u64 - summary.received);

    // A generous idle time: a busy queue server can take seconds to answer the first receive.
    let rest = run_until_idle(&config.path, 5).await;
    rest.assert_success();
    assert_eq!(schema.rows_loaded().await, TOTAL as i64);
    assert_eq!(queue.depth().await, (0, 0));
}

/// A message whose row was committed but which was never deleted (the crash case) comes back: the
/// ledger recognises it by its SQS message id, skips it and deletes it, also when a version of
/// sluice before ordered keys committed it. A producer resending with the same dedupe id is skipped
/// the same way.
#[tokio::test]
async fn redelivered_messages_are_skipped_not_loaded_twice() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    migrate(&config.path).await;

    // "Committed before a crash": receive them, record their keys in the ledger, leave them in the
    // queue. One as this version records it, one as versions before ordered keys did.
    queue
        .send(&[
            login("crashed-before-delete"),
            login("crashed-before-upgrade"),
        ])
        .await;
    let mut received = Vec::new();
    while received.len() < 2 {
        received.extend(
            queue
                .client
                .receive_message()
                .queue_url(&queue.url)
                .visibility_timeout(1)
                .max_number_of_messages(2)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await
                .expect("receive")
                .messages
                .unwrap_or_default(),
        );
    }
    assert_eq!(received.len(), 2);
    let ledger_insert = format!("INSERT INTO {} (scoped_key) VALUES ($1)", schema.ledger());
    let first_delivery = ledger_keys(&queue, &received[0], None, Outcome::Row).await;
    assert_eq!(
        first_delivery.earlier, None,
        "a first delivery claims one key"
    );
    let earlier_version = LedgerKey::of(&[
        b"sqs",
        queue.arn().await.as_bytes(),
        b"message",
        received[1].message_id.as_deref().expect("id").as_bytes(),
    ]);
    for key in [first_delivery.key, earlier_version] {
        schema
            .client
            .execute(&ledger_insert, &[&key.0.as_slice()])
            .await
            .expect("ledger");
    }
    // The producer sent this login twice, with one idempotency key; plus one ordinary message.
    queue
        .send_with_ids(
            &[login("resent"), login("resent"), login("fresh")],
            &["k-resent", "k-resent", "k-fresh"],
        )
        .await;
    // The received messages are invisible for a second: wait until the queue shows all five.
    eventually(
        Duration::from_secs(20),
        "the messages to be visible again",
        || async { queue.depth().await == (5, 0) },
    )
    .await;

    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(
        run.summary(),
        Summary {
            received: 5,
            loaded: 2,
            rejected: 0,
            duplicates: 3
        }
    );
    let users: Vec<String> = schema
        .client
        .query(
            &format!("SELECT user_id FROM {} ORDER BY 1", schema.table()),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(users, ["fresh", "resent"]);
    assert_eq!(queue.depth().await, (0, 0));
}

/// A row the database refuses (here: a CHECK constraint the operator added) is found by splitting the
/// batch, dead-lettered with PostgreSQL's error, and does not hold back its neighbours.
#[tokio::test]
async fn a_poison_row_is_dead_lettered_and_its_neighbours_load() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(
        &queue,
        &schema,
        "",
        "batch_rows = 100\nlinger_ms = 1500",
        "",
    ));
    migrate(&config.path).await;
    schema
        .client
        .batch_execute(&format!(
            "ALTER TABLE {} ADD CONSTRAINT no_test_locale CHECK (locale IS DISTINCT FROM 'XX')",
            schema.table()
        ))
        .await
        .expect("constraint");
    let mut bodies: Vec<String> = (0..30).map(|i| login(&format!("n-{i}"))).collect();
    bodies[7] = bodies[7].replace("\"RU\"", "\"XX\"");
    bodies[21] = bodies[21].replace("\"RU\"", "\"XX\"");
    queue.send(&bodies).await;

    let run = run_until_idle(&config.path, 3).await;
    run.assert_success();
    assert_eq!(
        run.summary(),
        Summary {
            received: 30,
            loaded: 28,
            rejected: 2,
            duplicates: 0
        }
    );
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), 2);
    for (reason, stage, body) in rejects {
        assert_eq!(stage, "sink");
        assert!(body.contains("\"XX\""), "{body}");
        assert!(
            reason.contains("no_test_locale") && reason.contains("23514"),
            "{reason}"
        );
    }
    assert_eq!(queue.depth().await, (0, 0));
}

/// Short visibility and small batches, so held messages and their release show quickly.
fn stuck_config(schema: &TestSchema, queue: &TestQueue, extra: &str) -> TestConfig {
    TestConfig::write(&sqs_config(
        queue,
        schema,
        "visibility_timeout_seconds = 3",
        "batch_rows = 10\nlinger_ms = 50",
        extra,
    ))
}

/// Sets up a daemon whose sink is stuck on a table lock while it holds messages.
async fn stuck_daemon(
    schema: &TestSchema,
    queue: &TestQueue,
    extra: &str,
) -> (TestConfig, Watched, tokio_postgres::Client) {
    let config = stuck_config(schema, queue, extra);
    migrate(&config.path).await;
    let locker = pg().await;
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            schema.table()
        ))
        .await
        .expect("lock");
    let daemon = Watched::spawn(run_command(&config.path, None));
    let bodies: Vec<String> = (0..50).map(|i| login(&format!("stuck-{i}"))).collect();
    queue.send(&bodies).await;
    eventually(
        Duration::from_secs(30),
        "sluice to hold messages",
        || async { queue.depth().await.1 > 0 },
    )
    .await;
    (config, daemon, locker)
}

/// When the drain cannot finish (the database is stuck), shutdown gives up after
/// `shutdown_timeout_seconds`, hands the held messages straight back to the queue and exits non-zero.
#[tokio::test]
async fn a_drain_that_cannot_finish_releases_held_messages() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let (config, daemon, locker) = stuck_daemon(
        &schema,
        &queue,
        "[pipeline]\nshutdown_timeout_seconds = 3\n",
    )
    .await;
    signal(&daemon.child, "TERM");
    let run = daemon.finish(Duration::from_secs(20)).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("did not drain"), "{}", run.stderr);
    assert!(
        run.stderr.contains("(still running: ") && run.stderr.contains("sink)"),
        "the error names what did not finish: {}",
        run.stderr
    );
    // Released with visibility 0: visible again at once, well before the 3 s timeout would expire.
    assert_eq!(queue.depth().await, (50, 0));

    locker.batch_execute("ROLLBACK").await.expect("unlock");
    // An idle stop's wait for the last long poll does not count against the drain timeout.
    let rest = run_until_idle(&config.path, 2).await;
    rest.assert_success();
    assert_eq!(schema.rows_loaded().await, 50);
}

/// A second signal exits at once without acknowledging anything uncommitted: the queue delivers those
/// messages again after their visibility timeout, and they load exactly once.
#[tokio::test]
async fn a_second_signal_exits_at_once_and_acknowledges_nothing_uncommitted() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let (config, daemon, locker) = stuck_daemon(&schema, &queue, "").await;
    signal(&daemon.child, "TERM");
    daemon
        .line_containing("shutting down", Duration::from_secs(10))
        .await;
    signal(&daemon.child, "INT");
    let run = daemon.finish(Duration::from_secs(5)).await;
    assert_eq!(run.code, Some(130), "{}", run.stderr);
    let (visible, in_flight) = queue.depth().await;
    assert_eq!(visible + in_flight, 50, "nothing may have been deleted");

    locker.batch_execute("ROLLBACK").await.expect("unlock");
    eventually(
        Duration::from_secs(30),
        "held messages to become visible again",
        || async { queue.depth().await == (50, 0) },
    )
    .await;
    let rest = run_until_idle(&config.path, 2).await;
    rest.assert_success();
    assert_eq!(schema.rows_loaded().await, 50);
}

/// The same receipt handle acknowledged twice (an emulator, like SQS, can hand one message to two
/// concurrent receives) must not make the whole DeleteMessageBatch call fail: the message is deleted
/// and its room in the in-flight bound is given back once.
#[tokio::test]
async fn a_receipt_handle_acknowledged_twice_is_deleted_once() {
    use sluice::envelope::AckToken;
    use sluice::source::Acknowledger;
    use sluice::source::sqs::SqsAcknowledger;
    use sluice::source::sqs::in_flight::InFlight;

    let queue = TestQueue::new().await;
    queue.send(&[login("twice-1"), login("twice-2")]).await;
    let mut handles = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while handles.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "messages not received"
        );
        let out = queue
            .client
            .receive_message()
            .queue_url(&queue.url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(60)
            .send()
            .await
            .expect("receive");
        handles.extend(
            out.messages
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| m.receipt_handle),
        );
    }
    let in_flight = Arc::new(InFlight::new(10));
    in_flight.reserve(2).await;
    in_flight.track(
        handles.iter().map(String::as_str),
        tokio::time::Instant::now(),
    );
    let acknowledger = SqsAcknowledger::new(
        queue.client.clone(),
        queue.url.clone(),
        in_flight.clone(),
        Duration::from_secs(60),
        Arc::new(sluice::stats::Stats::default()),
    );
    let tokens: Vec<AckToken> = [&handles[0], &handles[0], &handles[1]]
        .into_iter()
        .map(|h| AckToken::Sqs {
            receipt_handle: h.clone(),
        })
        .collect();
    acknowledger.acknowledge(tokens).await;
    assert!(in_flight.is_empty());
    assert_eq!(acknowledger.finish().await, 0);
    eventually(Duration::from_secs(10), "the queue to be empty", || async {
        queue.depth().await == (0, 0)
    })
    .await;
}

/// An idle exit waits for the long polls in progress to return (so that no message arriving
/// meanwhile is stranded) and that wait is not part of the drain: a run that loaded and acknowledged
/// everything exits 0 even when a long poll outlasts `shutdown_timeout_seconds`.
#[tokio::test]
async fn an_idle_exit_outlasting_the_drain_timeout_still_exits_zero() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let bodies: Vec<String> = (0..20).map(|i| login(&format!("idle-{i}"))).collect();
    queue.send(&bodies).await;
    let config = TestConfig::write(&sqs_config(
        &queue,
        &schema,
        "wait_time_seconds = 8",
        "",
        "[pipeline]\nshutdown_timeout_seconds = 3\n",
    ));
    let run = run_until_idle(&config.path, 1).await;
    run.assert_success();
    assert_eq!(run.summary().loaded, 20);
    assert_eq!(queue.depth().await, (0, 0));
}
