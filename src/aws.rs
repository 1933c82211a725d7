//! What the SQS source, the dead-letter forwarder and `sluice seed` share about talking to AWS:
//! building a client from configuration, and telling a passing error from one that retrying cannot fix.

use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::config::SqsConfig;

/// Whether an AWS error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsErrorClass {
    /// Throttling, timeouts, connection trouble, 5xx: retry with backoff.
    Transient,
    /// Missing queue, bad credentials, access denied: retrying will not help.
    Fatal,
}

/// Error codes that mean the request can never succeed as configured.
const FATAL_CODES: &[&str] = &[
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidAddress",
    "InvalidSecurity",
    "ResourceNotFoundException",
];

/// Codes by which SQS refuses a whole batch call for its shape (not for any one entry): sending the
/// same call again can never succeed.
const MALFORMED_BATCH_CODES: &[&str] = &[
    "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
    "BatchEntryIdsNotDistinct",
    "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
    "TooManyEntriesInBatchRequest",
    "AWS.SimpleQueueService.EmptyBatchRequest",
    "EmptyBatchRequest",
    "AWS.SimpleQueueService.InvalidBatchEntryId",
    "InvalidBatchEntryId",
    "AWS.SimpleQueueService.BatchRequestTooLong",
    "BatchRequestTooLong",
];

/// Whether SQS refused a batch call as a whole because of its shape.
pub fn is_malformed_batch<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    match err {
        SdkError::ServiceError(e) => e
            .err()
            .code()
            .is_some_and(|code| MALFORMED_BATCH_CODES.contains(&code)),
        _ => false,
    }
}

pub fn classify<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> AwsErrorClass {
    match err {
        SdkError::ConstructionFailure(_) => AwsErrorClass::Fatal,
        SdkError::ServiceError(e) => match e.err().code() {
            Some(code) if FATAL_CODES.contains(&code) => AwsErrorClass::Fatal,
            _ => AwsErrorClass::Transient,
        },
        _ => AwsErrorClass::Transient,
    }
}

/// One line saying what went wrong: the service's code and message, or the transport error's chain
/// (the SDK's own `Display` hides the cause).
pub fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    match err {
        SdkError::ServiceError(e) => {
            let code = e.err().code().unwrap_or("service error");
            match e.err().message() {
                Some(message) => format!("{code}: {message}"),
                None => code.to_owned(),
            }
        }
        other => DisplayErrorContext(other).to_string(),
    }
}

/// An SQS client for the configured region and endpoint. Credentials come from the standard chain
/// (environment, profile, web identity, instance role).
pub async fn sqs_client(cfg: &SqsConfig) -> aws_sdk_sqs::Client {
    let shared = shared_config(cfg.region.as_deref()).await;
    let mut builder = aws_sdk_sqs::config::Builder::from(&shared).timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(receive_attempt_timeout(cfg))
            .build(),
    );
    if let Some(endpoint) = &cfg.endpoint_url {
        builder = builder.endpoint_url(endpoint);
    }
    aws_sdk_sqs::Client::from_conf(builder.build())
}

/// The longest one SQS call may take: a long poll legitimately takes `wait_time_seconds`.
pub fn receive_attempt_timeout(cfg: &SqsConfig) -> Duration {
    Duration::from_secs(cfg.wait_time_seconds.max(0) as u64 + 15)
}

async fn shared_config(region: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    let shared = loader.load().await;
    if shared.region().is_some() {
        return shared;
    }
    shared
        .into_builder()
        .region(Region::new("us-east-1"))
        .build()
}

/// The queue URL: as configured, or looked up by name.
pub async fn resolve_queue_url(
    client: &aws_sdk_sqs::Client,
    cfg: &SqsConfig,
) -> Result<String, String> {
    if let Some(url) = &cfg.queue_url {
        return Ok(url.clone());
    }
    let name = cfg.queue_name.as_deref().unwrap_or_default();
    let out = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| format!("cannot find SQS queue {name:?}: {}", describe(&e)))?;
    out.queue_url
        .ok_or_else(|| format!("GetQueueUrl for {name:?} returned no URL"))
}
