//! The database goes away under a running daemon: a cluster of the test's own is stopped cleanly,
//! has every sluice session terminated, and is crashed, each while messages flow. Nothing is lost
//! or loaded twice, and `/readyz` says the daemon is not ready for exactly as long as it has no
//! database.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::cluster::{PrivateCluster, StopMode};
use common::feed::{Feed, valid_and_invalid};
use common::*;

/// An outage lasts until the producer has sent this many messages more.
const OUTAGE_MESSAGES: u64 = 100;

const TABLE: &str = "public.user_logins";
const DEAD_LETTERS: &str = "public.user_logins_rejected";

#[tokio::test]
async fn postgres_restarts_and_terminated_sessions_lose_nothing_and_show_in_readyz() {
    let cluster = PrivateCluster::start().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&format!(
        r#"
[source]
kind = "sqs"

[source.sqs]
queue_url = "{queue}"
endpoint_url = "{endpoint}"
region = "us-east-1"
pollers = 1
wait_time_seconds = 1
visibility_timeout_seconds = 30

[sink.postgres]
url = "{db}"
table = "{TABLE}"
batch_rows = 50
linger_ms = 50

[dead_letter]
table = "{DEAD_LETTERS}"

[metrics]
listen = "127.0.0.1:0"
"#,
        queue = queue.url,
        endpoint = aws_endpoint(),
        db = cluster.url(),
    ));
    let daemon = Watched::spawn(run_command(&config.path, None));
    let metrics = daemon.metrics_address().await;

    let feed = Feed::start(&queue);
    let rows = || async {
        cluster
            .number(&format!("SELECT count(*) FROM {TABLE}"))
            .await
    };
    let dead_letters = || async {
        cluster
            .number(&format!("SELECT count(*) FROM {DEAD_LETTERS}"))
            .await
    };
    let ready = || async { http_get(&metrics, "/readyz").await.0 == 200 };

    eventually(Duration::from_secs(60), "the first rows", || async {
        ready().await && rows().await > 0
    })
    .await;

    // 1. A clean stop of an idle daemon's database (everything sent so far committed and deleted):
    //    no commit fails, yet the daemon must notice it has no database. Messages sent during the
    //    outage wait; the daemon reconnects when the server is back.
    feed.paused.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(90), "the daemon to be idle", || async {
        let sent = feed.sent() as i64;
        rows().await + dead_letters().await == sent && queue.depth().await == (0, 0)
    })
    .await;
    cluster.stop(StopMode::Fast).await;
    assert_not_ready_while_down(&metrics).await;
    feed.paused.store(false, Ordering::SeqCst);
    feed.sent_more(OUTAGE_MESSAGES).await;
    assert_not_ready_while_down(&metrics).await;
    cluster.resume().await;
    progress_after_restart(&metrics, &rows).await;

    // 2. Every sluice session terminated, the server staying up.
    let before = rows().await;
    let terminated = cluster
        .number(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name LIKE 'sluice%' AND pid <> pg_backend_pid()",
        )
        .await;
    assert!(terminated >= 1, "sluice held no session to terminate");
    eventually(
        Duration::from_secs(90),
        "rows after the terminations",
        || async { rows().await > before },
    )
    .await;

    // 3. A crash: no shutdown at all, the next start recovers from the WAL.
    cluster.stop(StopMode::Immediate).await;
    assert_not_ready_while_down(&metrics).await;
    feed.sent_more(OUTAGE_MESSAGES).await;
    assert_not_ready_while_down(&metrics).await;
    cluster.resume().await;
    progress_after_restart(&metrics, &rows).await;

    let total = feed.stop().await;
    let (valid, invalid) = valid_and_invalid(total);
    eventually(
        Duration::from_secs(90),
        "every message committed and deleted",
        || async {
            rows().await as u64 == valid
                && dead_letters().await as u64 == invalid
                && queue.depth().await == (0, 0)
        },
    )
    .await;
    signal(&daemon.child, "TERM");
    let run = daemon.finish(Duration::from_secs(60)).await;
    run.assert_success();

    let exactly_once = |table: &str, column: &str| {
        format!("SELECT count(*) - count(DISTINCT {column}) FROM {table}")
    };
    assert_eq!(
        cluster.number(&exactly_once(TABLE, "user_id")).await,
        0,
        "a login loaded twice"
    );
    assert_eq!(
        cluster.number(&exactly_once(DEAD_LETTERS, "body")).await,
        0,
        "a dead letter stored twice"
    );
    assert_eq!(rows().await as u64, valid, "{}", run.stderr);
    assert_eq!(dead_letters().await as u64, invalid, "{}", run.stderr);
    assert_eq!(queue.depth().await, (0, 0));
    eprintln!(
        "{total} messages ({invalid} invalid); the daemon said:\n{}",
        run.stderr
            .lines()
            .filter(|l| l.contains("PostgreSQL") || l.contains("retrying"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        run.stderr.contains("retrying"),
        "the outages should have been noticed:\n{}",
        run.stderr
    );
}

/// While the server is down, `/readyz` answers 503 saying there is no PostgreSQL connection (and
/// the process stays up).
async fn assert_not_ready_while_down(metrics: &str) {
    eventually(
        Duration::from_secs(30),
        "/readyz to report not ready while PostgreSQL is down",
        || async { http_get(metrics, "/readyz").await.0 == 503 },
    )
    .await;
    let (status, body) = http_get(metrics, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no PostgreSQL connection"), "{body}");
    assert_eq!(http_get(metrics, "/healthz").await.0, 200);
}

/// After a restart, the daemon reconnects: ready again, and rows keep coming.
async fn progress_after_restart<F, Fut>(metrics: &str, rows: &F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let before = rows().await;
    eventually(
        Duration::from_secs(90),
        "/readyz to report ready after the restart",
        || async { http_get(metrics, "/readyz").await.0 == 200 },
    )
    .await;
    eventually(
        Duration::from_secs(90),
        "rows after the restart",
        || async { rows().await > before },
    )
    .await;
}
