//! The dead-letter queue is a copy, the dead-letter table the record of truth: whatever the queue
//! refuses (a missing queue, a body over its size limit, bodies over the batch limit) never stops
//! rows from loading, and what it can take reaches it.

mod common;

use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// The config of `sqs_config` with rejects also forwarded to `dlq_url`.
fn with_dead_letter_queue(queue: &TestQueue, schema: &TestSchema, dlq_url: &str) -> String {
    let extra = format!("[dead_letter]\nsqs_queue_url = \"{dlq_url}\"\n");
    sqs_config(queue, schema, "", "", "").replace("[dead_letter]\n", &extra)
}

/// One message per call: bodies this large exceed the batch limit together.
async fn send_one_by_one(queue: &TestQueue, bodies: &[String]) {
    for body in bodies {
        queue
            .client
            .send_message()
            .queue_url(&queue.url)
            .message_body(body)
            .send()
            .await
            .expect("send");
    }
}

/// Bodies forwarded to `dlq`, by length, received until `expected` arrived or 20 s passed.
async fn forwarded_lengths(dlq: &TestQueue, expected: usize) -> Vec<usize> {
    let mut lengths = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while lengths.len() < expected && std::time::Instant::now() < deadline {
        let out = dlq
            .client
            .receive_message()
            .queue_url(&dlq.url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive");
        lengths.extend(
            out.messages
                .unwrap_or_default()
                .iter()
                .map(|m| m.body().unwrap_or_default().len()),
        );
    }
    lengths.sort_unstable();
    lengths
}

/// A reject body of `len` bytes: valid JSON without `user_id`.
fn big_reject(len: usize) -> String {
    let filler = "x".repeat(len - r#"{"filler":""}"#.len());
    format!("{{\"filler\":\"{filler}\"}}")
}

#[tokio::test]
async fn a_missing_dead_letter_queue_never_stops_the_loading() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let gone = TestQueue::new().await;
    let gone_url = gone.url.clone();
    drop(gone);
    let bodies: Vec<String> = (0..30)
        .map(|i| {
            if i % 6 == 0 {
                format!("{{\"bad\": {i}}}")
            } else {
                login(&format!("dlq-gone-{i}"))
            }
        })
        .collect();
    queue.send(&bodies).await;
    let config = TestConfig::write(&with_dead_letter_queue(&queue, &schema, &gone_url));
    let run = run_to_end(run_command(&config.path, Some(2)), LIMIT).await;
    run.assert_success();
    assert_eq!(
        run.summary(),
        Summary {
            received: 30,
            loaded: 25,
            rejected: 5,
            duplicates: 0
        }
    );
    assert_eq!(schema.rows_loaded().await, 25);
    assert_eq!(schema.rejects().await.len(), 5);
    assert!(
        run.stderr.contains("not forwarded"),
        "the operator must be told: {}",
        run.stderr
    );
    assert_eq!(queue.depth().await, (0, 0));
}

#[tokio::test]
async fn forwarding_respects_the_queues_size_limits() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let dlq = TestQueue::new().await;
    dlq.client
        .set_queue_attributes()
        .queue_url(&dlq.url)
        .attributes(QueueAttributeName::MaximumMessageSize, "200000")
        .send()
        .await
        .expect("set the size limit");
    // Ten bodies that fit the queue one by one but not in one batch call, one body over the
    // queue's limit, and good rows around them.
    let mut bodies: Vec<String> = (0..10).map(|_| big_reject(120_000)).collect();
    bodies.push(big_reject(250_000));
    bodies.extend((0..5).map(|i| login(&format!("dlq-size-{i}"))));
    send_one_by_one(&queue, &bodies).await;
    let config = TestConfig::write(&with_dead_letter_queue(&queue, &schema, &dlq.url));
    let run = run_to_end(run_command(&config.path, Some(2)), LIMIT).await;
    run.assert_success();
    assert_eq!(
        run.summary(),
        Summary {
            received: 16,
            loaded: 5,
            rejected: 11,
            duplicates: 0
        }
    );
    assert_eq!(schema.rejects().await.len(), 11);
    assert_eq!(forwarded_lengths(&dlq, 10).await, vec![120_000; 10]);
    assert_eq!(queue.depth().await, (0, 0));
}
