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
//!
//! A key by message id starts with the message's `SentTimestamp`, which every redelivery carries
//! unchanged, so keys arrive in about the order of the ledger's index (see [`crate::sink::ledger`]).
//! Versions before that used the unordered key; a redelivery (`ApproximateReceiveCount` above 1),
//! which such a version may have committed, claims that key too. A first delivery was never
//! committed by anyone. Producer keys are unordered as before: a resend is sent at another time.

use crate::envelope::{MessageId, Meta};
use crate::sink::commit_record::Outcome;
use crate::sink::ledger::{LedgerKey, LedgerKeys, MessageKeys};

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
    fn keys(&self, meta: &Meta, body: &str, outcome: Outcome) -> MessageKeys {
        let queue = self.queue.as_bytes();
        match (outcome, &meta.dedupe_key) {
            (Outcome::Row, Some(producer_key)) => MessageKeys::only(LedgerKey::of(&[
                b"sqs",
                queue,
                b"producer",
                producer_key.as_bytes(),
            ])),
            (Outcome::DeadLetter, Some(producer_key)) => MessageKeys::only(LedgerKey::of(&[
                b"sqs",
                queue,
                b"producer-rejected",
                producer_key.as_bytes(),
                body.as_bytes(),
            ])),
            (_, None) => match &meta.message_id {
                MessageId::Text(id) => {
                    let unordered = LedgerKey::of(&[b"sqs", queue, b"message", id.as_bytes()]);
                    match meta.sent_at_ms.and_then(|ms| u64::try_from(ms).ok()) {
                        Some(sent) => MessageKeys {
                            key: unordered.ordered(sent),
                            earlier: (meta.receive_count > 1).then_some(unordered),
                        },
                        None => MessageKeys::only(unordered),
                    }
                }
                MessageId::Position(n) => MessageKeys::only(LedgerKey::of(&[
                    b"sqs",
                    queue,
                    b"position",
                    &n.to_be_bytes(),
                ])),
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
        meta.sent_at_ms = Some(1_709_337_600_000);
        meta
    }

    /// The key alone, for a message whose keys hold no earlier one.
    fn key(q: &SqsLedgerKeys, meta: &Meta, body: &str, outcome: Outcome) -> LedgerKey {
        let keys = q.keys(meta, body, outcome);
        assert_eq!(keys.earlier, None, "a first delivery claims one key");
        keys.key
    }

    #[test]
    fn message_ids_are_ordered_by_sent_time_and_redeliveries_also_claim_the_earlier_key() {
        let q = SqsLedgerKeys::new("arn:q");
        let first = meta("m1", None);
        let mut later = meta("m0", None);
        later.sent_at_ms = Some(1_709_337_600_001);
        assert!(
            key(&q, &first, "", Outcome::Row) < key(&q, &later, "", Outcome::Row),
            "sent later, sorted later"
        );
        // What versions before ordered keys committed for this message.
        let unordered = LedgerKey::of(&[b"sqs", b"arn:q", b"message", b"m1"]);
        let mut again = first.clone();
        again.receive_count = 2;
        assert_eq!(
            q.keys(&again, "", Outcome::Row),
            MessageKeys {
                key: key(&q, &first, "", Outcome::Row),
                earlier: Some(unordered),
            }
        );
        let mut unsent = first.clone();
        unsent.sent_at_ms = None;
        assert_eq!(
            key(&q, &unsent, "", Outcome::Row),
            unordered,
            "without a sent time the key is unordered"
        );
    }

    #[test]
    fn keys_are_scoped_to_the_queue() {
        let (a, b) = (SqsLedgerKeys::new("arn:q-a"), SqsLedgerKeys::new("arn:q-b"));
        let m = meta("m1", Some("k1"));
        assert_ne!(key(&a, &m, "", Outcome::Row), key(&b, &m, "", Outcome::Row));
        assert_eq!(
            key(&a, &m, "", Outcome::Row),
            key(&a, &meta("m2", Some("k1")), "", Outcome::Row)
        );
        let plain = meta("m1", None);
        assert_ne!(
            key(&a, &plain, "", Outcome::Row),
            key(&b, &plain, "", Outcome::Row)
        );
    }

    #[test]
    fn a_dead_letter_does_not_use_up_its_producer_key() {
        let q = SqsLedgerKeys::new("arn:q");
        let rejected = key(&q, &meta("m1", Some("k1")), "bad", Outcome::DeadLetter);
        assert_ne!(
            rejected,
            key(&q, &meta("m2", Some("k1")), "good", Outcome::Row),
            "the corrected resend loads"
        );
        assert_eq!(
            rejected,
            key(&q, &meta("m1", Some("k1")), "bad", Outcome::DeadLetter),
            "a redelivery of the rejected message is recognised"
        );
        assert_eq!(
            rejected,
            key(&q, &meta("m3", Some("k1")), "bad", Outcome::DeadLetter),
            "so is the same bad event sent again"
        );
        let without_key = key(&q, &meta("m1", None), "bad", Outcome::DeadLetter);
        assert_eq!(
            without_key,
            key(&q, &meta("m1", None), "bad", Outcome::DeadLetter)
        );
        assert_ne!(
            without_key,
            key(&q, &meta("m4", None), "bad", Outcome::DeadLetter)
        );
    }

    #[test]
    fn producer_keys_and_message_ids_never_collide() {
        let q = SqsLedgerKeys::new("arn:q");
        assert_ne!(
            key(&q, &meta("x", Some("same")), "", Outcome::Row),
            key(&q, &meta("same", None), "", Outcome::Row)
        );
    }
}
