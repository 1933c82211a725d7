//! The SQS source: long-polling receivers feeding the pipeline.
//!
//! Several pollers run concurrently because each receive returns at most 10 messages and costs a
//! round trip. Before each receive a poller reserves room in [`InFlight`], so at most
//! `max_in_flight` messages are held however slow the sink is. Messages are deleted only by the
//! [`SqsAcknowledger`], after commit.
//!
//! On shutdown a poller stops starting receives. After a signal, a receive already waiting gets a
//! short grace to return what it has, then is abandoned: under traffic receives return at once, so
//! nothing is cut off. But the queue server may still hold an abandoned long poll and hand it messages
//! that arrive meanwhile; those stay invisible until their visibility timeout and are then delivered
//! again, delayed but never lost. When the run stops because the queue went idle there is no hurry,
//! so receives in progress are allowed to return (within `wait_time_seconds`) and nothing is
//! stranded.

mod acknowledger;
pub mod in_flight;

pub use acknowledger::SqsAcknowledger;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use tokio::sync::mpsc;

use crate::aws::{self, AwsErrorClass};
use crate::config::SqsConfig;
use crate::envelope::{AckToken, Chunk, Envelope, MessageId, Meta};
use crate::retry;
use crate::shutdown::Shutdown;
use crate::source::{BuiltSource, Source, SourceError};
use crate::stats::Stats;

use in_flight::InFlight;

/// How long a receive in progress may finish after shutdown begins.
const RECEIVE_GRACE: Duration = Duration::from_secs(1);

pub struct SqsSource {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    cfg: SqsConfig,
    in_flight: Arc<InFlight>,
    stats: Arc<Stats>,
}

impl SqsSource {
    /// Connects, resolves the queue and checks it answers, so a wrong queue or bad credentials fail
    /// at start rather than in a retry loop.
    pub async fn build(cfg: &SqsConfig, stats: Arc<Stats>) -> Result<BuiltSource, SourceError> {
        let client = aws::sqs_client(cfg).await;
        let queue_url = aws::resolve_queue_url(&client, cfg)
            .await
            .map_err(SourceError::Fatal)?;
        client
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(|e| {
                SourceError::Fatal(format!("SQS queue {queue_url}: {}", aws::describe(&e)))
            })?;
        let in_flight = Arc::new(InFlight::new(cfg.max_in_flight));
        let visibility = Duration::from_secs(cfg.visibility_timeout_seconds as u64);
        let acknowledger = SqsAcknowledger::start(
            client.clone(),
            queue_url.clone(),
            in_flight.clone(),
            visibility,
            stats.clone(),
        );
        tracing::info!(queue_url, pollers = cfg.pollers, "SQS source ready");
        Ok(BuiltSource {
            source: Box::new(SqsSource {
                client,
                queue_url,
                cfg: cfg.clone(),
                in_flight,
                stats,
            }),
            acknowledger: Arc::new(acknowledger),
            chunk_messages: cfg.max_messages as usize,
            // A long poll returns within its wait time; the SDK's attempt timeout bounds it too.
            receive_allowance: aws::receive_attempt_timeout(cfg),
        })
    }
}

#[async_trait]
impl Source for SqsSource {
    async fn run(
        self: Box<Self>,
        out: mpsc::Sender<Chunk<Envelope>>,
        shutdown: Shutdown,
    ) -> Result<(), SourceError> {
        let this = Arc::new(*self);
        let mut pollers = tokio::task::JoinSet::new();
        for id in 0..this.cfg.pollers {
            let (this, out, shutdown) = (this.clone(), out.clone(), shutdown.clone());
            pollers.spawn(async move { this.poll(id, out, shutdown).await });
        }
        drop(out);
        let mut result = Ok(());
        while let Some(joined) = pollers.join_next().await {
            let outcome =
                joined.unwrap_or_else(|e| Err(SourceError::Fatal(format!("poller panicked: {e}"))));
            if let Err(e) = outcome {
                // One poller's fatal error (queue deleted, access revoked) stops them all.
                shutdown.stop();
                result = Err(e);
            }
        }
        result
    }
}

impl SqsSource {
    async fn poll(
        &self,
        id: usize,
        out: mpsc::Sender<Chunk<Envelope>>,
        shutdown: Shutdown,
    ) -> Result<(), SourceError> {
        let mut pacing = retry::backoff();
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
            let Some(result) = self.receive_until_shutdown(&shutdown).await else {
                self.in_flight.unreserve(max as usize);
                return Ok(());
            };
            match result {
                Ok(messages) => {
                    pacing = retry::backoff();
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
                Err((AwsErrorClass::Fatal, message)) => {
                    self.in_flight.unreserve(max as usize);
                    return Err(SourceError::Fatal(message));
                }
                Err((AwsErrorClass::Transient, message)) => {
                    self.in_flight.unreserve(max as usize);
                    tracing::warn!(poller = id, error = %message, "SQS receive failed; retrying");
                    tokio::select! {
                        _ = retry::pause(&mut pacing) => {}
                        _ = shutdown.requested() => return Ok(()),
                    }
                }
            }
        }
    }

    /// One receive; `None` if shutdown came first and the grace ran out.
    async fn receive_until_shutdown(
        &self,
        shutdown: &Shutdown,
    ) -> Option<Result<Vec<Message>, (AwsErrorClass, String)>> {
        let receive = self.receive();
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

    async fn receive(&self) -> Result<Vec<Message>, (AwsErrorClass, String)> {
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
        match request.send().await {
            Ok(out) => Ok(out.messages.unwrap_or_default()),
            Err(e) => Err((
                aws::classify(&e),
                format!("{}: {}", self.queue_url, aws::describe(&e)),
            )),
        }
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
        (Chunk::new(envelopes), tracked)
    }
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
        .map(ledger_sized);
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

/// Longest producer key stored as given; a B-tree index entry must stay well under PostgreSQL's
/// ~2.7 kB limit, and SQS attributes may be far longer.
const MAX_KEY_BYTES: usize = 256;

/// The key as given, or for an overlong one its SHA-256 (still unique, and the same for every resend).
fn ledger_sized(key: &str) -> String {
    if key.len() <= MAX_KEY_BYTES {
        key.to_owned()
    } else {
        use sha2::Digest;
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        )
    }
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
        assert_eq!(e.meta.ledger_key(), "k1");
        assert_eq!(
            e.meta.ack,
            AckToken::Sqs {
                receipt_handle: "rh".into()
            }
        );
    }

    #[test]
    fn overlong_producer_keys_are_hashed_consistently() {
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(ledger_sized("short"), "short");
        assert_eq!(ledger_sized(&long), ledger_sized(&long));
        assert!(ledger_sized(&long).starts_with("sha256:"));
        assert_eq!(ledger_sized(&long).len(), 7 + 64);
    }

    #[test]
    fn without_the_attribute_the_message_id_is_the_key() {
        let message = Message::builder()
            .message_id("mid")
            .receipt_handle("rh")
            .build();
        let e = envelope_from(message, "dedupe_id", SystemTime::now()).expect("has a handle");
        assert_eq!(e.meta.ledger_key(), "mid");
        assert_eq!(e.body, "");
        let no_handle = Message::builder().message_id("mid").build();
        assert!(envelope_from(no_handle, "dedupe_id", SystemTime::now()).is_none());
    }
}
