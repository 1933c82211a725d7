//! Putting seed messages where the configured source reads them: onto the SQS queue (in batches of
//! ten, several calls in flight) or into the file a file source reads.

use std::io::Write;
use std::path::Path;

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use futures::stream::{self, StreamExt};
use indicatif::ProgressBar;

use crate::aws;
use crate::config::SqsConfig;
use crate::retry;

/// One message to send, with the idempotency key that makes re-seeding harmless.
#[derive(Debug, Clone)]
pub struct SeedMessage {
    pub body: String,
    pub dedupe_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{0}")]
    Sqs(String),
    #[error("SQS refused message #{position}: {reason}")]
    Refused { position: usize, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

const CALLS_IN_FLIGHT: usize = 8;
const ATTEMPTS: usize = 8;

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
            return out
                .queue_url
                .ok_or_else(|| SeedError::Sqs("GetQueueUrl returned no URL".into()));
        }
        Err(e) if is_missing_queue(&e) => {}
        Err(e) => {
            return Err(SeedError::Sqs(format!(
                "cannot look up queue {name:?}: {}",
                aws::describe(&e)
            )));
        }
    }
    let out = client
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .map_err(|e| {
            SeedError::Sqs(format!(
                "cannot create queue {name:?}: {}",
                aws::describe(&e)
            ))
        })?;
    tracing::info!(queue = name, "created SQS queue");
    out.queue_url
        .ok_or_else(|| SeedError::Sqs("CreateQueue returned no URL".into()))
}

fn is_missing_queue<E: ProvideErrorMetadata, R>(e: &aws_sdk_sqs::error::SdkError<E, R>) -> bool {
    matches!(
        e.as_service_error().and_then(|s| s.code()),
        Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
    )
}

/// Sends every message; returns how many were sent.
pub async fn send_to_queue(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    dedupe_attribute: &str,
    messages: impl Iterator<Item = SeedMessage> + Send,
    progress: &ProgressBar,
) -> Result<u64, SeedError> {
    let groups = GroupsOfTen {
        inner: messages,
        position: 0,
    };
    let mut results = stream::iter(groups)
        .map(|(first, group)| send_group(client, queue_url, dedupe_attribute, first, group))
        .buffer_unordered(CALLS_IN_FLIGHT);
    let mut sent = 0;
    while let Some(result) = results.next().await {
        let n = result?;
        sent += n as u64;
        progress.inc(n as u64);
    }
    Ok(sent)
}

/// Consecutive groups of up to ten messages, with the position of each group's first message.
struct GroupsOfTen<I> {
    inner: I,
    position: usize,
}

impl<I: Iterator<Item = SeedMessage>> Iterator for GroupsOfTen<I> {
    type Item = (usize, Vec<SeedMessage>);
    fn next(&mut self) -> Option<Self::Item> {
        let group: Vec<SeedMessage> = self.inner.by_ref().take(10).collect();
        if group.is_empty() {
            return None;
        }
        let first = self.position;
        self.position += group.len();
        Some((first, group))
    }
}

async fn send_group(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    dedupe_attribute: &str,
    first_position: usize,
    group: Vec<SeedMessage>,
) -> Result<usize, SeedError> {
    let mut pending: Vec<usize> = (0..group.len()).collect();
    let mut pacing = retry::backoff();
    for _ in 0..ATTEMPTS {
        let entries: Vec<SendMessageBatchRequestEntry> = pending
            .iter()
            .filter_map(|&i| entry(i, &group[i], dedupe_attribute))
            .collect();
        let result = client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await;
        match result {
            Ok(out) => {
                let mut again = Vec::new();
                for failed in out.failed {
                    let i: usize = failed.id.parse().unwrap_or_default();
                    if failed.sender_fault {
                        return Err(SeedError::Refused {
                            position: first_position + i + 1,
                            reason: failed.message.unwrap_or(failed.code),
                        });
                    }
                    again.push(i);
                }
                if again.is_empty() {
                    return Ok(group.len());
                }
                pending = again;
            }
            Err(e) if aws::classify(&e) == aws::AwsErrorClass::Fatal => {
                return Err(SeedError::Sqs(format!(
                    "{queue_url}: {}",
                    aws::describe(&e)
                )));
            }
            Err(e) => {
                tracing::warn!(error = %aws::describe(&e), "SendMessageBatch failed; retrying")
            }
        }
        retry::pause(&mut pacing).await;
    }
    Err(SeedError::Sqs(format!(
        "{queue_url}: gave up sending after {ATTEMPTS} attempts"
    )))
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
    progress: &ProgressBar,
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
    progress.set_position(written);
    Ok(written)
}

/// Writes the messages as NDJSON lines to `out` (standard output, for `path = "-"`).
pub fn write_lines_to(
    out: &mut impl Write,
    messages: impl Iterator<Item = SeedMessage>,
    progress: &ProgressBar,
) -> std::io::Result<u64> {
    let written = write_lines(out, messages, progress)?;
    out.flush()?;
    Ok(written)
}

fn write_lines(
    out: &mut impl Write,
    messages: impl Iterator<Item = SeedMessage>,
    progress: &ProgressBar,
) -> std::io::Result<u64> {
    let mut written = 0;
    for message in messages {
        out.write_all(message.body.as_bytes())?;
        out.write_all(b"\n")?;
        written += 1;
        if written % 10_000 == 0 {
            progress.set_position(written);
        }
    }
    Ok(written)
}
