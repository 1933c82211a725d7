//! Dedupe keys are scoped to their source: files do not take each other's lines for duplicates,
//! deployments sharing a ledger table do not suppress each other's messages, and a dead-lettered
//! event does not block its corrected resend, while a redelivery of the very same rejected message
//! is still recognised.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use sluice::envelope::{AckToken, MessageId, Meta, Reject, Stage};
use sluice::sink::Committer;
use sluice::sink::batch::Batch;
use sluice::sink::commit_order::Turn;
use sluice::sink::ledger::LedgerRecord;
use sluice::source::sqs::SqsLedgerKeys;

const LIMIT: Duration = Duration::from_secs(90);

fn file_config(schema: &TestSchema, path: &str) -> String {
    common::file_config(schema, path, "", "", "dedupe = true")
}

async fn run_file(schema: &TestSchema, path: &std::path::Path) -> Summary {
    let config = TestConfig::write(&file_config(schema, path_str(path)));
    let run = run_to_end(run_command(&config.path, None), LIMIT).await;
    run.assert_success();
    run.summary()
}

#[tokio::test]
async fn files_do_not_take_each_others_lines_for_duplicates() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let a = dir.path().join("a.ndjson");
    let b = dir.path().join("b.ndjson");
    std::fs::write(&a, format!("{}\n{}\n", login("a-1"), login("a-2"))).expect("write a");
    std::fs::write(
        &b,
        format!("{}\n{}\n{}\n", login("b-1"), login("b-2"), login("b-3")),
    )
    .expect("write b");

    let first = run_file(&schema, &a).await;
    assert_eq!((first.loaded, first.duplicates), (2, 0));
    let other = run_file(&schema, &b).await;
    assert_eq!(
        (other.loaded, other.duplicates),
        (3, 0),
        "b's lines are not a's"
    );
    let again = run_file(&schema, &a).await;
    assert_eq!(
        (again.received, again.loaded),
        (0, 0),
        "a run again loads nothing: it resumes after the committed end"
    );
    assert_eq!(schema.rows_loaded().await, 5);
}

#[tokio::test]
async fn deployments_sharing_a_ledger_do_not_suppress_each_other() {
    let ledger_owner = TestSchema::new().await;
    let (one, two) = (TestSchema::new().await, TestSchema::new().await);
    let (queue_one, queue_two) = (TestQueue::new().await, TestQueue::new().await);
    let bodies: Vec<String> = (0..5).map(|i| login(&format!("shared-{i}"))).collect();
    let ids = ["k0", "k1", "k2", "k3", "k4"];
    for (schema, queue) in [(&one, &queue_one), (&two, &queue_two)] {
        queue.send_with_ids(&bodies, &ids).await;
        let toml =
            sqs_config(queue, schema, "", "", "").replace(&schema.ledger(), &ledger_owner.ledger());
        let config = TestConfig::write(&toml);
        let run = run_until_idle(&config.path, 2).await;
        run.assert_success();
        assert_eq!(run.summary().loaded, 5, "{}", run.stderr);
        assert_eq!(schema.rows_loaded().await, 5);
    }
    assert_eq!(ledger_owner.count(&ledger_owner.ledger()).await, 10);
}

#[tokio::test]
async fn a_dead_lettered_event_does_not_block_its_corrected_resend() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    let bad = login("resent").replace("\"2.3.0\"", "\"v2.3\"");
    queue.send_with_ids(&[bad], &["k-resent"]).await;
    let first = run_until_idle(&config.path, 2).await;
    first.assert_success();
    assert_eq!(first.summary().rejected, 1, "{}", first.stderr);

    queue.send_with_ids(&[login("resent")], &["k-resent"]).await;
    let second = run_until_idle(&config.path, 2).await;
    second.assert_success();
    assert_eq!(
        (second.summary().loaded, second.summary().duplicates),
        (1, 0),
        "{}",
        second.stderr
    );
    assert_eq!(schema.rows_loaded().await, 1);
    assert_eq!(schema.count(&schema.dead_letters()).await, 1);
}

/// At the committer: a rejected message's redelivery is a duplicate (its dead letter is stored
/// once), and the same producer key on a new message still loads.
#[tokio::test]
async fn a_redelivered_dead_letter_is_stored_once() {
    let schema = TestSchema::new().await;
    let (tables, mut committer) = committer_in(&schema, true).await;
    let record = LedgerRecord::new(&tables.ledger, Arc::new(SqsLedgerKeys::new("arn:test:q")));

    let meta = |id: &str| {
        let mut meta = Meta::at_position(1, SystemTime::now());
        meta.message_id = MessageId::Text(id.to_owned());
        meta.dedupe_key = Some("k1".to_owned());
        meta.ack = AckToken::Sqs {
            receipt_handle: format!("rh-{id}"),
        };
        meta
    };
    let rejected = || Reject {
        body: "{}".into(),
        meta: meta("m1"),
        stage: Stage::Parse,
        reason: "missing field `user_id`".into(),
    };
    for (round, duplicates) in [(1, 0), (2, 1)] {
        let commit = committer
            .commit(
                Batch::new(Vec::new(), vec![rejected()]),
                &record,
                &mut Turn::free(),
            )
            .await
            .expect("commit");
        let counts = commit.committed[0].counts;
        assert_eq!(
            (counts.rejected, counts.duplicates),
            (1 - duplicates, duplicates),
            "round {round}"
        );
    }
    assert_eq!(schema.count(&schema.dead_letters()).await, 1);

    // The corrected event: a new message carrying the same producer key.
    let envelope = sluice::envelope::Envelope {
        body: login("corrected"),
        meta: meta("m2"),
    };
    let event = sluice::stage::parse::parse_login(envelope).unwrap_or_else(|_| panic!("valid"));
    let transformer = sluice::stage::transform::Transformer::new(
        sluice::stage::mask::Masker::new(
            sluice::stage::mask::MaskMode::HmacSha256,
            &sluice::stage::mask::MaskKey::from_bytes(MASK_KEY.as_bytes()),
        )
        .expect("a hash key"),
        Default::default(),
        Default::default(),
    );
    let row = transformer
        .transform(event, chrono::Utc::now().date_naive())
        .unwrap_or_else(|_| panic!("a row"));
    let commit = committer
        .commit(
            Batch::new(vec![row], Vec::new()),
            &record,
            &mut Turn::free(),
        )
        .await
        .expect("commit");
    assert_eq!(commit.committed[0].counts.loaded, 1);
    assert_eq!(schema.rows_loaded().await, 1);
}

/// At the committer: a batch whose ledger keys the batcher made ahead claims exactly what one
/// whose keys are made in the transaction claims, on the all-new path and on the fallback alike.
#[tokio::test]
async fn keys_made_ahead_claim_what_keys_made_in_the_transaction_claim() {
    let schema = TestSchema::new().await;
    let (tables, mut committer) = committer_in(&schema, true).await;
    let record = LedgerRecord::new(&tables.ledger, Arc::new(SqsLedgerKeys::new("arn:test:q")));
    let rejected = |id: &str| {
        let mut meta = Meta::at_position(1, SystemTime::now());
        meta.message_id = MessageId::Text(id.to_owned());
        Reject {
            body: format!("{{\"bad\": \"{id}\"}}"),
            meta,
            stage: Stage::Parse,
            reason: "missing field `user_id`".into(),
        }
    };
    // (messages, keys made ahead, stored, duplicates)
    let rounds: [(&[&str], bool, usize, usize); 3] = [
        (&["m1", "m2"], true, 2, 0),
        (&["m1", "m3"], false, 1, 1),
        (&["m2", "m3", "m4"], true, 1, 2),
    ];
    for (ids, ahead, stored, duplicates) in rounds {
        let mut batch = Batch::new(Vec::new(), ids.iter().map(|id| rejected(id)).collect());
        if ahead {
            batch.prepare(&record);
            assert!(batch.prepared().is_some(), "the ledger prepares its keys");
        }
        let commit = committer
            .commit(batch, &record, &mut Turn::free())
            .await
            .expect("commit");
        let counts = commit.committed[0].counts;
        assert_eq!(
            (counts.rejected, counts.duplicates),
            (stored, duplicates),
            "{ids:?}, keys made ahead: {ahead}"
        );
    }
    assert_eq!(schema.count(&schema.dead_letters()).await, 4);
}
