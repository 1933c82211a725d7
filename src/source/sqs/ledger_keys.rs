//! How the dedupe ledger names an SQS message: by its queue, and by what identifies it there.
//!
//! The queue (its ARN) scopes every key, so deployments reading different queues never take each
//! other's messages for duplicates, even when they share a ledger table and their producers reuse
//! idempotency keys. Within the queue:
//! - a message that is loaded is known by its producer's idempotency key (the `dedupe_id`
//!   attribute) when it has one, so the same event sent twice loads once; else by its SQS message id;
//! - a message that becomes a dead letter is known by its producer key together with its body (else
//!   by its SQS message id). A redelivery of that very message, or the producer sending the same
//!   bad event again, is recognised (its dead letter is not stored twice), but the producer key is
//!   not used up: the corrected resend, which carries the same key with another body, still loads.

use crate::envelope::{MessageId, Meta};
use crate::sink::commit_record::Outcome;
use crate::sink::ledger::{LedgerKey, LedgerKeys};

pub struct SqsLedgerKeys {
    /// The queue's ARN (its URL if the queue reports no ARN).
    queue: String,
}

impl SqsLedgerKeys {
    pub fn new(queue: impl Into<String>) -> SqsLedgerKeys {
        SqsLedgerKeys {
            queue: queue.into(),
        }
    }
}

impl LedgerKeys for SqsLedgerKeys {
    fn key(&self, meta: &Meta, body: &str, outcome: Outcome) -> LedgerKey {
        let queue = self.queue.as_bytes();
        match (outcome, &meta.dedupe_key) {
            (Outcome::Row, Some(producer_key)) => {
                LedgerKey::of(&[b"sqs", queue, b"producer", producer_key.as_bytes()])
            }
            (Outcome::DeadLetter, Some(producer_key)) => LedgerKey::of(&[
                b"sqs",
                queue,
                b"producer-rejected",
                producer_key.as_bytes(),
                body.as_bytes(),
            ]),
            (_, None) => match &meta.message_id {
                MessageId::Text(id) => LedgerKey::of(&[b"sqs", queue, b"message", id.as_bytes()]),
                MessageId::Position(n) => {
                    LedgerKey::of(&[b"sqs", queue, b"position", &n.to_be_bytes()])
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn meta(id: &str, producer_key: Option<&str>) -> Meta {
        let mut meta = Meta::at_position(1, SystemTime::now());
        meta.message_id = MessageId::Text(id.into());
        meta.dedupe_key = producer_key.map(str::to_owned);
        meta
    }

    #[test]
    fn keys_are_scoped_to_the_queue() {
        let (a, b) = (SqsLedgerKeys::new("arn:q-a"), SqsLedgerKeys::new("arn:q-b"));
        let m = meta("m1", Some("k1"));
        assert_ne!(a.key(&m, "", Outcome::Row), b.key(&m, "", Outcome::Row));
        assert_eq!(
            a.key(&m, "", Outcome::Row),
            a.key(&meta("m2", Some("k1")), "", Outcome::Row)
        );
    }

    #[test]
    fn a_dead_letter_does_not_use_up_its_producer_key() {
        let q = SqsLedgerKeys::new("arn:q");
        let rejected = q.key(&meta("m1", Some("k1")), "bad", Outcome::DeadLetter);
        assert_ne!(
            rejected,
            q.key(&meta("m2", Some("k1")), "good", Outcome::Row),
            "the corrected resend loads"
        );
        assert_eq!(
            rejected,
            q.key(&meta("m1", Some("k1")), "bad", Outcome::DeadLetter),
            "a redelivery of the rejected message is recognised"
        );
        assert_eq!(
            rejected,
            q.key(&meta("m3", Some("k1")), "bad", Outcome::DeadLetter),
            "so is the same bad event sent again"
        );
        let without_key = q.key(&meta("m1", None), "bad", Outcome::DeadLetter);
        assert_eq!(
            without_key,
            q.key(&meta("m1", None), "bad", Outcome::DeadLetter)
        );
        assert_ne!(
            without_key,
            q.key(&meta("m4", None), "bad", Outcome::DeadLetter)
        );
    }

    #[test]
    fn producer_keys_and_message_ids_never_collide() {
        let q = SqsLedgerKeys::new("arn:q");
        assert_ne!(
            q.key(&meta("x", Some("same")), "", Outcome::Row),
            q.key(&meta("same", None), "", Outcome::Row)
        );
    }
}
