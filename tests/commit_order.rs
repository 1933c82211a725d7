//! Batches of an ordered source on a real PostgreSQL committer: what a batch does before the batch
//! ahead of it has committed, and what waits for it. A probe stands in for the source's commit
//! record, so the test can hold a turn and see when the claim runs.

mod common;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;

use common::*;
use sluice::envelope::Meta;
use sluice::sink::Committer;
use sluice::sink::batch::Batch;
use sluice::sink::commit_order::BatchQueue;
use sluice::sink::commit_record::{CommitRecord, InTransaction, RecordError};

/// An ordered record that reports each claim, taking its claims in turn or not.
struct Probe {
    claims: mpsc::UnboundedSender<()>,
    in_turn: bool,
}

#[async_trait]
impl CommitRecord for Probe {
    async fn claim(&self, t: &mut InTransaction<'_, '_>) -> Result<Vec<bool>, RecordError> {
        let _ = self.claims.send(());
        Ok(vec![true; t.entries.len()])
    }

    fn ordered(&self) -> bool {
        true
    }

    fn claim_in_turn(&self) -> bool {
        self.in_turn
    }
}

fn batch(first: u64) -> Batch {
    let rows = (first..first + 10)
        .map(|n| {
            login_row(
                &format!("user-{n}"),
                Meta::at_position(n, SystemTime::now()),
            )
        })
        .collect();
    Batch::new(rows, Vec::new())
}

/// Commits the second of two ordered batches while the test holds the first one's turn; returns
/// whether the claim ran before the turn passed, and then whether the batch committed after.
async fn second_batch_while_the_first_is_held(in_turn: bool) -> (bool, i64, i64) {
    let schema = TestSchema::new().await;
    let (_, mut committer) = committer_in(&schema, false).await;

    let (batches, queue) = mpsc::channel(2);
    batches.send(batch(1)).await.expect("queued");
    batches.send(batch(11)).await.expect("queued");
    let mut queue = BatchQueue::new(queue, true);
    let (_, first_turn) = queue.next().await.expect("first batch");
    let (second, mut second_turn) = queue.next().await.expect("second batch");

    let (claims, mut claimed) = mpsc::unbounded_channel();
    let record = Probe { claims, in_turn };
    let commit = tokio::spawn(async move {
        committer
            .commit(second, &record, &mut second_turn)
            .await
            .expect("commit")
            .committed
            .len()
    });
    // The claim runs at once unless it waits for the turn: a second is far more than it needs.
    let claimed_early = tokio::time::timeout(Duration::from_secs(1), claimed.recv())
        .await
        .is_ok();
    let rows_before = schema.rows_so_far().await;
    first_turn.pass();
    let pieces = tokio::time::timeout(Duration::from_secs(20), commit)
        .await
        .expect("the batch commits once the one before has")
        .expect("joined");
    assert_eq!(pieces, 1);
    (claimed_early, rows_before, schema.rows_so_far().await)
}

#[tokio::test]
async fn a_batch_copies_before_its_turn_but_commits_only_after_the_batch_before() {
    let (claimed_early, rows_before, rows_after) =
        second_batch_while_the_first_is_held(false).await;
    assert!(
        claimed_early,
        "the claim and the rows do not wait for the turn"
    );
    assert_eq!(rows_before, 0, "nothing is committed before the turn");
    assert_eq!(rows_after, 10);
}

#[tokio::test]
async fn a_claim_that_takes_locks_waits_for_the_batch_before() {
    let (claimed_early, rows_before, rows_after) = second_batch_while_the_first_is_held(true).await;
    assert!(!claimed_early, "the claim waited for the turn");
    assert_eq!(rows_before, 0);
    assert_eq!(rows_after, 10);
}
