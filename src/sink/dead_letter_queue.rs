//! Forwarding dead letters to an SQS queue: a copy for people and redrive tools.
//!
//! The dead-letter table is the record of truth and the queue a convenience, so forwarding must never
//! hold up the loading of rows. It happens inside the batch's transaction window, before the commit:
//! a crash between forward and commit brings the message back and it is forwarded again (the queue
//! may see it twice), whereas forwarding after the commit could skip it for good. What the queue
//! cannot take is given up after a few quick attempts — a body over the queue's size limit (never
//! sent), a queue that is gone or forbidden, a failure that outlasts the retries — logged, counted in
//! `sluice_dead_letters_not_forwarded_total`, and kept in the table only.
//!
//! Calls respect SQS's limits: at most ten entries and the queue's size limit per call, each entry
//! (body and attributes) within the queue's `MaximumMessageSize`.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use sha2::{Digest, Sha256};

use crate::aws::{self, AwsErrorClass};
use crate::envelope::Reject;
use crate::retry;
use crate::stats::Stats;

/// Attempts per batch call before its entries are given up.
const FORWARD_ATTEMPTS: usize = 3;
/// Longest one batch call may take; a queue that hangs must not hold a transaction open for long.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// SQS's default and smallest batch payload limit; a queue that allows larger messages allows
/// batches as large.
const MIN_BATCH_BYTES: usize = 256 * 1024;
const ENTRIES_PER_CALL: usize = 10;
/// FIFO queues need a message group; all dead letters share one, in the order they were rejected.
const FIFO_GROUP: &str = "sluice-dead-letters";

/// What the queue accepts, read once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    message_bytes: usize,
    batch_bytes: usize,
    fifo: bool,
}

impl Limits {
    fn new(max_message_size: Option<usize>, fifo: bool) -> Limits {
        let message_bytes = max_message_size.unwrap_or(MIN_BATCH_BYTES);
        Limits {
            message_bytes,
            batch_bytes: message_bytes.max(MIN_BATCH_BYTES),
            fifo,
        }
    }
}

pub struct DeadLetterQueue {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    limits: Limits,
    stats: Arc<Stats>,
}

/// One dead letter as it will be sent.
struct Outgoing {
    entry: SendMessageBatchRequestEntry,
    bytes: usize,
}

impl DeadLetterQueue {
    /// Reads the queue's size limit. A queue that cannot be read is not fatal (rows must load
    /// whatever the queue does): the run goes on with SQS's default limit and forwarding reports
    /// what it could not send.
    pub async fn connect(
        client: aws_sdk_sqs::Client,
        queue_url: String,
        stats: Arc<Stats>,
    ) -> DeadLetterQueue {
        let attributes = client
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(QueueAttributeName::MaximumMessageSize)
            .attribute_names(QueueAttributeName::FifoQueue)
            .send()
            .await;
        let limits = match attributes {
            Ok(out) => {
                let attrs = out.attributes.unwrap_or_default();
                let size = attrs
                    .get(&QueueAttributeName::MaximumMessageSize)
                    .and_then(|v| v.parse().ok());
                let fifo = attrs
                    .get(&QueueAttributeName::FifoQueue)
                    .is_some_and(|v| v == "true");
                Limits::new(size, fifo || queue_url.ends_with(".fifo"))
            }
            Err(e) => {
                tracing::error!(
                    queue_url,
                    error = %aws::describe(&e),
                    "cannot read the dead-letter queue; rejects will be kept in the dead-letter table and forwarding retried per batch"
                );
                Limits::new(None, queue_url.ends_with(".fifo"))
            }
        };
        DeadLetterQueue {
            client,
            queue_url,
            limits,
            stats,
        }
    }

    /// Sends a copy of every reject that the queue can take; never fails. What could not be sent is
    /// logged and counted.
    pub async fn forward(&self, rejects: &[&Reject]) {
        let mut oversize = 0;
        let mut outgoing = Vec::with_capacity(rejects.len());
        for (i, reject) in rejects.iter().enumerate() {
            let message = self.outgoing(i, reject);
            if message.bytes > self.limits.message_bytes {
                oversize += 1;
                tracing::warn!(
                    message_id = %reject.meta.message_id,
                    bytes = message.bytes,
                    limit = self.limits.message_bytes,
                    "dead letter larger than the dead-letter queue accepts; not forwarded, kept in the dead-letter table"
                );
            } else {
                outgoing.push(message);
            }
        }
        let mut failed = 0;
        let mut last_error = None;
        for group in pack(outgoing, self.limits.batch_bytes) {
            let (lost, error) = self.send_with_retries(group).await;
            failed += lost;
            last_error = error.or(last_error);
        }
        let not_forwarded = oversize + failed;
        if not_forwarded > 0 {
            self.stats
                .dead_letters_not_forwarded
                .inc_by(not_forwarded as u64);
        }
        if failed > 0 {
            tracing::error!(
                queue_url = self.queue_url,
                count = failed,
                error = last_error.as_deref().unwrap_or("refused by the queue"),
                "dead letters not forwarded to the dead-letter queue; they are kept in the dead-letter table"
            );
        }
    }

    fn outgoing(&self, i: usize, reject: &Reject) -> Outgoing {
        let body = if reject.body.is_empty() {
            "(empty body)".to_owned()
        } else {
            sqs_text(&reject.body)
        };
        let source_id = reject.meta.message_id.to_string();
        let attributes = [
            ("sluice_reason", sqs_text(&reject.reason)),
            ("sluice_stage", reject.stage.as_str().to_owned()),
            ("sluice_source_message_id", sqs_text(&source_id)),
        ];
        // SQS counts the body and every attribute's name, type and value against the limit.
        let bytes = body.len()
            + attributes
                .iter()
                .map(|(name, value)| name.len() + "String".len() + value.len().max(1))
                .sum::<usize>();
        let mut entry = SendMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .message_body(body);
        for (name, value) in attributes {
            entry = entry.message_attributes(name, text_attribute(&value));
        }
        if self.limits.fifo {
            let dedupe = Sha256::digest(format!("{source_id}\n{}", reject.reason));
            entry = entry
                .message_group_id(FIFO_GROUP)
                .message_deduplication_id(hex::encode(dedupe));
        }
        Outgoing {
            // Every field the builder requires is set above.
            entry: entry
                .build()
                .unwrap_or_else(|_| unreachable!("id and body are set")),
            bytes,
        }
    }

    /// Sends one group, retrying what may succeed later; returns how many were given up and why.
    async fn send_with_retries(&self, group: Vec<Outgoing>) -> (usize, Option<String>) {
        let mut pending = group;
        let mut given_up = 0;
        let mut last_error = None;
        let mut pacing = retry::backoff();
        for attempt in 1..=FORWARD_ATTEMPTS {
            if attempt > 1 {
                retry::pause(&mut pacing).await;
            }
            match self.call(&pending).await {
                Ok(failed) => {
                    for refused in failed.iter().filter(|f| f.sender_fault) {
                        given_up += 1;
                        last_error = Some(format!(
                            "{}: {}",
                            refused.code,
                            refused.message.as_deref().unwrap_or("refused")
                        ));
                    }
                    pending.retain(|o| {
                        failed
                            .iter()
                            .any(|f| !f.sender_fault && f.id == o.entry.id())
                    });
                    if pending.is_empty() {
                        return (given_up, last_error);
                    }
                }
                Err(failure) => {
                    last_error = Some(failure.text);
                    if failure.malformed && pending.len() > 1 {
                        let (lost, error) = self.send_one_by_one(pending).await;
                        return (given_up + lost, error.or(last_error));
                    }
                    if failure.permanent {
                        break;
                    }
                }
            }
        }
        (given_up + pending.len(), last_error)
    }

    /// One SendMessageBatch call; the entries it failed, or why the whole call failed.
    async fn call(
        &self,
        pending: &[Outgoing],
    ) -> Result<Vec<aws_sdk_sqs::types::BatchResultErrorEntry>, CallFailure> {
        let entries: Vec<_> = pending.iter().map(|o| o.entry.clone()).collect();
        let call = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send();
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Err(_) => Err(CallFailure {
                text: format!("no answer within {CALL_TIMEOUT:?}"),
                malformed: false,
                permanent: false,
            }),
            Ok(Ok(out)) => Ok(out.failed),
            Ok(Err(e)) => {
                let malformed = aws::is_malformed_batch(&e);
                Err(CallFailure {
                    text: aws::describe(&e),
                    malformed,
                    permanent: malformed || aws::classify(&e) == AwsErrorClass::Fatal,
                })
            }
        }
    }

    /// When the queue refuses a call for its shape, each entry on its own always forms a valid call.
    async fn send_one_by_one(&self, pending: Vec<Outgoing>) -> (usize, Option<String>) {
        let mut lost = 0;
        let mut last_error = None;
        for one in pending {
            let (n, error) = Box::pin(self.send_with_retries(vec![one])).await;
            lost += n;
            last_error = error.or(last_error);
        }
        (lost, last_error)
    }
}

/// Why a whole batch call failed.
struct CallFailure {
    text: String,
    /// Refused for its shape (size, entry count): the entries may go through one by one.
    malformed: bool,
    /// Retrying the same call cannot succeed.
    permanent: bool,
}

/// Groups of at most ten entries and `batch_bytes` in all, in order.
fn pack(outgoing: Vec<Outgoing>, batch_bytes: usize) -> Vec<Vec<Outgoing>> {
    let mut groups: Vec<Vec<Outgoing>> = Vec::new();
    let mut bytes = 0;
    for message in outgoing {
        let fits = groups
            .last()
            .is_some_and(|g| g.len() < ENTRIES_PER_CALL && bytes + message.bytes <= batch_bytes);
        if !fits {
            groups.push(Vec::new());
            bytes = 0;
        }
        bytes += message.bytes;
        if let Some(group) = groups.last_mut() {
            group.push(message);
        }
    }
    groups
}

/// SQS message text allows only some characters (no NUL and most control characters); anything
/// else is replaced, so one odd body cannot make the queue refuse a whole call.
fn sqs_text(text: &str) -> String {
    let allowed = |c: char| matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..);
    if text.chars().all(allowed) {
        text.to_owned()
    } else {
        text.chars()
            .map(|c| if allowed(c) { c } else { '\u{FFFD}' })
            .collect()
    }
}

fn text_attribute(value: &str) -> MessageAttributeValue {
    let value = if value.is_empty() { "-" } else { value };
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .unwrap_or_else(|_| unreachable!("data_type is set"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(i: usize, bytes: usize) -> Outgoing {
        Outgoing {
            entry: SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body("x")
                .build()
                .expect("entry"),
            bytes,
        }
    }

    fn shape(groups: &[Vec<Outgoing>]) -> Vec<Vec<&str>> {
        groups
            .iter()
            .map(|g| g.iter().map(|o| o.entry.id()).collect())
            .collect()
    }

    #[test]
    fn groups_hold_ten_entries_and_the_batch_limit_at_most() {
        let small: Vec<Outgoing> = (0..23).map(|i| sized(i, 10)).collect();
        let sizes: Vec<usize> = pack(small, 1_000).iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 3]);
        let big: Vec<Outgoing> = (0..5).map(|i| sized(i, 400)).collect();
        assert_eq!(
            shape(&pack(big, 1_000)),
            [vec!["0", "1"], vec!["2", "3"], vec!["4"]]
        );
    }

    #[test]
    fn limits_follow_the_queue() {
        assert_eq!(
            Limits::new(Some(1024), false),
            Limits {
                message_bytes: 1024,
                batch_bytes: MIN_BATCH_BYTES,
                fifo: false
            }
        );
        assert_eq!(Limits::new(Some(1 << 20), true).batch_bytes, 1 << 20);
        assert_eq!(Limits::new(None, false).message_bytes, MIN_BATCH_BYTES);
    }

    #[test]
    fn characters_sqs_refuses_are_replaced() {
        assert_eq!(sqs_text("plain {\"a\": 1}\n"), "plain {\"a\": 1}\n");
        assert_eq!(sqs_text("a\0b\u{1}c"), "a\u{FFFD}b\u{FFFD}c");
    }
}
