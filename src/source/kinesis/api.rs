//! The part of the Kinesis Data Streams API that sluice uses, as a small trait.
//!
//! The shard reader and shard discovery talk to this trait, not to the SDK, for two reasons. Faults
//! that an emulator cannot produce on demand (throttling, expired iterators) must still be tested, so
//! a fake implements the trait in unit tests. And the SDK's many error variants collapse here into the
//! four that change what the caller does: back off (throttled), re-acquire the iterator (expired),
//! retry (transient) or stop (fatal).
//!
//! The SDK client is built with its own retries turned off: the reader paces every call it makes
//! against the per-shard limits, and a retry hidden inside the SDK would be a call it cannot count.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;

use super::position::StartPosition;
use super::sequence::SequenceNumber;
use crate::aws::{self, AwsErrorClass};

/// The stream, as configured: by name or by ARN (which also names the account and region).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRef {
    Name(String),
    Arn(String),
}

impl StreamRef {
    /// The stream's name: as given, or the last part of its ARN (`arn:…:stream/NAME`).
    pub fn name(&self) -> &str {
        match self {
            StreamRef::Name(name) => name,
            StreamRef::Arn(arn) => arn.rsplit('/').next().unwrap_or(arn),
        }
    }
}

/// A shard as `ListShards` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardDescription {
    pub shard_id: String,
    pub parent_shard_id: Option<String>,
    pub adjacent_parent_shard_id: Option<String>,
    /// The shard has an ending sequence number: it was closed by a split or a merge and takes no
    /// new records. Only presence counts; the value itself is not relied on.
    pub closed: bool,
}

impl ShardDescription {
    /// The parents that produced this shard: none for an original shard, one after a split, two
    /// after a merge.
    pub fn parents(&self) -> impl Iterator<Item = &str> {
        self.parent_shard_id
            .iter()
            .chain(self.adjacent_parent_shard_id.iter())
            .map(String::as_str)
    }
}

/// One page of `ListShards`.
#[derive(Debug, Clone, Default)]
pub struct ShardPage {
    pub shards: Vec<ShardDescription>,
    pub next_token: Option<String>,
}

/// A data record as `GetRecords` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedRecord {
    pub sequence_number: SequenceNumber,
    pub partition_key: String,
    pub data: Vec<u8>,
    /// `ApproximateArrivalTimestamp`, in milliseconds since the Unix epoch.
    pub arrival_ms: Option<i64>,
}

/// One `GetRecords` answer.
#[derive(Debug, Clone, Default)]
pub struct RecordsPage {
    pub records: Vec<FetchedRecord>,
    /// `None` when the shard is closed and read to its end: the documented sign of a shard's end.
    pub next_iterator: Option<String>,
    pub millis_behind_latest: Option<i64>,
}

/// What a failed call means for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KinesisError {
    /// `ProvisionedThroughputExceededException` and the like: back off with jitter.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The shard iterator is older than five minutes: get a new one.
    #[error("shard iterator expired: {0}")]
    ExpiredIterator(String),
    /// Timeouts, connection trouble, 5xx: retry.
    #[error("{0}")]
    Transient(String),
    /// Missing stream, access denied, invalid request: retrying cannot help.
    #[error("{0}")]
    Fatal(String),
}

/// The three calls sluice makes to read a stream.
#[async_trait]
pub trait KinesisApi: Send + Sync + 'static {
    /// One page of the stream's shards; `next_token` continues a listing (and then the stream is not
    /// named again, as the API requires).
    async fn list_shards(
        &self,
        stream: &StreamRef,
        next_token: Option<&str>,
    ) -> Result<ShardPage, KinesisError>;

    /// An iterator for reading `shard_id` from `start`.
    async fn shard_iterator(
        &self,
        stream: &StreamRef,
        shard_id: &str,
        start: &StartPosition,
    ) -> Result<String, KinesisError>;

    /// Up to `limit` records from `iterator`.
    async fn get_records(&self, iterator: &str, limit: i32) -> Result<RecordsPage, KinesisError>;
}

/// A Kinesis client for `region` (default: the environment's, else `us-east-1`) and, for emulators,
/// `endpoint_url`. Credentials come from the standard chain. SDK retries are off (see the module doc).
pub async fn sdk_client(
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> aws_sdk_kinesis::Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_kinesis::config::Builder::from(&shared)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        );
    if shared.region().is_none() {
        builder = builder.region(Region::new("us-east-1"));
    }
    if let Some(endpoint) = endpoint_url {
        builder = builder.endpoint_url(endpoint);
    }
    aws_sdk_kinesis::Client::from_conf(builder.build())
}

/// Error codes that mean "too fast": `GetRecords` throttling, KMS throttling behind an encrypted
/// stream, and `ListShards`' limit of 100 calls per second per stream.
const THROTTLING_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "KMSThrottlingException",
    "LimitExceededException",
];

/// Error codes that retrying cannot fix, beyond the ones every AWS service shares.
const FATAL_CODES: &[&str] = &[
    "InvalidArgumentException",
    "KMSAccessDeniedException",
    "KMSDisabledException",
    "KMSInvalidStateException",
    "KMSNotFoundException",
    "KMSOptInRequired",
];

fn classify<E, R>(err: SdkError<E, R>, what: &str) -> KinesisError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let text = format!("{what}: {}", aws::describe(&err));
    let code = match &err {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    };
    match code {
        Some("ExpiredIteratorException") => KinesisError::ExpiredIterator(text),
        Some(c) if THROTTLING_CODES.contains(&c) => KinesisError::Throttled(text),
        Some(c) if FATAL_CODES.contains(&c) => KinesisError::Fatal(text),
        _ => match aws::classify(&err) {
            AwsErrorClass::Fatal => KinesisError::Fatal(text),
            AwsErrorClass::Transient => KinesisError::Transient(text),
        },
    }
}

#[async_trait]
impl KinesisApi for aws_sdk_kinesis::Client {
    async fn list_shards(
        &self,
        stream: &StreamRef,
        next_token: Option<&str>,
    ) -> Result<ShardPage, KinesisError> {
        let mut request = self.list_shards();
        request = match (next_token, stream) {
            (Some(token), _) => request.next_token(token),
            (None, StreamRef::Name(name)) => request.stream_name(name),
            (None, StreamRef::Arn(arn)) => request.stream_arn(arn),
        };
        let out = request
            .send()
            .await
            .map_err(|e| classify(e, &format!("ListShards {}", stream.name())))?;
        let shards = out
            .shards
            .unwrap_or_default()
            .into_iter()
            .map(|shard| ShardDescription {
                closed: shard
                    .sequence_number_range
                    .as_ref()
                    .is_some_and(|range| range.ending_sequence_number.is_some()),
                shard_id: shard.shard_id,
                parent_shard_id: shard.parent_shard_id,
                adjacent_parent_shard_id: shard.adjacent_parent_shard_id,
            })
            .collect();
        Ok(ShardPage {
            shards,
            next_token: out.next_token,
        })
    }

    async fn shard_iterator(
        &self,
        stream: &StreamRef,
        shard_id: &str,
        start: &StartPosition,
    ) -> Result<String, KinesisError> {
        let mut request = self.get_shard_iterator().shard_id(shard_id);
        request = match stream {
            StreamRef::Name(name) => request.stream_name(name),
            StreamRef::Arn(arn) => request.stream_arn(arn),
        };
        request = match start {
            StartPosition::TrimHorizon => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            StartPosition::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            StartPosition::AtTimestamp { millis } => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(*millis)),
            StartPosition::AfterSequence(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence.as_str()),
        };
        let out = request
            .send()
            .await
            .map_err(|e| classify(e, &format!("GetShardIterator {}/{shard_id}", stream.name())))?;
        out.shard_iterator.ok_or_else(|| {
            KinesisError::Transient(format!(
                "GetShardIterator {}/{shard_id} returned no iterator",
                stream.name()
            ))
        })
    }

    async fn get_records(&self, iterator: &str, limit: i32) -> Result<RecordsPage, KinesisError> {
        let out = self
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|e| classify(e, "GetRecords"))?;
        let records = out
            .records
            .into_iter()
            .map(|record| {
                let sequence_number =
                    SequenceNumber::parse(&record.sequence_number).map_err(|e| {
                        KinesisError::Fatal(format!("GetRecords returned a record with {e}"))
                    })?;
                Ok(FetchedRecord {
                    sequence_number,
                    partition_key: record.partition_key.unwrap_or_default(),
                    data: record.data.into_inner(),
                    arrival_ms: record
                        .approximate_arrival_timestamp
                        .and_then(|t| t.to_millis().ok()),
                })
            })
            .collect::<Result<Vec<_>, KinesisError>>()?;
        Ok(RecordsPage {
            records,
            next_iterator: out.next_shard_iterator,
            millis_behind_latest: out.millis_behind_latest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_arn_names_its_stream() {
        let arn = StreamRef::Arn("arn:aws:kinesis:us-east-1:123456789012:stream/logins".into());
        assert_eq!(arn.name(), "logins");
        assert_eq!(StreamRef::Name("logins".into()).name(), "logins");
    }

    #[test]
    fn parents_are_the_split_parent_and_the_merged_neighbour() {
        let merged = ShardDescription {
            shard_id: "shardId-000000000004".into(),
            parent_shard_id: Some("shardId-000000000001".into()),
            adjacent_parent_shard_id: Some("shardId-000000000002".into()),
            closed: false,
        };
        assert_eq!(
            merged.parents().collect::<Vec<_>>(),
            ["shardId-000000000001", "shardId-000000000002"]
        );
    }
}
