//! What operators watch: a scrape of `/metrics` taken while the daemon runs agrees with what landed
//! in PostgreSQL, the queue's depth and arrival rate are exported for an autoscaler, and the
//! progress line appears at its interval.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// Bodies `prefix-0` …: every seventh one lacks its `user_id` and becomes a dead letter.
fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 7 == 3 {
                format!(r#"{{"seq": "{prefix}-{i}"}}"#)
            } else {
                login(&format!("{prefix}-{i}"))
            }
        })
        .collect()
}

#[tokio::test]
async fn a_scrape_during_a_run_matches_postgres_and_shows_the_queue() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let extra_sqs = "depth_sample_seconds = 1";
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nprogress_interval_seconds = 1\n";
    let config = TestConfig::write(&sqs_config(&queue, &schema, extra_sqs, "", extra));
    // A backlog before the start: the first sample, taken as the source starts, sees it.
    let first = bodies("a", 200);
    queue.send(&first).await;
    let daemon = Watched::spawn(run_command(&config.path, None));
    let addr = daemon.metrics_address().await;

    let mut most_waiting = 0.0f64;
    let mut most_arriving = 0.0f64;
    let mut fed = false;
    let total = 300.0;
    let started = std::time::Instant::now();
    loop {
        let scrape = http_get(&addr, "/metrics").await.1;
        let value = |name| metric_value(&scrape, name).unwrap_or(0.0);
        most_waiting = most_waiting.max(value("sluice_queue_messages_waiting"));
        most_arriving = most_arriving.max(value("sluice_queue_arrival_per_second"));
        let acknowledged = value("sluice_messages_acknowledged_total");
        if acknowledged >= total {
            break;
        }
        if !fed && acknowledged > 0.0 {
            // More traffic while the daemon consumes: the arrival rate must see it.
            queue.send(&bodies("b", 100)).await;
            fed = true;
        }
        assert!(
            started.elapsed() < LIMIT,
            "not every message acknowledged after {LIMIT:?}:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let scrape = http_get(&addr, "/metrics").await.1;
    let value =
        |name| metric_value(&scrape, name).unwrap_or_else(|| panic!("no {name}:\n{scrape}"));
    let rows = schema.rows_loaded().await as f64;
    let dead_letters = schema.count(&schema.dead_letters()).await as f64;
    assert_eq!(value("sluice_rows_loaded_total"), rows, "{scrape}");
    assert_eq!(value("sluice_dead_letters_total"), dead_letters, "{scrape}");
    assert_eq!(rows + dead_letters, total);
    assert_eq!(value("sluice_messages_received_total"), total);
    assert_eq!(value("sluice_duplicates_total"), 0.0);
    assert!(most_waiting > 0.0, "the backlog was never sampled");
    assert!(
        most_arriving > 0.0,
        "the arrivals while running were never seen"
    );

    let progress = daemon.lines_containing("progress");
    assert!(
        progress.iter().any(|l| l.contains("loaded_per_s=")
            && l.contains("commits_total=")
            && l.contains("queue_waiting=")),
        "no progress line with rates, commits and queue depth:\n{progress:#?}"
    );
    // The batcher's choices: an interval with commits shows its batch sizes, each at least one.
    let sized = |l: &&String, field: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(field))
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 1.0)
    };
    assert!(
        progress.iter().any(|l| sized(&l, "batch_mean=")
            && sized(&l, "batch_last=")
            && sized(&l, "batch_max=")),
        "no progress line with the batch sizes chosen:\n{progress:#?}"
    );
    signal(&daemon.child, "TERM");
    let out = daemon.finish(LIMIT).await;
    out.assert_success();
    let summary = out.summary();
    assert_eq!(
        (summary.loaded as f64, summary.rejected as f64),
        (rows, dead_letters)
    );
}

/// Every `sluice_*` metric name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("sluice_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every string under a key named `expr` or `query` in the dashboard (panel targets, variables).
fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The Grafana dashboard and the autoscaling rule under deploy/ query only metrics that a running
/// sluice exports.
#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/sluice-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let mut found = Vec::new();
    queries(&dashboard, &mut found);
    // The autoscaling rule's queries too.
    let keda = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/keda-scaledobject.yaml"
    );
    found.push(std::fs::read_to_string(keda).expect("read the autoscaling rule"));
    let mut names: Vec<String> = found.iter().flat_map(|q| metric_names(q)).collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 15, "too few metrics found: {names:?}");

    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", extra));
    let daemon = Watched::spawn(run_command(&config.path, None));
    let addr = daemon.metrics_address().await;
    queue.send(&[login("dash-1"), "{}".into()]).await;
    eventually(LIMIT, "both messages acknowledged", || async {
        metric_value(
            &http_get(&addr, "/metrics").await.1,
            "sluice_messages_acknowledged_total",
        ) == Some(2.0)
    })
    .await;
    let scrape = http_get(&addr, "/metrics").await.1;
    let exported = |name: &str| {
        scrape.lines().any(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
    };
    let missing: Vec<&String> = names.iter().filter(|n| !exported(n)).collect();
    assert!(
        missing.is_empty(),
        "not in the scrape: {missing:?}\n{scrape}"
    );
    signal(&daemon.child, "TERM");
    daemon.finish(LIMIT).await.assert_success();
}
