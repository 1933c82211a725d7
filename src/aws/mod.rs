//! What the SQS source, the dead-letter forwarder and `sluice seed` share about talking to AWS:
//! building a client from configuration, telling a passing error from one that retrying cannot fix,
//! and carrying a failed call as a typed [`AwsError`] that is described only when shown.
//!
//! Region and credentials come from the standard AWS chain, with two departures. With an
//! `endpoint_url` (an emulator such as moto or LocalStack) instance metadata is never asked for
//! either: an emulator has no use for an instance's role or region, and on a laptop each probe costs
//! seconds and a page of warnings. (A private endpoint used from an EC2 instance therefore takes its
//! credentials from the environment, a profile, web identity or a container role, not the instance
//! role.) And when no credentials are found, the error says which variables or profile to set
//! instead of listing every provider the SDK tried.

pub mod sqs_batch;

use std::fmt;
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
use aws_sdk_sqs::types::QueueAttributeName;

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
    R: fmt::Debug + 'static,
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

/// A failed AWS call, kept whole: its class is known at once, its text made only when shown.
///
/// The description covers the SDK error and everything it wraps, so an `AwsError` reports no
/// source of its own: a printed chain shows each cause once.
#[derive(Debug)]
pub struct AwsError {
    class: AwsErrorClass,
    malformed_batch: bool,
    /// The service's error code, if the service answered.
    code: Option<String>,
    cause: Cause,
}

#[derive(Debug)]
enum Cause {
    Sdk(Box<dyn SdkFailure>),
    /// The call did not answer within sluice's own limit.
    NoAnswer(Duration),
}

/// An SDK error of any operation, as [`describe`] shows it.
trait SdkFailure: fmt::Debug + Send + Sync + 'static {
    fn describe(&self) -> String;
}

impl<E, R> SdkFailure for SdkError<E, R>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    fn describe(&self) -> String {
        describe(self)
    }
}

impl AwsError {
    /// A call that did not answer within `limit` (worth another attempt).
    pub fn no_answer(limit: Duration) -> AwsError {
        AwsError {
            class: AwsErrorClass::Transient,
            malformed_batch: false,
            code: None,
            cause: Cause::NoAnswer(limit),
        }
    }

    pub fn class(&self) -> AwsErrorClass {
        self.class
    }

    /// Retrying cannot help.
    pub fn is_fatal(&self) -> bool {
        self.class == AwsErrorClass::Fatal
    }

    /// SQS refused a batch call for its shape: its entries may go through one by one.
    pub fn is_malformed_batch(&self) -> bool {
        self.malformed_batch
    }

    /// The queue does not exist.
    pub fn is_missing_queue(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
        )
    }
}

impl<E, R> From<SdkError<E, R>> for AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    fn from(err: SdkError<E, R>) -> AwsError {
        let code = match &err {
            SdkError::ServiceError(e) => e.err().code().map(str::to_owned),
            _ => None,
        };
        AwsError {
            class: classify(&err),
            malformed_batch: is_malformed_batch(&err),
            code,
            cause: Cause::Sdk(Box::new(err)),
        }
    }
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Sdk(err) => f.write_str(&err.describe()),
            Cause::NoAnswer(limit) => write!(f, "no answer within {limit:?}"),
        }
    }
}

impl std::error::Error for AwsError {}

/// A queue that cannot be found or read.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// `queue` is the queue's name (looking it up) or URL (reading it).
    #[error("SQS queue {queue}")]
    Call {
        queue: String,
        #[source]
        source: AwsError,
    },
    #[error("GetQueueUrl for {name:?} returned no URL")]
    NoUrl { name: String },
}

impl QueueError {
    fn call(queue: &str) -> impl FnOnce(AwsError) -> QueueError + '_ {
        move |source| QueueError::Call {
            queue: queue.to_owned(),
            source,
        }
    }

    /// The queue does not exist.
    pub fn is_missing_queue(&self) -> bool {
        matches!(self, QueueError::Call { source, .. } if source.is_missing_queue())
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
    shared_config_for(cfg.region.as_deref(), cfg.endpoint_url.is_some()).await
}

/// The region and credentials of every AWS client: `region` if given, else the standard chain;
/// with an `endpoint` (an emulator) instance metadata is never asked.
pub async fn shared_config_for(region_name: Option<&str>, endpoint: bool) -> aws_config::SdkConfig {
    let metadata = if endpoint {
        InstanceMetadata::Never
    } else {
        InstanceMetadata::Ask
    };
    let region = region(region_name, metadata).await;
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
) -> Result<String, QueueError> {
    if let Some(url) = &cfg.queue_url {
        return Ok(url.clone());
    }
    let name = cfg.queue_name.clone().unwrap_or_default();
    let request = client.get_queue_url().queue_name(&name);
    let out = request
        .send()
        .await
        .map_err(AwsError::from)
        .map_err(QueueError::call(&name))?;
    out.queue_url.ok_or(QueueError::NoUrl { name })
}

/// Reads some of a queue's attributes (which also proves it exists and these credentials reach it).
pub async fn queue_attributes(
    client: &aws_sdk_sqs::Client,
    url: &str,
    names: &[QueueAttributeName],
) -> Result<std::collections::HashMap<QueueAttributeName, String>, QueueError> {
    let request = client.get_queue_attributes().queue_url(url);
    let out = request
        .set_attribute_names(Some(names.to_vec()))
        .send()
        .await
        .map_err(AwsError::from)
        .map_err(QueueError::call(url))?;
    Ok(out.attributes.unwrap_or_default())
}

/// How many messages wait in a queue and how many are in flight, as SQS estimates them.
pub async fn queue_depth(
    client: &aws_sdk_sqs::Client,
    url: &str,
) -> Result<(String, String), QueueError> {
    let waiting = QueueAttributeName::ApproximateNumberOfMessages;
    let in_flight = QueueAttributeName::ApproximateNumberOfMessagesNotVisible;
    let attributes = queue_attributes(client, url, &[waiting.clone(), in_flight.clone()]).await?;
    let get = |name| attributes.get(&name).cloned().unwrap_or_else(|| "?".into());
    Ok((get(waiting), get(in_flight)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::error::ErrorMetadata;
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;

    fn service(code: &str) -> SdkError<SendMessageBatchError, ()> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("as the service says")
            .build();
        SdkError::service_error(SendMessageBatchError::generic(meta), ())
    }

    #[test]
    fn errors_that_retrying_cannot_fix_are_fatal() {
        for code in ["AWS.SimpleQueueService.NonExistentQueue", "AccessDenied"] {
            assert_eq!(classify(&service(code)), AwsErrorClass::Fatal, "{code}");
        }
        let construction: SdkError<SendMessageBatchError, ()> =
            SdkError::construction_failure("no region");
        assert_eq!(classify(&construction), AwsErrorClass::Fatal);
    }

    #[test]
    fn throttling_timeouts_and_unknown_codes_are_transient() {
        for code in ["ThrottlingException", "ServiceUnavailable", "SomethingNew"] {
            assert_eq!(classify(&service(code)), AwsErrorClass::Transient, "{code}");
        }
        let timeout: SdkError<SendMessageBatchError, ()> = SdkError::timeout_error("slow");
        assert_eq!(classify(&timeout), AwsErrorClass::Transient);
    }

    #[test]
    fn a_batch_refused_for_its_shape_is_recognised() {
        for code in [
            "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
            "BatchRequestTooLong",
            "TooManyEntriesInBatchRequest",
        ] {
            assert!(is_malformed_batch(&service(code)), "{code}");
        }
        assert!(!is_malformed_batch(&service("ThrottlingException")));
        let timeout: SdkError<SendMessageBatchError, ()> = SdkError::timeout_error("slow");
        assert!(!is_malformed_batch(&timeout));
    }

    #[test]
    fn an_aws_error_keeps_its_class_and_describes_itself_once() {
        let e = AwsError::from(service("AccessDenied"));
        assert!(e.is_fatal());
        assert_eq!(e.to_string(), "AccessDenied: as the service says");
        assert!(std::error::Error::source(&e).is_none());
        assert!(AwsError::from(service("BatchRequestTooLong")).is_malformed_batch());
        assert!(!AwsError::no_answer(Duration::from_secs(5)).is_fatal());
    }

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
