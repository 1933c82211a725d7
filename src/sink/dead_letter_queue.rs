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

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use sha2::{Digest, Sha256};

use crate::aws;
use crate::aws::sqs_batch::{self, Outgoing, SendMessages};
use crate::envelope::Reject;
use crate::error_chain::Chain;
use crate::retry::RetryPolicy;
use crate::stats::Stats;

/// A few quick attempts per call: the transaction waits meanwhile, and the table keeps every dead
/// letter anyway.
const FORWARD: RetryPolicy = RetryPolicy::attempts(3);
/// Longest one batch call may take; a queue that hangs must not hold a transaction open for long.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// SQS's default and smallest batch payload limit; a queue that allows larger messages allows
/// batches as large.
const MIN_BATCH_BYTES: usize = 256 * 1024;
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

impl DeadLetterQueue {
    /// Reads the queue's size limit. A queue that cannot be read is not fatal (rows must load
    /// whatever the queue does): the run goes on with SQS's default limit and forwarding reports
    /// what it could not send.
    pub async fn connect(
        client: aws_sdk_sqs::Client,
        queue_url: String,
        stats: Arc<Stats>,
    ) -> DeadLetterQueue {
        let attributes = aws::queue_attributes(
            &client,
            &queue_url,
            &[
                QueueAttributeName::MaximumMessageSize,
                QueueAttributeName::FifoQueue,
            ],
        )
        .await;
        let limits = match attributes {
            Ok(attrs) => {
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
                    error = %Chain(&e),
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
        let call = SendMessages {
            client: &self.client,
            queue_url: &self.queue_url,
            max_call_bytes: self.limits.batch_bytes,
            timeout: Some(CALL_TIMEOUT),
            tag: PhantomData,
        };
        let sent = sqs_batch::send_all(&call, outgoing, FORWARD, 1).await;
        let failed = sent.refused.len() + sent.unsent.len();
        let not_forwarded = oversize + failed;
        if not_forwarded > 0 {
            self.stats
                .dead_letters_not_forwarded
                .inc_by(not_forwarded as u64);
        }
        let why = sent
            .last_failure
            .as_ref()
            .or(sent.refused.last().map(|(_, why)| why));
        if let Some(why) = why {
            tracing::error!(
                queue_url = self.queue_url,
                count = failed,
                error = %Chain(why),
                "dead letters not forwarded to the dead-letter queue; they are kept in the dead-letter table"
            );
        }
    }

    fn outgoing(&self, i: usize, reject: &Reject) -> Outgoing<()> {
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
            tag: (),
        }
    }
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
