//! Putting seed messages where the configured source reads them: onto the SQS queue (in batches of
//! ten, several calls in flight) or into the file a file source reads. Progress is reported through
//! a callback with the running total; showing it is the caller's business.

use std::io::Write;
use std::path::Path;

use async_trait::async_trait;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use futures::StreamExt;

use crate::aws::AwsError;
use crate::aws::sqs_batch::{self, BatchCall, BatchFailure, EntryFailure, entry_failures};
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
    #[error("cannot look up queue {name:?}")]
    Lookup {
        name: String,
        #[source]
        source: AwsError,
    },
    #[error("cannot create queue {name:?}")]
    Create {
        name: String,
        #[source]
        source: AwsError,
    },
    #[error("{call} returned no queue URL")]
    NoUrl { call: &'static str },
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
    if let Some(url) = &cfg.queue_url {
        return Ok(url.clone());
    }
    let name = cfg.queue_name.clone().unwrap_or_default();
    match client.get_queue_url().queue_name(&name).send().await {
        Ok(out) => {
            return out.queue_url.ok_or(SeedError::NoUrl {
                call: "GetQueueUrl",
            });
        }
        Err(e) if is_missing_queue(&e) => {}
        Err(e) => {
            return Err(SeedError::Lookup {
                name,
                source: e.into(),
            });
        }
    }
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
    out.queue_url.ok_or(SeedError::NoUrl {
        call: "CreateQueue",
    })
}

fn is_missing_queue<E: ProvideErrorMetadata, R>(e: &aws_sdk_sqs::error::SdkError<E, R>) -> bool {
    matches!(
        e.as_service_error().and_then(|s| s.code()),
        Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
    )
}

/// Sends every message; returns how many were sent. `progress` is told the running total.
pub async fn send_to_queue(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    dedupe_attribute: &str,
    messages: impl Iterator<Item = SeedMessage> + Send,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<u64, SeedError> {
    let call = SendSeeds {
        client,
        queue_url,
        dedupe_attribute,
    };
    // 1-based positions, to name a message the queue refuses.
    let numbered = messages.enumerate().map(|(i, m)| (i + 1, m));
    let mut groups = std::pin::pin!(sqs_batch::send_groups(
        &call,
        numbered,
        SEND,
        CALLS_IN_FLIGHT
    ));
    let mut sent = 0;
    while let Some(group) = groups.next().await {
        if let Some(((position, _), why)) = group.refused.into_iter().next() {
            return Err(SeedError::Refused {
                position,
                source: why,
            });
        }
        if let Some((position, _)) = group.unsent.first() {
            return Err(SeedError::Unsent {
                position: *position,
                queue_url: queue_url.to_owned(),
                source: group.last_failure,
            });
        }
        sent += group.delivered.len() as u64;
        progress(sent);
    }
    Ok(sent)
}

/// SendMessageBatch of seed messages, each with its dedupe id as a message attribute.
struct SendSeeds<'a> {
    client: &'a aws_sdk_sqs::Client,
    queue_url: &'a str,
    dedupe_attribute: &'a str,
}

#[async_trait]
impl BatchCall for SendSeeds<'_> {
    type Entry = (usize, SeedMessage);

    fn name(&self) -> &'static str {
        "SendMessageBatch"
    }

    async fn call(&self, entries: &[&(usize, SeedMessage)]) -> Result<Vec<EntryFailure>, AwsError> {
        let entries = entries
            .iter()
            .enumerate()
            .filter_map(|(i, (_, message))| entry(i, message, self.dedupe_attribute))
            .collect();
        let out = self
            .client
            .send_message_batch()
            .queue_url(self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await?;
        Ok(entry_failures(out.failed))
    }
}

fn entry(
    i: usize,
    message: &SeedMessage,
    dedupe_attribute: &str,
) -> Option<SendMessageBatchRequestEntry> {
    let mut entry = SendMessageBatchRequestEntry::builder()
        .id(i.to_string())
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
            .ok()?;
        entry = entry.message_attributes(dedupe_attribute, value);
    }
    entry.build().ok()
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
