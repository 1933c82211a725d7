//! The network to AWS fails under a running daemon: sluice reaches the SQS emulator through a proxy
//! that the test cuts (connections dropped and refused, then held unanswered) and restores while a
//! producer keeps sending. The daemon rides it out: it keeps running, backs off (and says so in its
//! metrics), and when the line is back every message is loaded or dead-lettered exactly once and
//! the queue ends empty.

mod common;
mod kinesis_common;
mod kinesis_run;

use std::sync::Arc;
use std::time::Duration;

use common::fault_proxy::{Cut, FaultProxy};
use common::feed::{Feed, valid_and_invalid};
use common::*;
use kinesis_common::{TestStream, kinesis_endpoint};
use kinesis_run::kinesis_config;

/// A cut lasts until the producer has sent this many messages more (a few seconds).
const CUT_MESSAGES: u64 = 100;

#[tokio::test]
async fn an_sqs_endpoint_cut_and_restored_loses_nothing_and_shows_the_backoff() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let upstream = aws_endpoint();
    let proxy = proxy_to(&upstream).await;
    // A short visibility timeout: deletes that fail during a cut leave committed messages to come
    // back, and the test waits for them to be recognised as duplicates and deleted.
    let toml = sqs_config(
        &queue,
        &schema,
        "visibility_timeout_seconds = 10",
        "batch_rows = 50\nlinger_ms = 50",
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let config = through(&proxy, &upstream, &toml);
    let mut daemon = Watched::spawn(run_command(&config.path, None));
    let metrics = daemon.metrics_address().await;
    let scrape = || async { http_get(&metrics, "/metrics").await.1 };
    let retries = || async { metric_value(&scrape().await, "sluice_source_retries_total") };

    let feed = Feed::start(&queue);
    eventually(Duration::from_secs(60), "the first rows", || async {
        schema.rows_so_far().await > 0
    })
    .await;
    let before = retries()
        .await
        .expect("sluice_source_retries_total in the metrics");

    // Connections dropped, new ones closed as soon as they open: the receives fail and are
    // retried with growing pauses, while the producer goes on sending.
    proxy.cut(Cut::Refuse);
    eventually(Duration::from_secs(60), "retried receives", || async {
        retries().await.unwrap_or(0.0) >= before + 3.0
    })
    .await;
    ride_out_the_cuts(&proxy, &feed, &mut daemon, &metrics, &schema).await;

    let total = feed.stop().await;
    let invalid = valid_and_invalid(total).1;
    eventually(
        Duration::from_secs(90),
        "every message committed and deleted",
        || async { settled(&schema, total).await && queue.depth().await == (0, 0) },
    )
    .await;
    let last_scrape = scrape().await;
    signal(&daemon.child, "TERM");
    let run = daemon.finish(Duration::from_secs(60)).await;
    run.assert_success();

    assert_exactly_once(&schema, total, &run.stderr).await;
    assert_eq!(queue.depth().await, (0, 0));

    let value = |name| metric_value(&last_scrape, name).unwrap_or(0.0);
    assert!(value("sluice_source_retries_total") >= 3.0, "{last_scrape}");
    assert!(
        value("sluice_source_backoff_seconds_total") > 0.0,
        "{last_scrape}"
    );
    assert!(
        run.stderr.contains("SQS receive failed; retrying"),
        "{}",
        run.stderr
    );
    eprintln!(
        "{total} messages ({invalid} invalid), {} connections turned away; source retries {}, backoff {:.1} s",
        proxy.turned_away(),
        value("sluice_source_retries_total"),
        value("sluice_source_backoff_seconds_total"),
    );
}

/// The same through Kinesis: GetRecords (and shard discovery) fail while the line is cut, or hang
/// while it swallows requests, and are retried with growing pauses; the shard checkpoints committed with the rows make every record
/// load exactly once when it is back.
#[tokio::test]
async fn a_kinesis_endpoint_cut_and_restored_loses_nothing_and_shows_the_backoff() {
    let schema = TestSchema::new().await;
    let stream = Arc::new(TestStream::new(2).await);
    let upstream = kinesis_endpoint();
    let proxy = proxy_to(&upstream).await;
    let toml = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        kinesis_config(&stream, &schema, "", "batch_rows = 50\nlinger_ms = 50")
    );
    let config = through(&proxy, &upstream, &toml);
    let mut daemon = Watched::spawn(run_command(&config.path, None));
    let metrics = daemon.metrics_address().await;
    let scrape = || async { http_get(&metrics, "/metrics").await.1 };
    let retries = || async { metric_value(&scrape().await, "sluice_source_retries_total") };

    let producer = stream.clone();
    let feed = Feed::start_with(move |bodies| {
        let stream = producer.clone();
        async move {
            // The body as partition key spreads the records over both shards.
            let records: Vec<(String, Vec<u8>)> = bodies
                .into_iter()
                .map(|b| (b.clone(), b.into_bytes()))
                .collect();
            stream.put(&records).await;
        }
    });
    eventually(Duration::from_secs(60), "the first rows", || async {
        schema.rows_so_far().await > 0
    })
    .await;

    proxy.cut(Cut::Refuse);
    let before = retries().await.unwrap_or(0.0);
    eventually(Duration::from_secs(60), "retried reads", || async {
        retries().await.unwrap_or(0.0) >= before + 3.0
    })
    .await;
    ride_out_the_cuts(&proxy, &feed, &mut daemon, &metrics, &schema).await;

    let total = feed.stop().await;
    if !holds_within(Duration::from_secs(90), || settled(&schema, total)).await {
        panic!(
            "{} of {total} records loaded or dead-lettered after 90 s; the daemon said:\n{}",
            schema.rows_so_far().await as u64 + schema.dead_letters_so_far().await as u64,
            daemon.log()
        );
    }
    let last_scrape = scrape().await;
    signal(&daemon.child, "TERM");
    let run = daemon.finish(Duration::from_secs(60)).await;
    run.assert_success();
    assert_exactly_once(&schema, total, &run.stderr).await;
    let value = |name| metric_value(&last_scrape, name).unwrap_or(0.0);
    assert!(value("sluice_source_retries_total") >= 3.0, "{last_scrape}");
    assert!(
        value("sluice_source_backoff_seconds_total") > 0.0,
        "{last_scrape}"
    );
    eprintln!(
        "{total} records, {} connections turned away; source retries {}, backoff {:.1} s",
        proxy.turned_away(),
        value("sluice_source_retries_total"),
        value("sluice_source_backoff_seconds_total"),
    );
}

/// A proxy in front of `upstream` (an `http://host:port` address).
async fn proxy_to(upstream: &str) -> FaultProxy {
    FaultProxy::start(upstream.trim_start_matches("http://").trim_end_matches('/')).await
}

/// `toml` written with its `endpoint_url` pointed at `proxy` instead of `upstream`.
fn through(proxy: &FaultProxy, upstream: &str, toml: &str) -> TestConfig {
    let toml = toml.replace(
        &format!("endpoint_url = \"{upstream}\""),
        &format!("endpoint_url = \"{}\"", proxy.url()),
    );
    assert!(
        toml.contains(&proxy.url()),
        "the daemon must go through the proxy"
    );
    TestConfig::write(&toml)
}

/// The rest of a refused line, once the daemon has retried through it: `CUT_MESSAGES` more are
/// sent, the line is restored and the daemon catches up. Then a line that swallows requests
/// (connections open but nothing comes back until it is restored, when they are closed) while
/// `CUT_MESSAGES` more are sent. The daemon stays alive throughout.
async fn ride_out_the_cuts(
    proxy: &FaultProxy,
    feed: &Feed,
    daemon: &mut Watched,
    metrics: &str,
    schema: &TestSchema,
) {
    feed.sent_more(CUT_MESSAGES).await;
    assert!(
        proxy.turned_away() > 0,
        "the cut must have turned connections away"
    );
    assert_alive(daemon, metrics).await;
    proxy.restore();
    let sent = feed.sent();
    eventually(
        Duration::from_secs(90),
        "as many messages committed as were sent by the end of the cut",
        || caught_up(schema, sent),
    )
    .await;

    let turned_away = proxy.turned_away();
    proxy.cut(Cut::Blackhole);
    feed.sent_more(CUT_MESSAGES).await;
    eventually(
        Duration::from_secs(30),
        "a connection held unanswered",
        || async { proxy.turned_away() > turned_away },
    )
    .await;
    assert_alive(daemon, metrics).await;
    proxy.restore();
}

/// Every valid message of the `total` fed is a row once, every invalid one a dead letter once.
async fn assert_exactly_once(schema: &TestSchema, total: u64, log: &str) {
    let (valid, invalid) = valid_and_invalid(total);
    let (rows, users) = schema.rows_and_users().await;
    assert_eq!(
        (rows as u64, users as u64),
        (valid, valid),
        "every valid message exactly once\n{log}"
    );
    let rejects = schema.rejects().await;
    let mut bodies: Vec<&str> = rejects.iter().map(|(_, _, body)| body.as_str()).collect();
    bodies.dedup();
    assert_eq!(
        (rejects.len() as u64, bodies.len() as u64),
        (invalid, invalid),
        "every invalid message dead-lettered exactly once\n{log}"
    );
}

/// At least as many rows and dead letters as `sent` messages make (the producer goes on sending,
/// so this says the daemon has caught up, not that it has finished).
async fn caught_up(schema: &TestSchema, sent: u64) -> bool {
    let (valid, invalid) = valid_and_invalid(sent);
    schema.rows_so_far().await as u64 >= valid
        && schema.dead_letters_so_far().await as u64 >= invalid
}

/// Rows and dead letters account for all `sent` messages.
async fn settled(schema: &TestSchema, sent: u64) -> bool {
    let (valid, invalid) = valid_and_invalid(sent);
    schema.rows_so_far().await as u64 == valid
        && schema.dead_letters_so_far().await as u64 == invalid
}

/// The process still runs and its endpoint answers.
async fn assert_alive(daemon: &mut Watched, metrics: &str) {
    assert!(
        daemon.child.try_wait().expect("child status").is_none(),
        "sluice exited during the cut"
    );
    assert_eq!(http_get(metrics, "/healthz").await.0, 200);
}
