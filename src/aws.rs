//! What the SQS source, the dead-letter forwarder and `sluice seed` share about talking to AWS:
//! building a client from configuration, and telling a passing error from one that retrying cannot fix.
//!
//! Region and credentials come from the standard AWS chain, with two departures. With an
//! `endpoint_url` (an emulator such as moto or LocalStack) instance metadata is never asked for
//! either: an emulator has no use for an instance's role or region, and on a laptop each probe costs
//! seconds and a page of warnings. (A private endpoint used from an EC2 instance therefore takes its
//! credentials from the environment, a profile, web identity or a container role, not the instance
//! role.) And when no credentials are found, the error says which variables or profile to set
//! instead of listing every provider the SDK tried.

use std::time::Duration;

use aws_config::environment::credentials::EnvironmentVariableCredentialsProvider;
use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::{ProfileFileCredentialsProvider, ProfileFileRegionProvider};
use aws_config::provider_config::ProviderConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

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

/// One line saying what went wrong: the service's code and message, what to do about missing
/// credentials, or the transport error's chain of causes (the SDK's own `Display` hides the cause,
/// and its error context appends a `Debug` dump).
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
        other => causes(other),
    }
}

/// An error and its sources, each said once; [`NoCredentials`] alone when it is among them.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(missing) = e.downcast_ref::<NoCredentials>() {
            return missing.to_string();
        }
        let text = e.to_string();
        if !parts.last().is_some_and(|last| last.ends_with(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// No provider of the chain had credentials.
#[derive(Debug, thiserror::Error)]
#[error(
    "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE to a profile that has them (against an emulator any values work)"
)]
pub struct NoCredentials;

/// The credentials chain, with [`NoCredentials`] as the reason when none of its providers had any.
#[derive(Debug)]
struct ExplainMissing(SharedCredentialsProvider);

impl ProvideCredentials for ExplainMissing {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            self.0.provide_credentials().await.map_err(|e| match e {
                CredentialsError::CredentialsNotLoaded(_) => {
                    CredentialsError::not_loaded(NoCredentials)
                }
                other => other,
            })
        })
    }
}

/// An SQS client for the configured region and endpoint. Credentials come from the standard chain
/// (environment, profile, web identity, container role, and instance role unless an endpoint is
/// configured).
pub async fn sqs_client(cfg: &SqsConfig) -> aws_sdk_sqs::Client {
    let shared = shared_config(cfg).await;
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

/// Whether the instance metadata service may be asked for a region or credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InstanceMetadata {
    Ask,
    /// An endpoint is configured: an emulator, which no instance's region or role concerns.
    Never,
}

/// The region used when nothing names one.
const FALLBACK_REGION: &str = "us-east-1";

async fn shared_config(cfg: &SqsConfig) -> aws_config::SdkConfig {
    let metadata = if cfg.endpoint_url.is_some() {
        InstanceMetadata::Never
    } else {
        InstanceMetadata::Ask
    };
    let region = region(cfg.region.as_deref(), metadata).await;
    let credentials = credentials(&region, metadata).await;
    aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .credentials_provider(ExplainMissing(credentials))
        .load()
        .await
}

/// `source.sqs.region`, else `AWS_REGION`/`AWS_DEFAULT_REGION`, else the profile's, else (when
/// allowed) the instance's, else `us-east-1`.
async fn region(configured: Option<&str>, metadata: InstanceMetadata) -> Region {
    if let Some(region) = configured {
        return Region::new(region.to_owned());
    }
    let named = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(ProfileFileRegionProvider::new());
    if let Some(region) = named.region().await {
        return region;
    }
    if metadata == InstanceMetadata::Ask {
        if let Some(region) = instance_region().await {
            return region;
        }
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                "no AWS region set (source.sqs.region, AWS_REGION or a profile) and none from instance metadata; using {FALLBACK_REGION}"
            )
        });
    }
    Region::from_static(FALLBACK_REGION)
}

/// The region of the instance sluice runs on, if it runs on one. The SDK's own provider logs a
/// page-long warning wherever there is no instance, which is the usual case; here its absence is
/// worth one line at most, said by the caller.
async fn instance_region() -> Option<Region> {
    if std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    let client = aws_config::imds::Client::builder().build();
    match client.get("/latest/meta-data/placement/region").await {
        Ok(region) => Some(Region::new(String::from(region))),
        Err(e) => {
            tracing::debug!(error = %causes(&e), "no region from instance metadata");
            None
        }
    }
}

/// The standard credentials chain, without the instance's role when metadata is not to be asked.
async fn credentials(region: &Region, metadata: InstanceMetadata) -> SharedCredentialsProvider {
    match metadata {
        InstanceMetadata::Ask => SharedCredentialsProvider::new(
            aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                .region(region.clone())
                .build()
                .await,
        ),
        InstanceMetadata::Never => {
            let conf = ProviderConfig::without_region().with_region(Some(region.clone()));
            SharedCredentialsProvider::new(
                CredentialsProviderChain::first_try(
                    "Environment",
                    EnvironmentVariableCredentialsProvider::new(),
                )
                .or_else(
                    "Profile",
                    ProfileFileCredentialsProvider::builder()
                        .configure(&conf)
                        .build(),
                )
                .or_else(
                    "WebIdentityToken",
                    aws_config::web_identity_token::WebIdentityTokenCredentialsProvider::builder()
                        .configure(&conf)
                        .build(),
                )
                .or_else(
                    "EcsContainer",
                    aws_config::ecs::EcsCredentialsProvider::builder()
                        .configure(&conf)
                        .build(),
                ),
            )
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    }

    fn layer(
        text: &'static str,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Layer {
        Layer { text, source }
    }

    #[test]
    fn causes_are_said_once_in_order_without_debug_dumps() {
        let refused = layer("connection refused", None);
        let io = layer("io error: connection refused", Some(Box::new(refused)));
        let dispatch = layer("dispatch failure", Some(Box::new(io)));
        assert_eq!(
            causes(&dispatch),
            "dispatch failure: io error: connection refused"
        );
    }

    #[test]
    fn missing_credentials_are_explained_alone() {
        let missing = CredentialsError::not_loaded(NoCredentials);
        let dispatch = layer("dispatch failure", Some(Box::new(missing)));
        let text = causes(&dispatch);
        assert!(
            text.starts_with("no AWS credentials: set AWS_ACCESS_KEY_ID"),
            "{text}"
        );
    }
}
