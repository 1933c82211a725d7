//! A dead letter is always storable, and a message that keeps coming back ends as one: neither can
//! crash-loop the daemon (SQS emulator and PostgreSQL).

mod common;

use std::time::Duration;

use common::*;

/// A dead-letter table that refuses long bodies (here a `varchar(1000)` column, standing in for
/// anything PostgreSQL will not store as it came): the dead letter is stored cut and escaped, with
/// its reason and the refusal, its good neighbours load, and the run ends cleanly.
#[tokio::test]
async fn a_dead_letter_the_database_refuses_is_stored_cut_with_its_reason() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    schema
        .client
        .batch_execute(&format!(
            "CREATE TABLE {}(message_id text, body varchar(1000), reason text, stage text,
                sent_at timestamptz, received_at timestamptz,
                rejected_at timestamptz NOT NULL DEFAULT now())",
            schema.dead_letters()
        ))
        .await
        .expect("a narrow dead-letter table");
    let huge = format!("not json {}", "é".repeat(3000));
    let bodies = vec![login("good-1"), huge, login("good-2")];
    queue.send(&bodies).await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(schema.rows_loaded().await, 2);
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    let (reason, stage, body) = &rejects[0];
    assert_eq!(stage, "parse");
    assert!(
        reason.starts_with("invalid JSON"),
        "the reason is kept: {reason}"
    );
    assert!(
        reason.contains("PostgreSQL refused it as it came") && reason.contains("varying(1000)"),
        "{reason}"
    );
    assert!(body.starts_with("not json \\u{e9}\\u{e9}"), "{body}");
    assert!(body.len() <= 1000, "{}", body.len());
    assert_eq!(queue.depth().await, (0, 0));
}

/// A message SQS has handed out more than `source.sqs.max_receives` times becomes a dead letter
/// saying so, and leaves the queue.
#[tokio::test]
async fn a_message_received_too_often_becomes_a_dead_letter() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    queue.send(&[login("looping")]).await;
    for _ in 0..3 {
        eventually(
            Duration::from_secs(20),
            "the message to be received",
            || async {
                let out = queue
                    .client
                    .receive_message()
                    .queue_url(&queue.url)
                    .visibility_timeout(0)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .expect("receive");
                !out.messages.unwrap_or_default().is_empty()
            },
        )
        .await;
    }
    queue.send(&[login("fresh")]).await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "max_receives = 2", "", ""));
    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(schema.rows_loaded().await, 1);
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    let (reason, stage, body) = &rejects[0];
    assert_eq!(
        reason,
        "received 4 times, more than `source.sqs.max_receives` (2)"
    );
    assert_eq!(stage, "source");
    assert!(body.contains("looping"), "{body}");
    assert_eq!(queue.depth().await, (0, 0));
}
