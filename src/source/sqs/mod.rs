//! The SQS source: long-polling receivers feeding the pipeline.
//!
//! Several pollers run concurrently because each receive returns at most 10 messages and costs a
//! round trip. Before each receive a poller reserves room in [`InFlight`], so at most
//! `max_in_flight` messages are held however slow the sink is. Messages are deleted only by the
//! [`SqsAcknowledger`], after commit.
//!
//! On shutdown a poller stops starting receives. After a signal, a receive already waiting gets a
//! grace of a few seconds to return what it has, then is abandoned: under traffic receives return
//! at once, so nothing is cut off. But the queue server may still hold an abandoned long poll and
//! hand it messages that arrive meanwhile; those stay invisible until their visibility timeout and are then delivered
//! again, delayed but never lost. When the run stops because the queue went idle there is no hurry,
//! so receives in progress are allowed to return (within `wait_time_seconds`) and nothing is
//! stranded.

mod acknowledger;
mod depth;
pub mod in_flight;
mod ledger_keys;

pub use acknowledger::SqsAcknowledger;
pub use ledger_keys::SqsLedgerKeys;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use backon::Retryable;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::aws::{self, AwsError};
use crate::config::SqsConfig;
use crate::envelope::{AckToken, Chunk, Envelope, MessageId, Meta, Reject, Stage};
use crate::error_chain::Chain;
use crate::message_file::TOO_LARGE_HEAD_BYTES;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::sink::commit_record::{CommitRecord, NoCommitRecord};
use crate::sink::ledger::LedgerRecord;
use crate::source::{BuiltSource, Delivery, Source, SourceError};
use crate::stats::Stats;
use crate::table_name::TableName;

use in_flight::InFlight;

/// How long a receive in progress may finish after a signal. A queue with messages answers at
/// once, but a busy queue server can take seconds; a receive abandoned before it answers strands
/// the messages it takes until their visibility timeout, so the grace is generous. An empty queue's
/// long poll is the only receive that lasts longer, and abandoning it strands nothing.
const RECEIVE_GRACE: Duration = Duration::from_secs(5);
/// A receive that fails for a passing reason is tried again for as long as the failure lasts.
const RECEIVE: RetryPolicy = RetryPolicy::FOREVER;

pub struct SqsSource {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    cfg: SqsConfig,
    /// `source.max_message_bytes`.
    max_message_bytes: usize,
    in_flight: Arc<InFlight>,
    stats: Arc<Stats>,
}

impl SqsSource {
    /// Connects, resolves the queue and checks it answers, so a wrong queue or bad credentials fail
    /// at start rather than in a retry loop. With `ledger`, each batch records its messages' keys
    /// there, scoped to this queue.
    pub async fn build(
        cfg: &SqsConfig,
        max_message_bytes: usize,
        ledger: Option<&TableName>,
        stats: Arc<Stats>,
    ) -> Result<BuiltSource, SourceError> {
        let client = aws::sqs_client(cfg).await;
        let queue_url = aws::resolve_queue_url(&client, cfg).await?;
        let attributes = aws::queue_attributes(
            &client,
            &queue_url,
            &[
                QueueAttributeName::ApproximateNumberOfMessages,
                QueueAttributeName::QueueArn,
            ],
        )
        .await?;
        let commit_record: Arc<dyn CommitRecord> = match ledger {
            Some(table) => {
                let queue = match attributes.get(&QueueAttributeName::QueueArn) {
                    Some(arn) => arn.clone(),
                    None => {
                        tracing::warn!(
                            queue_url,
                            "the queue reports no ARN; ledger keys are scoped by its URL"
                        );
                        queue_url.clone()
                    }
                };
                Arc::new(LedgerRecord::new(
                    table,
                    Arc::new(SqsLedgerKeys::new(queue)),
                ))
            }
            None => Arc::new(NoCommitRecord),
        };
        let in_flight = Arc::new(InFlight::new(cfg.max_in_flight));
        let visibility = Duration::from_secs(cfg.visibility_timeout_seconds as u64);
        let acknowledger = SqsAcknowledger::new(
            client.clone(),
            queue_url.clone(),
            in_flight.clone(),
            visibility,
            stats.clone(),
        );
        let sampler = depth::sampler(
            client.clone(),
            queue_url.clone(),
            Duration::from_secs(cfg.depth_sample_seconds),
            stats.clone(),
        );
        tracing::info!(queue_url, pollers = cfg.pollers, "SQS source ready");
        Ok(BuiltSource {
            source: Box::new(SqsSource {
                client,
                queue_url,
                cfg: cfg.clone(),
                max_message_bytes,
                in_flight,
                stats,
            }),
            background: vec![acknowledger.visibility_extender(), sampler],
            acknowledger: Arc::new(acknowledger),
            commit_record,
            chunk_messages: cfg.max_messages as usize,
            // A long poll returns within its wait time; the SDK's attempt timeout bounds it too.
            receive_allowance: aws::receive_attempt_timeout(cfg),
        })
    }
}

#[async_trait]
impl Source for SqsSource {
    async fn run(self: Box<Self>, out: Delivery, shutdown: Shutdown) -> Result<(), SourceError> {
        let this = Arc::new(*self);
        let mut pollers = tokio::task::JoinSet::new();
        for id in 0..this.cfg.pollers {
            let (this, out, shutdown) = (this.clone(), out.clone(), shutdown.clone());
            pollers.spawn(async move { this.poll(id, out, shutdown).await });
        }
        drop(out);
        let mut result = Ok(());
        while let Some(joined) = pollers.join_next().await {
            let outcome = joined.unwrap_or_else(|e| Err(SourceError::Poller(e)));
            if let Err(e) = outcome {
                // One poller's fatal error (queue deleted, access revoked) stops them all.
                shutdown.stop();
                result = Err(e);
            }
        }
        result
    }
}

/// Why a receive returned nothing.
enum ReceiveFailure {
    /// A stop was requested before it could start.
    Stopped,
    Failed(AwsError),
}

impl SqsSource {
    async fn poll(
        &self,
        id: usize,
        out: mpsc::Sender<Chunk<Envelope>>,
        shutdown: Shutdown,
    ) -> Result<(), SourceError> {
        let max = self.cfg.max_messages as u32;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.requested() => return Ok(()),
                _ = self.in_flight.reserve(max) => {}
            }
            // A stop that came while waiting for room starts no new receive: after an idle stop,
            // receives in progress may finish, but none may begin.
            if shutdown.is_requested() {
                self.in_flight.unreserve(max as usize);
                return Ok(());
            }
            let started = Instant::now();
            let result = self.receive_until_shutdown(id, &shutdown).await;
            let messages = match result {
                Some(Ok(messages)) => messages,
                None | Some(Err(ReceiveFailure::Stopped)) => {
                    self.in_flight.unreserve(max as usize);
                    return Ok(());
                }
                Some(Err(ReceiveFailure::Failed(source))) => {
                    self.in_flight.unreserve(max as usize);
                    return Err(SourceError::Receive {
                        queue_url: self.queue_url.clone(),
                        source,
                    });
                }
            };
            let (chunk, tracked) = self.to_chunk(messages, started);
            self.in_flight
                .unreserve((max as usize).saturating_sub(tracked));
            if chunk.is_empty() {
                continue;
            }
            self.stats.record_received(chunk.len());
            if out.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    }

    /// One receive, retried while it fails for a passing reason; `None` if shutdown came first and
    /// the grace ran out.
    async fn receive_until_shutdown(
        &self,
        id: usize,
        shutdown: &Shutdown,
    ) -> Option<Result<Vec<Message>, ReceiveFailure>> {
        let receive = self.receive_with_retries(id, shutdown);
        tokio::pin!(receive);
        tokio::select! {
            result = &mut receive => Some(result),
            _ = shutdown.requested() => {
                if shutdown.finishes_receives() {
                    Some(receive.await)
                } else {
                    tokio::time::timeout(RECEIVE_GRACE, receive).await.ok()
                }
            }
        }
    }

    /// Receives, retrying transient failures; a stop ends the wait between attempts and starts no
    /// new one.
    async fn receive_with_retries(
        &self,
        id: usize,
        shutdown: &Shutdown,
    ) -> Result<Vec<Message>, ReceiveFailure> {
        let stop = shutdown.clone();
        let pause = move |delay: Duration| {
            let stop = stop.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.requested() => {}
                }
            }
        };
        (|| async {
            if shutdown.is_requested() {
                return Err(ReceiveFailure::Stopped);
            }
            self.receive().await.map_err(ReceiveFailure::Failed)
        })
        .retry(RECEIVE.backoff())
        .sleep(pause)
        .when(|failure| matches!(failure, ReceiveFailure::Failed(e) if !e.is_fatal()))
        .notify(|failure, pause| {
            if let ReceiveFailure::Failed(e) = failure {
                self.stats.record_source_retry(pause);
                tracing::warn!(poller = id, queue_url = self.queue_url, error = %Chain(e), retry_in_ms = pause.as_millis() as u64, "SQS receive failed; retrying");
            }
        })
        .await
    }

    async fn receive(&self) -> Result<Vec<Message>, AwsError> {
        let mut request = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(self.cfg.max_messages)
            .wait_time_seconds(self.cfg.wait_time_seconds)
            .visibility_timeout(self.cfg.visibility_timeout_seconds)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount);
        if !self.cfg.dedupe_attribute.is_empty() {
            request = request.message_attribute_names(&self.cfg.dedupe_attribute);
        }
        Ok(request.send().await?.messages.unwrap_or_default())
    }

    /// The received messages as a chunk, and how many of them now occupy room in the in-flight
    /// bound (a message already held under the same receipt handle does not occupy it twice).
    fn to_chunk(&self, messages: Vec<Message>, requested_at: Instant) -> (Chunk<Envelope>, usize) {
        let received_at = SystemTime::now();
        // Visibility counts from when SQS handed the messages out, which is no earlier than the request.
        let visible_again =
            requested_at + Duration::from_secs(self.cfg.visibility_timeout_seconds as u64);
        let envelopes: Vec<Envelope> = messages
            .into_iter()
            .filter_map(|m| envelope_from(m, &self.cfg.dedupe_attribute, received_at))
            .collect();
        let tracked = self.in_flight.track(
            envelopes.iter().filter_map(|e| match &e.meta.ack {
                AckToken::Sqs { receipt_handle } => Some(receipt_handle.as_str()),
                AckToken::None | AckToken::Kinesis(_) => None,
            }),
            visible_again,
        );
        let limits = Limits {
            max_receives: self.cfg.max_receives,
            max_message_bytes: self.max_message_bytes,
        };
        (checked(envelopes, limits), tracked)
    }
}

/// What a received message must stay within to go on to the parse stage.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// `source.sqs.max_receives`.
    max_receives: u32,
    /// `source.max_message_bytes`.
    max_message_bytes: usize,
}

/// The chunk of `envelopes`, those over a limit as dead letters: a message handed out more than
/// `max_receives` times keeps failing somewhere (a crash loop), and trying it again would only fail
/// again; a body over `max_message_bytes` is kept only by its start, so that what the pipeline
/// holds is bounded in bytes.
fn checked(envelopes: Vec<Envelope>, limits: Limits) -> Chunk<Envelope> {
    let mut chunk = Chunk::new(Vec::with_capacity(envelopes.len()));
    for mut envelope in envelopes {
        let count = envelope.meta.receive_count;
        let size = envelope.body.len();
        let reason = if count > limits.max_receives {
            format!(
                "received {count} times, more than `source.sqs.max_receives` ({})",
                limits.max_receives
            )
        } else if size > limits.max_message_bytes {
            let head = floor_char_boundary(&envelope.body, TOO_LARGE_HEAD_BYTES);
            envelope.body.truncate(head);
            envelope.body.shrink_to_fit();
            format!(
                "message is {size} bytes, more than `source.max_message_bytes` ({}); its first {head} bytes are kept",
                limits.max_message_bytes
            )
        } else {
            chunk.items.push(envelope);
            continue;
        };
        tracing::warn!(message_id = %envelope.meta.message_id, reason, "SQS message over a limit; dead-lettering it");
        chunk.rejects.push(Reject {
            body: envelope.body,
            meta: envelope.meta,
            stage: Stage::Source,
            reason,
        });
    }
    chunk
}

/// The largest index at most `at` that falls on a character boundary of `text`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Moves what the pipeline needs out of an SQS message. A message without a receipt handle could never
/// be deleted; SQS always sends one, so such a message is logged and left to the queue.
fn envelope_from(
    message: Message,
    dedupe_attribute: &str,
    received_at: SystemTime,
) -> Option<Envelope> {
    let Some(receipt_handle) = message.receipt_handle else {
        tracing::warn!(message_id = ?message.message_id, "SQS message without a receipt handle; skipped");
        return None;
    };
    let attributes = message.attributes.unwrap_or_default();
    let number = |name: MessageSystemAttributeName| {
        attributes.get(&name).and_then(|v| v.parse::<i64>().ok())
    };
    let dedupe_key = message
        .message_attributes
        .as_ref()
        .and_then(|attrs| attrs.get(dedupe_attribute))
        .and_then(|value| value.string_value.as_deref())
        .filter(|key| !key.is_empty())
        .map(str::to_owned);
    Some(Envelope {
        body: message.body.unwrap_or_default(),
        meta: Meta {
            message_id: MessageId::Text(message.message_id.unwrap_or_default()),
            dedupe_key,
            sent_at_ms: number(MessageSystemAttributeName::SentTimestamp),
            received_at,
            receive_count: number(MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(1)
                as u32,
            ack: AckToken::Sqs { receipt_handle },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::types::MessageAttributeValue;

    #[test]
    fn message_fields_land_in_the_envelope() {
        let message = Message::builder()
            .message_id("mid")
            .receipt_handle("rh")
            .body("{}")
            .attributes(MessageSystemAttributeName::SentTimestamp, "1709337600000")
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "3")
            .message_attributes(
                "dedupe_id",
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("k1")
                    .build()
                    .expect("valid attribute"),
            )
            .build();
        let e = envelope_from(message, "dedupe_id", SystemTime::now()).expect("has a handle");
        assert_eq!(e.body, "{}");
        assert_eq!(e.meta.message_id, MessageId::Text("mid".into()));
        assert_eq!(e.meta.sent_at_ms, Some(1_709_337_600_000));
        assert_eq!(e.meta.receive_count, 3);
        assert_eq!(e.meta.dedupe_key.as_deref(), Some("k1"));
        assert_eq!(
            e.meta.ack,
            AckToken::Sqs {
                receipt_handle: "rh".into()
            }
        );
    }

    #[test]
    fn messages_received_too_often_become_dead_letters_saying_so() {
        let at = |count: u32| {
            let mut meta = Meta::at_position(u64::from(count), SystemTime::now());
            meta.receive_count = count;
            Envelope {
                body: format!("{{\"n\": {count}}}"),
                meta,
            }
        };
        let limits = Limits {
            max_receives: 10,
            max_message_bytes: 1024,
        };
        let chunk = checked(vec![at(1), at(10), at(11), at(40)], limits);
        assert_eq!(chunk.items.len(), 2);
        let reasons: Vec<&str> = chunk.rejects.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "received 11 times, more than `source.sqs.max_receives` (10)",
                "received 40 times, more than `source.sqs.max_receives` (10)"
            ]
        );
        assert_eq!(chunk.rejects[0].body, "{\"n\": 11}");
        assert_eq!(chunk.rejects[0].stage, Stage::Source);
    }

    #[test]
    fn a_body_over_the_limit_becomes_a_dead_letter_naming_its_size() {
        let envelope = |body: String| Envelope {
            body,
            meta: Meta::at_position(1, SystemTime::now()),
        };
        let limits = Limits {
            max_receives: 10,
            max_message_bytes: 2048,
        };
        let big = format!("{{\"x\": \"{}\"}}", "é".repeat(3000));
        let chunk = checked(vec![envelope("a".repeat(2048)), envelope(big)], limits);
        assert_eq!(chunk.items.len(), 1, "at the limit is within it");
        let reject = &chunk.rejects[0];
        assert_eq!(
            reject.reason,
            "message is 6009 bytes, more than `source.max_message_bytes` (2048); its first 1023 bytes are kept"
        );
        assert_eq!(reject.body.len(), 1023, "cut at a character boundary");
    }

    #[test]
    fn without_the_attribute_there_is_no_producer_key() {
        let message = Message::builder()
            .message_id("mid")
            .receipt_handle("rh")
            .build();
        let e = envelope_from(message, "dedupe_id", SystemTime::now()).expect("has a handle");
        assert_eq!(e.meta.dedupe_key, None);
        assert_eq!(e.body, "");
        let no_handle = Message::builder().message_id("mid").build();
        assert!(envelope_from(no_handle, "dedupe_id", SystemTime::now()).is_none());
    }
}
