//! Seeding a Kinesis stream: PutRecords in batches of up to 500, each login's `user_id` as its
//! partition key, so one user's logins land on one shard in order (and a stream with several shards
//! spreads the users over them). PutRecords is not all-or-nothing: entries can fail one by one
//! (throttling, an internal error) while the rest land, so the failed ones are sent again, with
//! backoff, until they land or the attempts run out.
//!
//! A record has no message attributes, so the seeder's dedupe ids do not travel: Kinesis needs
//! none, since checkpoints committed with the rows make a reader exactly once.

use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use sha2::{Digest, Sha256};

use super::send::SeedMessage;
use crate::retry::RetryPolicy;
use crate::source::kinesis::api::StreamRef;

/// The most entries one PutRecords call takes.
pub const MAX_RECORDS_PER_PUT: usize = 500;
/// Shards of a stream that seeding creates because it is missing (the demo's).
pub const NEW_STREAM_SHARDS: i32 = 4;
/// Seeding is interactive: entries that keep failing are reported after a few attempts.
const PUT: RetryPolicy = RetryPolicy::attempts(8);
/// How long a new stream may take to become active.
const ACTIVE_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum KinesisSeedError {
    #[error("Kinesis stream {stream}: {message}")]
    Call { stream: String, message: String },
    #[error(
        "gave up on {failed} record(s) of stream {stream} after {attempts} attempts: {last_error}"
    )]
    Unsent {
        stream: String,
        failed: usize,
        attempts: usize,
        last_error: String,
    },
    #[error("stream {stream} did not become active within {} s", ACTIVE_WITHIN.as_secs())]
    NotActive { stream: String },
}

fn call_error<E, R>(stream: &StreamRef, what: &str, err: SdkError<E, R>) -> KinesisSeedError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    KinesisSeedError::Call {
        stream: stream.name().to_owned(),
        message: format!("{what}: {}", crate::aws::describe(&err)),
    }
}

/// Makes sure the stream exists: a stream configured by name that is missing is created with
/// [`NEW_STREAM_SHARDS`] shards, and waited for until active. Returns whether it was created.
pub async fn ensure_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &StreamRef,
) -> Result<bool, KinesisSeedError> {
    let described = match stream {
        StreamRef::Name(name) => client.describe_stream_summary().stream_name(name),
        StreamRef::Arn(arn) => client.describe_stream_summary().stream_arn(arn),
    }
    .send()
    .await;
    match described {
        Ok(_) => return Ok(false),
        Err(SdkError::ServiceError(e))
            if e.err().code() == Some("ResourceNotFoundException")
                && matches!(stream, StreamRef::Name(_)) => {}
        Err(e) => return Err(call_error(stream, "DescribeStreamSummary", e)),
    }
    client
        .create_stream()
        .stream_name(stream.name())
        .shard_count(NEW_STREAM_SHARDS)
        .send()
        .await
        .map_err(|e| call_error(stream, "CreateStream", e))?;
    tracing::info!(
        stream = stream.name(),
        shards = NEW_STREAM_SHARDS,
        "created Kinesis stream"
    );
    wait_active(client, stream).await?;
    Ok(true)
}

async fn wait_active(
    client: &aws_sdk_kinesis::Client,
    stream: &StreamRef,
) -> Result<(), KinesisSeedError> {
    let started = Instant::now();
    while started.elapsed() < ACTIVE_WITHIN {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream.name())
            .send()
            .await
            .map_err(|e| call_error(stream, "DescribeStreamSummary", e))?;
        let status = summary.stream_description_summary.map(|s| s.stream_status);
        if status == Some(StreamStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(KinesisSeedError::NotActive {
        stream: stream.name().to_owned(),
    })
}

/// The partition key of a message: its `user_id` when it has a usable one, else (a message that is
/// not a login, which sluice will dead-letter) a hash of its body.
pub fn partition_key(body: &str) -> String {
    let user_id = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("user_id").and_then(|u| u.as_str()).map(str::to_owned))
        .filter(|u| !u.is_empty() && u.chars().count() <= 256);
    user_id.unwrap_or_else(|| hex::encode(&Sha256::digest(body.as_bytes())[..16]))
}

/// Puts every message on the stream; returns how many landed (all of them, or an error).
pub async fn send_to_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &StreamRef,
    messages: impl Iterator<Item = SeedMessage> + Send,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<u64, KinesisSeedError> {
    let mut sent = 0u64;
    let mut batch = Vec::with_capacity(MAX_RECORDS_PER_PUT);
    let mut messages = messages.peekable();
    while messages.peek().is_some() {
        batch.clear();
        batch.extend(messages.by_ref().take(MAX_RECORDS_PER_PUT).map(|m| {
            PutRecordsRequestEntry::builder()
                .partition_key(partition_key(&m.body))
                .data(Blob::new(m.body.into_bytes()))
                .build()
        }));
        let entries = batch
            .drain(..)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| KinesisSeedError::Call {
                stream: stream.name().to_owned(),
                message: e.to_string(),
            })?;
        sent += put_all(client, stream, entries).await? as u64;
        progress(sent);
    }
    Ok(sent)
}

/// One PutRecords batch, its failed entries (or the whole call, if it failed) sent again.
async fn put_all(
    client: &aws_sdk_kinesis::Client,
    stream: &StreamRef,
    mut entries: Vec<PutRecordsRequestEntry>,
) -> Result<usize, KinesisSeedError> {
    use backon::BackoffBuilder;
    let total = entries.len();
    let mut delays = PUT.backoff().build();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let request = match stream {
            StreamRef::Name(name) => client.put_records().stream_name(name),
            StreamRef::Arn(arn) => client.put_records().stream_arn(arn),
        };
        let last_error = match request.set_records(Some(entries.clone())).send().await {
            Ok(out) if out.failed_record_count.unwrap_or(0) == 0 => return Ok(total),
            Ok(out) => {
                let mut first_error = String::new();
                let failed: Vec<PutRecordsRequestEntry> = out
                    .records
                    .iter()
                    .zip(entries)
                    .filter(|(result, _)| result.error_code.is_some())
                    .map(|(result, entry)| {
                        if first_error.is_empty() {
                            first_error = format!(
                                "{}: {}",
                                result.error_code.as_deref().unwrap_or_default(),
                                result.error_message.as_deref().unwrap_or_default()
                            );
                        }
                        entry
                    })
                    .collect();
                entries = failed;
                first_error
            }
            Err(e) => {
                let error = call_error(stream, "PutRecords", e);
                if let KinesisSeedError::Call { message, .. } = &error
                    && (message.contains("ResourceNotFound") || message.contains("AccessDenied"))
                {
                    return Err(error);
                }
                error.to_string()
            }
        };
        tracing::debug!(
            failed = entries.len(),
            error = last_error,
            "PutRecords entries failed; retrying them"
        );
        match delays.next() {
            Some(delay) => tokio::time::sleep(delay).await,
            None => {
                return Err(KinesisSeedError::Unsent {
                    stream: stream.name().to_owned(),
                    failed: entries.len(),
                    attempts,
                    last_error,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_is_keyed_by_its_user_and_anything_else_by_its_content() {
        assert_eq!(partition_key(r#"{"user_id":"u-1","ip":"1.2.3.4"}"#), "u-1");
        let odd = partition_key(r#""just a string""#);
        assert_eq!(odd.len(), 32);
        assert_eq!(odd, partition_key(r#""just a string""#));
        assert_ne!(partition_key(r#"{"user_id":""}"#), "");
    }
}
