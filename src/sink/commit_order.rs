//! Commit order for sources whose batches must commit in the order they were delivered (Kinesis
//! checkpoints, file positions), without giving up the sink's other connections.
//!
//! A position may only move forward, so batch N+1 must not commit before batch N. Committing such a
//! source on one connection keeps that order but leaves the database idle while each COMMIT waits
//! for its WAL flush, and costs a seventh of a file load's speed. Instead each batch takes a [`Turn`]
//! as it leaves the queue, in delivery order, and every connection commits: a batch writes what
//! nothing before it depends on (its claim, its rows, its dead letters) at once, and waits for its
//! turn only before its commit record's seal (the position write) and COMMIT. So batch N+1's COPY
//! overlaps batch N's COMMIT, and the COMMITs still happen one after the other, in order.
//!
//! The turn passes once the batch before has committed *and* its acknowledgement tokens were handed
//! on, so the acknowledger sees batches in delivery order too. If the batch before can never commit
//! (its committer stopped), its turn is dropped unpassed and every later batch of the source is
//! refused: a batch must not commit past one that is not committed.
//!
//! Because a claim runs before the batch's turn, an ordered record's claim must not lock anything an
//! earlier batch's transaction could wait for (that wait and the turn would wait on each other; a
//! record whose claim does lock, the dedupe ledger of a file, has its claims wait for the turn
//! too), and what it read may be outdated by the time the seal runs: the seal, which runs in turn,
//! locks and checks (see [`super::commit_record`]).

use tokio::sync::{mpsc, oneshot};

use super::batch::Batch;

/// The batch before never committed: this one must not commit either.
#[derive(Debug, thiserror::Error)]
#[error("the batch delivered before this one was not committed, so this one cannot be")]
pub struct OutOfTurn;

/// A batch's place in its source's commit order.
#[derive(Debug, Default)]
pub struct Turn {
    /// Passes when the batch before is committed and handed on; `None` once passed, or for a source
    /// without order.
    before: Option<oneshot::Receiver<()>>,
    /// Tells the batch after that this one is committed and handed on.
    next: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// The turn of a batch whose source has no order: it never waits.
    pub fn free() -> Turn {
        Turn::default()
    }

    /// Waits until the batch before is committed and handed on; at once if it already is.
    pub async fn wait(&mut self) -> Result<(), OutOfTurn> {
        if let Some(before) = &mut self.before {
            before.await.map_err(|_| OutOfTurn)?;
            self.before = None;
        }
        Ok(())
    }

    /// This batch is committed and handed on: the next batch may commit. A turn dropped without
    /// this refuses every later batch.
    pub fn pass(self) {
        if let Some(next) = self.next {
            // The batch after may be gone already (the pipeline is stopping): nothing waits then.
            let _ = next.send(());
        }
    }
}

/// The queue of batches the committers of one pipeline take from, each batch with its turn.
pub struct BatchQueue {
    batches: mpsc::Receiver<Batch>,
    /// Passes when the batch taken last is committed; `None` when the source has no order.
    last: Option<oneshot::Receiver<()>>,
    ordered: bool,
}

impl BatchQueue {
    /// `ordered`: the source's batches must commit in the order the queue hands them out.
    pub fn new(batches: mpsc::Receiver<Batch>, ordered: bool) -> BatchQueue {
        BatchQueue {
            batches,
            last: None,
            ordered,
        }
    }

    /// The next batch and its turn; `None` once the queue is closed and empty.
    pub async fn next(&mut self) -> Option<(Batch, Turn)> {
        let batch = self.batches.recv().await?;
        if !self.ordered {
            return Some((batch, Turn::free()));
        }
        let (next, after) = oneshot::channel();
        let turn = Turn {
            before: self.last.replace(after),
            next: Some(next),
        };
        Some((batch, turn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn queue(ordered: bool, n: usize) -> (BatchQueue, Vec<Turn>) {
        let (tx, rx) = mpsc::channel(n);
        for _ in 0..n {
            tx.send(Batch::new(Vec::new(), Vec::new()))
                .await
                .expect("queue open");
        }
        drop(tx);
        let mut queue = BatchQueue::new(rx, ordered);
        let mut turns = Vec::new();
        while let Some((_, turn)) = queue.next().await {
            turns.push(turn);
        }
        (queue, turns)
    }

    fn passed(turn: &mut Turn) -> Option<Result<(), OutOfTurn>> {
        futures::FutureExt::now_or_never(turn.wait())
    }

    #[tokio::test]
    async fn each_turn_passes_only_after_the_one_before() {
        let (_queue, mut turns) = queue(true, 3).await;
        let mut third = turns.pop().expect("three turns");
        let mut second = turns.pop().expect("three turns");
        let mut first = turns.pop().expect("three turns");
        assert!(
            matches!(passed(&mut first), Some(Ok(()))),
            "the first waits for nothing"
        );
        assert!(
            passed(&mut second).is_none(),
            "the second waits for the first"
        );
        assert!(
            passed(&mut third).is_none(),
            "the third waits for the second"
        );
        first.pass();
        assert!(matches!(passed(&mut second), Some(Ok(()))));
        assert!(passed(&mut third).is_none(), "still waits for the second");
        second.pass();
        assert!(matches!(passed(&mut third), Some(Ok(()))));
        assert!(
            matches!(passed(&mut third), Some(Ok(()))),
            "a passed turn stays passed (a retried transaction waits again)"
        );
    }

    #[tokio::test]
    async fn a_turn_dropped_unpassed_refuses_every_later_batch() {
        let (_queue, mut turns) = queue(true, 3).await;
        let mut third = turns.pop().expect("three turns");
        let mut second = turns.pop().expect("three turns");
        let first = turns.pop().expect("three turns");
        drop(first);
        assert!(matches!(passed(&mut second), Some(Err(OutOfTurn))));
        drop(second);
        assert!(matches!(passed(&mut third), Some(Err(OutOfTurn))));
    }

    #[tokio::test]
    async fn batches_of_a_source_without_order_never_wait() {
        let (_queue, turns) = queue(false, 3).await;
        for mut turn in turns.into_iter().rev() {
            assert!(matches!(passed(&mut turn), Some(Ok(()))));
        }
    }
}
