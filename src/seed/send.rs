//! Putting seed messages where the configured source reads them: onto the SQS queue (in batches of
//! ten, several calls in flight) or into the file a file source reads. Progress is reported through
//! a callback with the running total; showing it is the caller's business.

use std::io::Write;
use std::marker::PhantomData;
use std::path::Path;

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use futures::StreamExt;

use crate::aws::sqs_batch::{self, BatchFailure, Outgoing, SendMessages};
use crate::aws::{self, AwsError, QueueError};
use crate::config::SqsConfig;
use crate::retry::RetryPolicy;

/// One message to send, with the idempotency key that makes re-seeding harmless.
#[derive(Debug, Clone)]
pub struct SeedMessage {
    pub body: String,
    pub dedupe_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("cannot create queue {name:?}")]
    Create {
        name: String,
        #[source]
        source: AwsError,
    },
    #[error("CreateQueue returned no queue URL")]
    NoUrl,
    #[error("SQS refused message #{position}")]
    Refused {
        position: usize,
        #[source]
        source: BatchFailure,
    },
    #[error("gave up sending message #{position} to {queue_url}")]
    Unsent {
        position: usize,
        queue_url: String,
        #[source]
        source: Option<BatchFailure>,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

const CALLS_IN_FLIGHT: usize = 8;
/// Seeding is interactive: a queue that keeps failing is reported after a few attempts.
const SEND: RetryPolicy = RetryPolicy::attempts(8);

/// The queue's URL, creating the queue if it is configured by a name that does not exist yet.
pub async fn ensure_queue(
    client: &aws_sdk_sqs::Client,
    cfg: &SqsConfig,
) -> Result<String, SeedError> {
    match aws::resolve_queue_url(client, cfg).await {
        Ok(url) => Ok(url),
        Err(e) if e.is_missing_queue() => {
            let name = cfg.queue_name.clone().unwrap_or_default();
            let out = client
                .create_queue()
                .queue_name(&name)
                .send()
                .await
                .map_err(|e| SeedError::Create {
                    name: name.clone(),
                    source: e.into(),
                })?;
            tracing::info!(queue = name, "created SQS queue");
            out.queue_url.ok_or(SeedError::NoUrl)
        }
        Err(e) => Err(e.into()),
    }
}

/// Sends every message; returns how many were sent. `progress` is told the running total.
pub async fn send_to_queue(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    dedupe_attribute: &str,
    messages: impl Iterator<Item = SeedMessage> + Send,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<u64, SeedError> {
    let call = SendMessages {
        client,
        queue_url,
        max_call_bytes: usize::MAX,
        timeout: None,
        tag: PhantomData,
    };
    // Tagged with 1-based positions, to name a message the queue refuses.
    let numbered = messages.enumerate().map(|(i, m)| Outgoing {
        entry: entry(&m, dedupe_attribute),
        bytes: 0,
        tag: i + 1,
    });
    let mut groups = std::pin::pin!(sqs_batch::send_groups(
        &call,
        numbered,
        SEND,
        CALLS_IN_FLIGHT
    ));
    let mut sent = 0;
    while let Some(group) = groups.next().await {
        if let Some((Outgoing { tag: position, .. }, why)) = group.refused.into_iter().next() {
            return Err(SeedError::Refused {
                position,
                source: why,
            });
        }
        if let Some(unsent) = group.unsent.first() {
            return Err(SeedError::Unsent {
                position: unsent.tag,
                queue_url: queue_url.to_owned(),
                source: group.last_failure,
            });
        }
        sent += group.delivered.len() as u64;
        progress(sent);
    }
    Ok(sent)
}

/// The entry for one message, its dedupe id as a message attribute; its id is set per call.
fn entry(message: &SeedMessage, dedupe_attribute: &str) -> SendMessageBatchRequestEntry {
    let mut entry = SendMessageBatchRequestEntry::builder()
        .id("-")
        .message_body(&message.body);
    if let Some(key) = message
        .dedupe_id
        .as_deref()
        .filter(|_| !dedupe_attribute.is_empty())
    {
        let value = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(key)
            .build()
            .unwrap_or_else(|_| unreachable!("data_type is set"));
        entry = entry.message_attributes(dedupe_attribute, value);
    }
    entry
        .build()
        .unwrap_or_else(|_| unreachable!("id and body are set"))
}

/// Writes the messages as NDJSON (gzip when the name ends in `.gz`) for a file source. Without
/// `replace`, a file that exists is an error (checked by the create itself, so no race can slip one
/// in between a check and the write).
pub fn write_file(
    path: &Path,
    replace: bool,
    messages: impl Iterator<Item = SeedMessage>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, SeedError> {
    let write_err = |source| SeedError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let file = options.open(path).map_err(write_err)?;
    let buffered = std::io::BufWriter::with_capacity(1 << 20, file);
    let written = if path.extension().is_some_and(|e| e == "gz") {
        let mut gz = flate2::write::GzEncoder::new(buffered, flate2::Compression::fast());
        let n = write_lines(&mut gz, messages, progress).map_err(write_err)?;
        gz.finish()
            .and_then(|mut inner| inner.flush())
            .map_err(write_err)?;
        n
    } else {
        let mut plain = buffered;
        let n = write_lines(&mut plain, messages, progress).map_err(write_err)?;
        plain.flush().map_err(write_err)?;
        n
    };
    progress(written);
    Ok(written)
}

/// Writes the messages as NDJSON lines to `out` (standard output, for `path = "-"`).
pub fn write_lines_to(
    out: &mut impl Write,
    messages: impl Iterator<Item = SeedMessage>,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<u64> {
    let written = write_lines(out, messages, progress)?;
    out.flush()?;
    Ok(written)
}

fn write_lines(
    out: &mut impl Write,
    messages: impl Iterator<Item = SeedMessage>,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<u64> {
    let mut written = 0;
    for message in messages {
        out.write_all(message.body.as_bytes())?;
        out.write_all(b"\n")?;
        written += 1;
        if written % 10_000 == 0 {
            progress(written);
        }
    }
    Ok(written)
}
