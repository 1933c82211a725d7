//! The configuration file: one TOML document deserialized into one typed tree, resolved once.
//!
//! Unknown keys are rejected (a typo must not silently fall back to a default). Each key's default
//! lives beside its field, in the `default` function serde calls, and its doc comment says the same;
//! the README's table is checked against them by a test. Values arrive typed: table names are
//! parsed while deserializing, the metrics address is a socket address, and paths are made absolute
//! (relative to the file's directory) the moment the file is loaded, so the rest of the code never
//! sees raw config text. A file is read whole (`config::document`): every key that cannot be read is
//! reported, not only the first. [`Config::load`] then validates ranges and combinations across the
//! whole tree, reporting every problem by its dotted key and line in one list. Environment variables
//! override what differs between deployments and carry the secrets: `SLUICE_SQS_QUEUE_URL`,
//! `SLUICE_SQS_ENDPOINT_URL`, `SLUICE_KINESIS_STREAM`, `SLUICE_KINESIS_ENDPOINT_URL`,
//! `SLUICE_DATABASE_URL`, `SLUICE_DATABASE_CA_FILE`, `SLUICE_MASK_KEY`, `SLUICE_KMS_ENDPOINT_URL`;
//! a bad value from one of them is blamed on the variable, not on the file. The tree can be printed (`Debug`) without giving a
//! secret away: the database URL shows `***` for its password, and the masking key is held as a
//! [`SecretString`], which prints as `[REDACTED]`.

mod document;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::stage::mask::{KeyError, MaskKey, MaskMode};
use crate::stage::transform::{AppVersionMode, CreateDateMode};
use crate::table_name::{TableName, Tables};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    #[serde(default = "section_defaults")]
    pub pipeline: PipelineConfig,
    #[serde(default = "section_defaults")]
    pub sink: SinkConfig,
    #[serde(default = "section_defaults")]
    pub mask: MaskConfig,
    #[serde(default = "section_defaults")]
    pub transform: TransformConfig,
    #[serde(default = "section_defaults")]
    pub dead_letter: DeadLetterConfig,
    #[serde(default = "section_defaults")]
    pub log: LogConfig,
    #[serde(default = "section_defaults")]
    pub metrics: MetricsConfig,
    /// `SLUICE_MASK_KEY`, kept apart from the file's keys and held so that it never prints.
    #[serde(skip)]
    mask_key_from_env: Option<SecretString>,
}

/// A section's defaults: what an empty table deserializes to. Every field of a section has a
/// `default`, so its value is written once, beside the field.
fn section_defaults<T: DeserializeOwned>() -> T {
    toml::from_str("").unwrap_or_else(|e| unreachable!("a config field without a default: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Sqs,
    Kinesis,
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Which source feeds the pipeline: `"sqs"`, `"kinesis"` or `"file"`. Required.
    pub kind: SourceKind,
    #[serde(default = "section_defaults")]
    pub sqs: SqsConfig,
    #[serde(default = "section_defaults")]
    pub kinesis: KinesisConfig,
    #[serde(default = "section_defaults")]
    pub file: FileConfig,
    /// The longest message taken, in bytes (an SQS body, a file's line or array element, after
    /// gunzip): a longer one becomes a dead letter naming its size, keeping its first KiB, and is
    /// never held whole. 1024 to 67,108,864. Default 1,048,576 (SQS's own limit).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

const fn default_max_message_bytes() -> usize {
    crate::message_file::DEFAULT_MAX_MESSAGE_BYTES
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsConfig {
    /// Full queue URL. Either this or `queue_name` (env `SLUICE_SQS_QUEUE_URL` overrides).
    pub queue_url: Option<String>,
    /// Queue name, resolved to a URL with GetQueueUrl at start.
    pub queue_name: Option<String>,
    /// Custom endpoint, for emulators such as moto or LocalStack (env `SLUICE_SQS_ENDPOINT_URL`).
    /// Default: AWS.
    pub endpoint_url: Option<String>,
    /// AWS region. Default: the standard chain (`AWS_REGION`, profile), else `us-east-1`.
    pub region: Option<String>,
    /// Concurrent long-polling receivers. Default 4.
    #[serde(default = "default_pollers")]
    pub pollers: usize,
    /// Long-poll wait, 0-20 s. Default 20.
    #[serde(default = "default_wait_time_seconds")]
    pub wait_time_seconds: i32,
    /// Messages per receive, 1-10. Default 10.
    #[serde(default = "default_max_messages")]
    pub max_messages: i32,
    /// Visibility timeout asked for on receive, and the extension granted while a message waits.
    /// Default 60.
    #[serde(default = "default_visibility_timeout_seconds")]
    pub visibility_timeout_seconds: i32,
    /// Most messages received but not yet acknowledged (at most 100,000); pollers wait beyond it.
    /// Default 5000.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Message attribute holding a producer's idempotency key, which the dedupe ledger uses instead of
    /// the SQS message id when present; `""` turns this off. Default `"dedupe_id"`.
    #[serde(default = "default_dedupe_attribute")]
    pub dedupe_attribute: String,
    /// A message SQS has handed out more often than this (its `ApproximateReceiveCount`) becomes a
    /// dead letter saying so instead of being tried again: one that keeps failing mid-batch (a crash
    /// loop) must not keep failing for ever. 1-1000. Default 10.
    #[serde(default = "default_max_receives")]
    pub max_receives: u32,
    /// How often the queue's depth is read (GetQueueAttributes) for the progress line and the
    /// scaling metrics, 1-3600 s. Default 10.
    #[serde(default = "default_depth_sample_seconds")]
    pub depth_sample_seconds: u64,
}

const fn default_pollers() -> usize {
    4
}
const fn default_wait_time_seconds() -> i32 {
    20
}
const fn default_max_messages() -> i32 {
    10
}
const fn default_visibility_timeout_seconds() -> i32 {
    60
}
const fn default_max_in_flight() -> usize {
    5000
}
const fn default_max_receives() -> u32 {
    10
}
fn default_dedupe_attribute() -> String {
    "dedupe_id".into()
}
const fn default_depth_sample_seconds() -> u64 {
    10
}

/// Where a Kinesis shard that the application has never read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KinesisStartPosition {
    /// The oldest record the stream retains.
    #[default]
    TrimHorizon,
    /// Only records written after the shard's reader starts.
    Latest,
    /// Records that arrived at or after `at_timestamp`.
    AtTimestamp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisConfig {
    /// The stream's name. Either this or `stream_arn` (env `SLUICE_KINESIS_STREAM`, a name or an
    /// ARN, overrides both).
    pub stream_name: Option<String>,
    /// The stream's ARN.
    pub stream_arn: Option<String>,
    /// Custom endpoint, for emulators such as kinesis-mock or LocalStack (env
    /// `SLUICE_KINESIS_ENDPOINT_URL`). Default: AWS.
    pub endpoint_url: Option<String>,
    /// AWS region. Default: the standard chain (`AWS_REGION`, profile), else `us-east-1`.
    pub region: Option<String>,
    /// Where a shard without a checkpoint starts: `"trim_horizon"`, `"latest"` or
    /// `"at_timestamp"`. Default `"trim_horizon"`.
    #[serde(default)]
    pub start_position: KinesisStartPosition,
    /// RFC 3339 time for `start_position = "at_timestamp"`, e.g. `"2026-11-01T00:00:00Z"`.
    /// Default: none.
    pub at_timestamp: Option<String>,
    /// `Limit` of each GetRecords call, 1-10000. Default 10000.
    #[serde(default = "default_max_records_per_call")]
    pub max_records_per_call: i32,
    /// Pause between GetRecords calls of a shard once it is caught up, in ms (at least 200: five
    /// calls a second per shard is the service's limit). Default 1000.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How long a shard lease lasts after its last renewal; renewed every third of it. A dead
    /// process's shards move within this plus one renewal, and a commit left idle for a third of it
    /// while it holds lease rows (its process frozen) has its session ended. Default 30.
    #[serde(default = "default_lease_duration_seconds")]
    pub lease_duration_seconds: u64,
    /// Names the reading application: leases and checkpoints are kept per application and stream,
    /// so two applications read one stream independently. Default `"sluice"`.
    #[serde(default = "default_application")]
    pub application: String,
    /// Table of shard leases and checkpoints, optionally schema-qualified. Default
    /// `sluice_kinesis_leases`.
    #[serde(default = "default_lease_table")]
    pub lease_table: TableName,
}

const fn default_max_records_per_call() -> i32 {
    10_000
}
const fn default_poll_interval_ms() -> u64 {
    1000
}
const fn default_lease_duration_seconds() -> u64 {
    30
}
fn default_application() -> String {
    "sluice".into()
}
fn default_lease_table() -> TableName {
    TableName::unqualified("sluice_kinesis_leases")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// NDJSON or a JSON array, gzip when the name ends in `.gz`, `-` for standard input; relative to
    /// the config file (made absolute at load). Required when `source.kind = "file"`.
    pub path: Option<PathBuf>,
    /// Messages per chunk handed to the parse stage. Default 256.
    #[serde(default = "default_chunk_messages")]
    pub chunk_messages: usize,
}

const fn default_chunk_messages() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Messages each channel between stages may hold, counted in whole chunks of the source (an SQS
    /// chunk is one receive of up to 10 messages, a file chunk `source.file.chunk_messages`), at least
    /// two chunks. Bounded so that a slow sink stops the source instead of growing memory.
    /// Default 2048.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// How long a graceful shutdown may take to drain (3 or more) before uncommitted messages are
    /// released to the source and the daemon exits non-zero. Default 30.
    #[serde(default = "default_shutdown_timeout_seconds")]
    pub shutdown_timeout_seconds: u64,
}

const fn default_channel_capacity() -> usize {
    2048
}
const fn default_shutdown_timeout_seconds() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    #[serde(default = "section_defaults")]
    pub postgres: PostgresConfig,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, e.g. `postgres://user@host:5432/db`. Required; env `SLUICE_DATABASE_URL`
    /// overrides (and is where a password belongs).
    pub url: Option<String>,
    /// Target table, optionally schema-qualified. Default `user_logins`.
    #[serde(default = "default_table")]
    pub table: TableName,
    /// The most rows (and dead-letter records) per transaction. Batches grow towards it only while
    /// the database is busy with the previous one, so a large cap costs no latency. Default 10000.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// Message bodies one batch may hold, in bytes, whatever its row count (dead letters can be
    /// large). Default 8388608 (8 MiB).
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// Longest a batch's first message waits for a busy database before the batch stops growing,
    /// in ms. Default 500.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Table of committed messages' keys (SHA-256 of the source and the message's key), used to
    /// skip redeliveries. Default `sluice_ledger_v2`.
    #[serde(default = "default_ledger_table")]
    pub ledger_table: TableName,
    /// How long ledger entries are kept: at least the source's retention (SQS: 14 days max).
    /// Default 336.
    #[serde(default = "default_ledger_retention_hours")]
    pub ledger_retention_hours: u64,
    /// Record every message in the ledger and skip ones seen before. Default: on for sources that
    /// redeliver (SQS), off for files.
    pub dedupe: Option<bool>,
    /// Create missing tables at start (never alters existing ones). Default true.
    #[serde(default = "default_create_tables")]
    pub create_tables: bool,
    /// Connections committing batches side by side, so one batch's COMMIT overlaps the next one's
    /// COPY. Default 2.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Seconds to wait for a connection. Default 10.
    #[serde(default = "default_connect_timeout_seconds")]
    pub connect_timeout_seconds: u64,
    /// How long start-up (`run`, `migrate`) keeps retrying a database that does not answer yet (a
    /// container starting beside it), logging each attempt; 0 tries once. Default 30.
    #[serde(default = "default_connect_retry_seconds")]
    pub connect_retry_seconds: u64,
    /// PEM file of the CAs trusted to sign the server's certificate, for `sslmode=verify-ca`,
    /// `verify-full` (and `require`, which then checks the chain); relative to the config file
    /// (made absolute at load); env `SLUICE_DATABASE_CA_FILE` overrides. Default: none (the
    /// system's trusted CAs).
    pub ca_file: Option<PathBuf>,
}

fn default_table() -> TableName {
    TableName::unqualified("user_logins")
}
const fn default_batch_rows() -> usize {
    10_000
}
const fn default_batch_bytes() -> usize {
    8 * 1024 * 1024
}
const fn default_linger_ms() -> u64 {
    500
}
fn default_ledger_table() -> TableName {
    TableName::unqualified("sluice_ledger_v2")
}
const fn default_ledger_retention_hours() -> u64 {
    336
}
const fn default_create_tables() -> bool {
    true
}
const fn default_connections() -> usize {
    2
}
const fn default_connect_timeout_seconds() -> u64 {
    10
}
const fn default_connect_retry_seconds() -> u64 {
    30
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.url.as_deref().map(crate::pg::redact_url))
            .field("table", &self.table)
            .field("batch_rows", &self.batch_rows)
            .field("batch_bytes", &self.batch_bytes)
            .field("linger_ms", &self.linger_ms)
            .field("ledger_table", &self.ledger_table)
            .field("ledger_retention_hours", &self.ledger_retention_hours)
            .field("dedupe", &self.dedupe)
            .field("create_tables", &self.create_tables)
            .field("connections", &self.connections)
            .field("connect_timeout_seconds", &self.connect_timeout_seconds)
            .field("connect_retry_seconds", &self.connect_retry_seconds)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskConfig {
    /// `"hmac-sha256"`, `"salted-sha256"` (compatibility) or `"aes-siv"` (recoverable; the key is
    /// then a keyring). Default `"hmac-sha256"`.
    #[serde(default)]
    pub mode: MaskMode,
    /// File holding the key; relative to the config file (made absolute at load).
    /// `SLUICE_MASK_KEY` overrides it. Default: none.
    pub key_file: Option<PathBuf>,
    /// Where the key comes from: `"local"` (`SLUICE_MASK_KEY` or `key_file`) or `"kms"` (the
    /// data keys below, decrypted with AWS KMS at start). Default `"local"`.
    #[serde(default)]
    pub key_source: KeySource,
    /// With `key_source = "kms"`: data keys encrypted under a KMS key (GenerateDataKey's
    /// ciphertext, base64; `ID:CIPHERTEXT` for `aes-siv`), the last one current. Default: none.
    #[serde(default)]
    pub kms_data_keys: Vec<String>,
    /// With `key_source = "kms"`: the KMS key (id, ARN or alias) the data keys are encrypted
    /// under; KMS refuses to decrypt a data key of any other key. Required then. Default: none.
    pub kms_key_id: Option<String>,
    /// KMS endpoint, for emulators (env `SLUICE_KMS_ENDPOINT_URL`). Default: AWS.
    pub kms_endpoint_url: Option<String>,
}

/// Where the masking key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    /// `SLUICE_MASK_KEY`, else `mask.key_file`.
    #[default]
    Local,
    /// `mask.kms_data_keys`, decrypted by AWS KMS at start.
    Kms,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// `"major"` or `"packed"`. Default `"major"`.
    #[serde(default)]
    pub app_version: AppVersionMode,
    /// `"sent_time"` or `"processing_time"`. Default `"sent_time"`.
    #[serde(default)]
    pub create_date: CreateDateMode,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Table of rejected messages with their reason. Default `user_logins_rejected`.
    #[serde(default = "default_dead_letter_table")]
    pub table: TableName,
    /// Also forward every reject to this SQS queue (body unchanged, reason as message attributes).
    /// Default: none.
    pub sqs_queue_url: Option<String>,
}

fn default_dead_letter_table() -> TableName {
    TableName::unqualified("user_logins_rejected")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"human"` or `"json"`. Default `"human"`.
    #[serde(default)]
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` wins. Default `"info"`.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// Seconds between progress lines (rates per stage, queue depth, commits) while running; 0 turns
    /// them off. Default 10.
    #[serde(default = "default_progress_interval_seconds")]
    pub progress_interval_seconds: u64,
}

const fn default_progress_interval_seconds() -> u64 {
    10
}

fn default_log_level() -> String {
    "info".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `/readyz` fails when messages are waiting and nothing has been committed or acknowledged for
    /// this long. Default 120.
    #[serde(default = "default_stall_after_seconds")]
    pub stall_after_seconds: u64,
    /// Address for `/metrics`, `/healthz` and `/readyz`, e.g. `"127.0.0.1:9187"` (port 0: any free
    /// port, logged at start). Default: off.
    pub listen: Option<SocketAddr>,
}

const fn default_stall_after_seconds() -> u64 {
    120
}

/// A configuration that cannot be used. Every problem is named by its dotted key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML")]
    Syntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{} {} problem(s):\n{}", blamed(.path, .problems), .problems.len(), format_problems(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
    #[error("masking key")]
    MaskKey(#[from] KeyError),
}

/// One invalid key, where its value came from, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub origin: Origin,
    pub message: String,
}

/// Where a value that is wrong was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The file, on this line (none for a key the file lacks).
    File { line: Option<usize> },
    /// An environment variable that overrides the file.
    Env(&'static str),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { line: Some(line) } => {
                write!(f, "`{}` (line {line}): {}", self.key, self.message)
            }
            Origin::File { line: None } => write!(f, "`{}`: {}", self.key, self.message),
            Origin::Env(variable) => {
                write!(f, "`{}` (from {variable}): {}", self.key, self.message)
            }
        }
    }
}

/// Who the problems are blamed on: the file, the environment, or both.
fn blamed(path: &Path, problems: &[Problem]) -> String {
    let from_env = problems
        .iter()
        .filter(|p| matches!(p.origin, Origin::Env(_)))
        .count();
    if from_env == 0 {
        format!("config file {} has", path.display())
    } else if from_env == problems.len() {
        "the environment has".to_owned()
    } else {
        format!("config file {} and the environment have", path.display())
    }
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Values that the environment supplies over the file.
#[derive(Default, Clone)]
pub struct EnvOverrides {
    pub sqs_queue_url: Option<String>,
    pub sqs_endpoint_url: Option<String>,
    /// `SLUICE_KINESIS_STREAM`: a stream name, or an ARN (`arn:…`).
    pub kinesis_stream: Option<String>,
    pub kinesis_endpoint_url: Option<String>,
    pub database_url: Option<String>,
    pub database_ca_file: Option<PathBuf>,
    pub mask_key: Option<String>,
    pub kms_endpoint_url: Option<String>,
}

/// The secrets redacted: the URL's password, the whole key.
impl fmt::Debug for EnvOverrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvOverrides")
            .field("sqs_queue_url", &self.sqs_queue_url)
            .field("sqs_endpoint_url", &self.sqs_endpoint_url)
            .field("kinesis_stream", &self.kinesis_stream)
            .field("kinesis_endpoint_url", &self.kinesis_endpoint_url)
            .field(
                "database_url",
                &self.database_url.as_deref().map(crate::pg::redact_url),
            )
            .field("database_ca_file", &self.database_ca_file)
            .field("mask_key", &self.mask_key.as_ref().map(|_| "[REDACTED]"))
            .field("kms_endpoint_url", &self.kms_endpoint_url)
            .finish()
    }
}

impl EnvOverrides {
    /// Reads the `SLUICE_*` variables; empty values count as unset.
    pub fn from_env() -> EnvOverrides {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        EnvOverrides {
            sqs_queue_url: var("SLUICE_SQS_QUEUE_URL"),
            sqs_endpoint_url: var("SLUICE_SQS_ENDPOINT_URL"),
            kinesis_stream: var("SLUICE_KINESIS_STREAM"),
            kinesis_endpoint_url: var("SLUICE_KINESIS_ENDPOINT_URL"),
            database_url: var("SLUICE_DATABASE_URL"),
            database_ca_file: var("SLUICE_DATABASE_CA_FILE").map(PathBuf::from),
            mask_key: var("SLUICE_MASK_KEY"),
            kms_endpoint_url: var("SLUICE_KMS_ENDPOINT_URL"),
        }
    }
}

impl Config {
    /// Reads, overrides from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, EnvOverrides::from_env())
    }

    pub fn load_with(path: &Path, env: EnvOverrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path, env)
    }

    /// Deserializes `text`, read from `path` (relative paths in it are taken from `path`'s
    /// directory), applies `env` and validates.
    pub fn from_toml(text: &str, path: &Path, env: EnvOverrides) -> Result<Config, ConfigError> {
        let document = document::Document::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        let (config, unreadable) = document.deserialize::<Config>();
        let mut problems: Vec<Problem> = unreadable
            .into_iter()
            .map(|p| Problem {
                origin: Origin::File {
                    line: document.line_of(&p.key),
                },
                key: p.key,
                message: p.message,
            })
            .collect();
        if let Some(mut config) = config {
            let base_dir = std::path::absolute(path)
                .ok()
                .and_then(|p| p.parent().map(Path::to_owned))
                .unwrap_or_default();
            config.resolve_paths(&base_dir);
            let overridden = config.apply(env);
            // A key that could not be read was reported as such; its default is not to blame.
            let unread: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
            for mut problem in config.problems() {
                if unread.contains(&problem.key) {
                    continue;
                }
                problem.origin = match overridden.iter().find(|(key, _)| *key == problem.key) {
                    Some((_, variable)) => Origin::Env(variable),
                    None => Origin::File {
                        line: document.line_of(&problem.key),
                    },
                };
                problems.push(problem);
            }
            if problems.is_empty() {
                return Ok(config);
            }
        }
        // In file order; keys the file lacks, and the environment's, after the lines.
        problems.sort_by_key(|p| match p.origin {
            Origin::File { line: Some(line) } => (0, line),
            Origin::File { line: None } => (1, 0),
            Origin::Env(_) => (2, 0),
        });
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Makes every path in the file absolute, relative to the file's directory (`-` stays standard
    /// input).
    fn resolve_paths(&mut self, base_dir: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.as_os_str() != "-" && path.is_relative() {
                *path = base_dir.join(&*path);
            }
        };
        self.source.file.path.as_mut().map(resolve);
        self.mask.key_file.as_mut().map(resolve);
        self.sink.postgres.ca_file.as_mut().map(resolve);
    }

    /// Applies the overrides; returns the keys they set, each with its variable, so that a bad
    /// value is blamed on the variable.
    fn apply(&mut self, env: EnvOverrides) -> Vec<(&'static str, &'static str)> {
        let mut overridden = Vec::new();
        if let Some(url) = env.sqs_queue_url {
            self.source.sqs.queue_url = Some(url);
            self.source.sqs.queue_name = None;
            overridden.push(("source.sqs.queue_url", "SLUICE_SQS_QUEUE_URL"));
        }
        if let Some(url) = env.sqs_endpoint_url {
            self.source.sqs.endpoint_url = Some(url);
            overridden.push(("source.sqs.endpoint_url", "SLUICE_SQS_ENDPOINT_URL"));
        }
        if let Some(stream) = env.kinesis_stream {
            let kinesis = &mut self.source.kinesis;
            if stream.starts_with("arn:") {
                (kinesis.stream_arn, kinesis.stream_name) = (Some(stream), None);
                overridden.push(("source.kinesis.stream_arn", "SLUICE_KINESIS_STREAM"));
            } else {
                (kinesis.stream_name, kinesis.stream_arn) = (Some(stream), None);
                overridden.push(("source.kinesis.stream_name", "SLUICE_KINESIS_STREAM"));
            }
        }
        if let Some(url) = env.kinesis_endpoint_url {
            self.source.kinesis.endpoint_url = Some(url);
            overridden.push(("source.kinesis.endpoint_url", "SLUICE_KINESIS_ENDPOINT_URL"));
        }
        if let Some(url) = env.database_url {
            self.sink.postgres.url = Some(url);
            overridden.push(("sink.postgres.url", "SLUICE_DATABASE_URL"));
        }
        if let Some(path) = env.database_ca_file {
            self.sink.postgres.ca_file = Some(path);
            overridden.push(("sink.postgres.ca_file", "SLUICE_DATABASE_CA_FILE"));
        }
        self.mask_key_from_env = env.mask_key.map(SecretString::from);
        if let Some(url) = env.kms_endpoint_url {
            self.mask.kms_endpoint_url = Some(url);
            overridden.push(("mask.kms_endpoint_url", "SLUICE_KMS_ENDPOINT_URL"));
        }
        overridden
    }

    /// Every problem in the tree, in file order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut v = Validator::default();
        v.range(
            "source.max_message_bytes",
            self.source.max_message_bytes,
            1024,
            64 * 1024 * 1024,
        );
        if self.source.kind == SourceKind::Sqs {
            self.source.sqs.validate(&mut v);
        }
        if self.source.kind == SourceKind::Kinesis {
            self.source.kinesis.validate(&mut v);
            if self.sink.postgres.dedupe == Some(true) {
                v.problem(
                    "sink.postgres.dedupe",
                    "not used with Kinesis: checkpoints committed with the rows make it exactly once",
                );
            }
        }
        self.validate_file(&mut v);
        // Two chunks, so a stage can hand one on while the next is being filled.
        v.range(
            "pipeline.channel_capacity",
            self.pipeline.channel_capacity,
            2,
            1_000_000,
        );
        // A drain needs time for a receive in progress to return (up to a second) and a batch to
        // commit.
        v.range(
            "pipeline.shutdown_timeout_seconds",
            self.pipeline.shutdown_timeout_seconds,
            3,
            3_600,
        );
        self.sink.postgres.validate(&mut v);
        if let Some(url) = &self.dead_letter.sqs_queue_url {
            v.url("dead_letter.sqs_queue_url", url);
        }
        if self.mask.key_source == KeySource::Kms && self.mask.kms_data_keys.is_empty() {
            v.problem(
                "mask.kms_data_keys",
                "required when `mask.key_source = \"kms\"` (sluice keygen --kms-key-id makes one)",
            );
        }
        if self.mask.key_source == KeySource::Kms && self.mask.kms_key_id.is_none() {
            v.problem(
                "mask.kms_key_id",
                "required when `mask.key_source = \"kms\"`: the KMS key the data keys are encrypted under",
            );
        }
        if let Some(url) = &self.mask.kms_endpoint_url {
            v.url("mask.kms_endpoint_url", url);
        }
        if let Err(message) = check_log_filter(&self.log.level) {
            v.problem("log.level", message);
        }
        v.range(
            "log.progress_interval_seconds",
            self.log.progress_interval_seconds,
            0,
            86_400,
        );
        v.range(
            "metrics.stall_after_seconds",
            self.metrics.stall_after_seconds,
            1,
            86_400,
        );
        v.problems
    }

    fn validate_file(&self, v: &mut Validator) {
        let file = &self.source.file;
        v.range(
            "source.file.chunk_messages",
            file.chunk_messages,
            1,
            100_000,
        );
        if self.source.kind != SourceKind::File {
            return;
        }
        if file.path.is_none() {
            v.problem("source.file.path", "required when `source.kind = \"file\"`");
        }
    }

    /// The masking key (environment first, then `mask.key_file`).
    pub fn mask_key(&self) -> Result<MaskKey, ConfigError> {
        Ok(MaskKey::load(
            self.mask_key_from_env
                .as_ref()
                .map(|key| key.expose_secret()),
            self.mask.key_file.as_deref(),
        )?)
    }

    /// Whether the sink keeps the dedupe ledger.
    pub fn dedupe_enabled(&self) -> bool {
        self.sink
            .postgres
            .dedupe
            .unwrap_or(self.source.kind == SourceKind::Sqs)
    }

    /// The three tables this deployment writes.
    pub fn tables(&self) -> Tables {
        Tables {
            target: self.sink.postgres.table.clone(),
            dead_letter: self.dead_letter.table.clone(),
            ledger: self.sink.postgres.ledger_table.clone(),
        }
    }
}

/// A log filter must name a level in each of its directives: a bare word such as `loud` is, in
/// `RUST_LOG` syntax, a target to log at every level, and every other target (sluice's own warnings
/// and errors included) is then silenced.
fn check_log_filter(filter: &str) -> Result<(), String> {
    use tracing::level_filters::LevelFilter;
    const LEVELS: &str = "trace, debug, info, warn, error or off";
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(format!("must name a level ({LEVELS})"));
    }
    for directive in directives {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if level.parse::<LevelFilter>().is_err() {
            return Err(format!(
                "`{directive}` is neither a level ({LEVELS}) nor `target=level`"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("not a `RUST_LOG` filter: {e}"))
}

/// The most SQS messages held at once: with bodies of up to 1 MiB, more could exhaust memory long
/// before it helped throughput.
pub const MAX_IN_FLIGHT: usize = 100_000;

impl SqsConfig {
    fn validate(&self, v: &mut Validator) {
        match (&self.queue_url, &self.queue_name) {
            (None, None) => v.problem(
                "source.sqs.queue_url",
                "one of `queue_url` or `queue_name` is required (or set SLUICE_SQS_QUEUE_URL)",
            ),
            (Some(_), Some(_)) => v.problem(
                "source.sqs.queue_name",
                "give either `queue_url` or `queue_name`, not both",
            ),
            (Some(url), None) => v.url("source.sqs.queue_url", url),
            (None, Some(name)) if name.is_empty() || name.len() > 80 => {
                v.problem("source.sqs.queue_name", "must be 1 to 80 characters")
            }
            (None, Some(_)) => {}
        }
        if let Some(url) = &self.endpoint_url {
            v.url("source.sqs.endpoint_url", url);
        }
        v.range("source.sqs.pollers", self.pollers, 1, 256);
        v.range(
            "source.sqs.wait_time_seconds",
            self.wait_time_seconds,
            0,
            20,
        );
        v.range("source.sqs.max_messages", self.max_messages, 1, 10);
        v.range("source.sqs.max_receives", self.max_receives, 1, 1000);
        v.range(
            "source.sqs.depth_sample_seconds",
            self.depth_sample_seconds,
            1,
            3_600,
        );
        v.range(
            "source.sqs.visibility_timeout_seconds",
            self.visibility_timeout_seconds,
            2,
            43_200,
        );
        if self.max_in_flight < self.max_messages.max(1) as usize {
            v.problem(
                "source.sqs.max_in_flight",
                format!("must be at least `max_messages` ({})", self.max_messages),
            );
        } else {
            v.range(
                "source.sqs.max_in_flight",
                self.max_in_flight,
                1,
                MAX_IN_FLIGHT,
            );
        }
    }
}

impl KinesisConfig {
    fn validate(&self, v: &mut Validator) {
        match (&self.stream_name, &self.stream_arn) {
            (None, None) => v.problem(
                "source.kinesis.stream_name",
                "one of `stream_name` or `stream_arn` is required (or set SLUICE_KINESIS_STREAM)",
            ),
            (Some(_), Some(_)) => v.problem(
                "source.kinesis.stream_arn",
                "give either `stream_name` or `stream_arn`, not both",
            ),
            (Some(name), None) if !valid_stream_name(name) => v.problem(
                "source.kinesis.stream_name",
                "must be 1 to 128 characters of a-z, A-Z, 0-9, `_`, `-` and `.`",
            ),
            (None, Some(arn)) if !arn.starts_with("arn:") || !arn.contains(":stream/") => v
                .problem(
                    "source.kinesis.stream_arn",
                    format!(
                        "{arn:?} is not a stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)"
                    ),
                ),
            _ => {}
        }
        if let Some(url) = &self.endpoint_url {
            v.url("source.kinesis.endpoint_url", url);
        }
        match (self.start_position, &self.at_timestamp) {
            (KinesisStartPosition::AtTimestamp, None) => v.problem(
                "source.kinesis.at_timestamp",
                "required when `start_position = \"at_timestamp\"`",
            ),
            (KinesisStartPosition::AtTimestamp, Some(_)) => {}
            (_, Some(_)) => v.problem(
                "source.kinesis.at_timestamp",
                "only used with `start_position = \"at_timestamp\"`",
            ),
            (_, None) => {}
        }
        if let Some(at) = &self.at_timestamp
            && let Err(e) = chrono::DateTime::parse_from_rfc3339(at)
        {
            v.problem(
                "source.kinesis.at_timestamp",
                format!("{at:?} is not an RFC 3339 time such as 2026-11-01T00:00:00Z: {e}"),
            );
        }
        v.range(
            "source.kinesis.max_records_per_call",
            self.max_records_per_call,
            1,
            10_000,
        );
        v.range(
            "source.kinesis.poll_interval_ms",
            self.poll_interval_ms,
            200,
            3_600_000,
        );
        v.range(
            "source.kinesis.lease_duration_seconds",
            self.lease_duration_seconds,
            1,
            3_600,
        );
        if self.application.is_empty() || self.application.len() > 128 {
            v.problem("source.kinesis.application", "must be 1 to 128 characters");
        }
    }

    /// `at_timestamp` in milliseconds since the Unix epoch (validation guarantees it parses).
    pub fn at_timestamp_millis(&self) -> Option<i64> {
        let at = self.at_timestamp.as_deref()?;
        chrono::DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| t.timestamp_millis())
    }
}

fn valid_stream_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl PostgresConfig {
    fn validate(&self, v: &mut Validator) {
        match &self.url {
            None => v.problem("sink.postgres.url", "required (or set SLUICE_DATABASE_URL)"),
            Some(url) => {
                if let Err(e) = crate::pg::ConnString::parse(url) {
                    let why = crate::error_chain::Chain(&e);
                    v.problem("sink.postgres.url", format!("not a PostgreSQL URL: {why}"));
                }
            }
        }
        if let Some(path) = &self.ca_file
            && let Err(e) = crate::pg::tls::load_ca_file(path)
        {
            v.problem(
                "sink.postgres.ca_file",
                crate::error_chain::Chain(&e).to_string(),
            );
        }
        v.range("sink.postgres.batch_rows", self.batch_rows, 1, 1_000_000);
        v.range("sink.postgres.batch_bytes", self.batch_bytes, 1024, 1 << 30);
        v.range("sink.postgres.connections", self.connections, 1, 64);
        v.range("sink.postgres.linger_ms", self.linger_ms, 0, 3_600_000);
        v.range(
            "sink.postgres.ledger_retention_hours",
            self.ledger_retention_hours,
            1,
            24 * 366,
        );
        v.range(
            "sink.postgres.connect_timeout_seconds",
            self.connect_timeout_seconds,
            1,
            600,
        );
        v.range(
            "sink.postgres.connect_retry_seconds",
            self.connect_retry_seconds,
            0,
            3_600,
        );
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_owned(),
            origin: Origin::File { line: None },
            message: message.into(),
        });
    }

    fn range<T: PartialOrd + fmt::Display + Copy>(&mut self, key: &str, value: T, min: T, max: T) {
        if value < min || value > max {
            self.problem(key, format!("must be between {min} and {max}, got {value}"));
        }
    }

    fn url(&mut self, key: &str, url: &str) {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            self.problem(key, format!("{url:?} is not an http(s) URL"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [source]
        kind = "sqs"
        [source.sqs]
        queue_name = "login-queue"
        [sink.postgres]
        url = "postgres://postgres@127.0.0.1:5432/postgres"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), EnvOverrides::default())
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.source.sqs.pollers, 4);
        assert_eq!(c.source.sqs.wait_time_seconds, 20);
        assert_eq!(c.source.sqs.max_messages, 10);
        assert_eq!(c.pipeline.channel_capacity, 2048);
        assert_eq!(c.sink.postgres.connections, 2);
        assert_eq!(c.sink.postgres.batch_rows, 10_000);
        assert_eq!(
            c.tables(),
            Tables {
                target: TableName::unqualified("user_logins"),
                dead_letter: TableName::unqualified("user_logins_rejected"),
                ledger: TableName::unqualified("sluice_ledger_v2"),
            }
        );
        assert_eq!(c.mask.mode, MaskMode::HmacSha256);
        assert_eq!(c.transform.app_version, AppVersionMode::Major);
        assert!(c.dedupe_enabled());
    }

    /// Every default the README's configuration table states as a value is the one the code
    /// applies: setting the key to it changes nothing.
    #[test]
    fn the_readme_states_the_defaults_the_code_applies() {
        let base = "source.kind = \"sqs\"\nsource.sqs.queue_name = \"q\"\nsink.postgres.url = \"postgres://x@y/z\"\n";
        let defaults = format!("{:?}", parse(base).expect("valid"));
        let mut checked = 0;
        for line in include_str!("../README.md").lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let [_, key, default, ..] = cells.as_slice() else {
                continue;
            };
            let (Some(key), value) = (
                key.strip_prefix('`').and_then(|k| k.strip_suffix('`')),
                default.trim_matches('`'),
            ) else {
                continue;
            };
            let text = format!("{key} = {value}\n{base}");
            if toml::from_str::<toml::Table>(&text).is_err() {
                continue; // "required", "none", "AWS chain, …": not a value
            }
            let explicit = parse(&text).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
            assert_eq!(
                format!("{explicit:?}"),
                defaults,
                "README default of `{key}`"
            );
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} defaults found in the README");
    }

    /// `config/example.toml` lists every key with its default.
    #[test]
    fn the_example_file_holds_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let env = || EnvOverrides {
            database_url: Some("postgres://x@localhost/y".into()),
            ..EnvOverrides::default()
        };
        let example = Config::load_with(&path, env()).expect("valid");
        let url = example.source.sqs.queue_url.clone().expect("a queue url");
        let text = format!("[source]\nkind = \"sqs\"\n[source.sqs]\nqueue_url = \"{url}\"\n");
        let defaults = Config::from_toml(&text, &path, env()).expect("valid");
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = parse(&format!("{MINIMAL}\n[pipeline]\nchanel_capacity = 3\n")).unwrap_err();
        let text = crate::error_chain::Chain(&err).to_string();
        assert!(text.contains("chanel_capacity"), "{text}");
    }

    #[test]
    fn a_bad_table_name_is_refused_naming_its_key() {
        let err = parse(&format!("{MINIMAL}table = \"drop table; --\"\n")).unwrap_err();
        let text = crate::error_chain::Chain(&err).to_string();
        assert!(text.contains("`sink.postgres.table`"), "{text}");
        assert!(text.contains("is not a table name"), "{text}");
    }

    #[test]
    fn bad_values_name_their_keys() {
        let text = r#"
            [source]
            kind = "sqs"
            [source.sqs]
            max_messages = 11
            wait_time_seconds = 30
            [sink.postgres]
            batch_rows = 0
        "#;
        assert_eq!(
            problems(text),
            [
                "source.sqs.max_messages",
                "source.sqs.wait_time_seconds",
                "sink.postgres.batch_rows",
                "source.sqs.queue_url",
                "sink.postgres.url",
            ]
        );
    }

    #[test]
    fn keys_from_kms_need_the_key_and_the_data_keys() {
        assert_eq!(
            problems(&format!("{MINIMAL}[mask]\nkey_source = \"kms\"\n")),
            ["mask.kms_data_keys", "mask.kms_key_id"]
        );
        let text = format!(
            "{MINIMAL}[mask]\nkey_source = \"kms\"\nkms_key_id = \"alias/k\"\nkms_data_keys = [\"AQID\"]\n"
        );
        assert_eq!(parse(&text).expect("valid").mask.key_source, KeySource::Kms);
    }

    #[test]
    fn a_log_filter_names_a_level_in_every_directive() {
        for good in [
            "info",
            "warn",
            "sluice=debug,info",
            "OFF",
            "tokio_postgres=warn, info",
        ] {
            assert_eq!(check_log_filter(good), Ok(()), "{good}");
        }
        for bad in ["loud", "", " , ", "sluice=loud", "info,sluice"] {
            assert!(check_log_filter(bad).is_err(), "{bad:?} accepted");
        }
        let text = format!("{MINIMAL}\n[log]\nlevel = \"loud\"\n");
        assert_eq!(problems(&text), ["log.level"]);
    }

    #[test]
    fn channels_hold_at_least_two_chunks() {
        let text = format!("{MINIMAL}\n[pipeline]\nchannel_capacity = 1\n");
        assert_eq!(problems(&text), ["pipeline.channel_capacity"]);
        let text = format!("{MINIMAL}\n[pipeline]\nchannel_capacity = 2\n");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn a_bad_override_is_blamed_on_its_variable() {
        let env = EnvOverrides {
            database_url: Some("mysql://nope".into()),
            ..EnvOverrides::default()
        };
        let text = format!("{MINIMAL}\n[source.file]\nchunk_messages = 0\n");
        let err = Config::from_toml(&text, Path::new("t.toml"), env).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err:?}");
        };
        let origins: Vec<(&str, &Origin)> = problems
            .iter()
            .map(|p| (p.key.as_str(), &p.origin))
            .collect();
        assert_eq!(
            origins,
            [
                (
                    "source.file.chunk_messages",
                    &Origin::File { line: Some(10) }
                ),
                ("sink.postgres.url", &Origin::Env("SLUICE_DATABASE_URL")),
            ]
        );
        let text = err.to_string();
        assert!(
            text.starts_with("config file t.toml and the environment have 2 problem(s)"),
            "{text}"
        );
    }

    #[test]
    fn paths_are_made_absolute_at_load() {
        let text = "[source]\nkind = \"file\"\n[source.file]\npath = \"data/x.ndjson\"\n\
                    [sink.postgres]\nurl = \"postgres://x@y/z\"\n[mask]\nkey_file = \"/etc/k\"\n";
        let c = Config::from_toml(
            text,
            Path::new("/srv/sluice/c.toml"),
            EnvOverrides::default(),
        )
        .expect("valid");
        assert_eq!(
            c.source.file.path.as_deref(),
            Some(Path::new("/srv/sluice/data/x.ndjson"))
        );
        assert_eq!(c.mask.key_file.as_deref(), Some(Path::new("/etc/k")));
        let stdin = text.replace("data/x.ndjson", "-");
        let c =
            Config::from_toml(&stdin, Path::new("c.toml"), EnvOverrides::default()).expect("valid");
        assert_eq!(c.source.file.path.as_deref(), Some(Path::new("-")));
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = EnvOverrides {
            sqs_queue_url: Some("http://localhost:4566/000000000000/q".into()),
            sqs_endpoint_url: Some("http://localhost:4566".into()),
            database_url: Some("postgres://other@db/x".into()),
            database_ca_file: None,
            mask_key: Some("0123456789abcdef0123".into()),
            kms_endpoint_url: Some("http://localhost:4566".into()),
            ..EnvOverrides::default()
        };
        let c = Config::from_toml(MINIMAL, Path::new("t.toml"), env).expect("valid");
        assert_eq!(
            c.mask.kms_endpoint_url.as_deref(),
            Some("http://localhost:4566")
        );
        assert_eq!(
            c.source.sqs.queue_url.as_deref(),
            Some("http://localhost:4566/000000000000/q")
        );
        assert_eq!(c.source.sqs.queue_name, None);
        assert_eq!(
            c.sink.postgres.url.as_deref(),
            Some("postgres://other@db/x")
        );
        assert_eq!(
            c.mask_key().expect("key"),
            MaskKey::from_bytes(b"0123456789abcdef0123")
        );
    }

    /// Printing the tree, or the environment it was built from, shows no secret: not the key, not
    /// the database password in any spelling.
    #[test]
    fn secrets_never_print() {
        for url in [
            "postgres://u:pw-in-userinfo@db/x",
            "postgres://u@db/x?password=pw-in-query",
            "host=db user=u password=pw-key-value dbname=x",
        ] {
            let env = EnvOverrides {
                database_url: Some(url.into()),
                mask_key: Some("the-mask-key-0123456789".into()),
                ..EnvOverrides::default()
            };
            let env_text = format!("{env:?}");
            let c = Config::from_toml(MINIMAL, Path::new("t.toml"), env).expect("valid");
            for text in [format!("{c:?}"), env_text] {
                assert!(!text.contains("the-mask-key"), "{text}");
                assert!(!text.contains("pw-"), "{text}");
            }
        }
    }

    const KINESIS: &str = r#"
        [source]
        kind = "kinesis"
        [source.kinesis]
        stream_name = "logins"
        [sink.postgres]
        url = "postgres://postgres@127.0.0.1:5432/postgres"
    "#;

    #[test]
    fn a_kinesis_source_gets_documented_defaults() {
        let c = parse(KINESIS).expect("valid");
        let k = &c.source.kinesis;
        assert_eq!(k.start_position, KinesisStartPosition::TrimHorizon);
        assert_eq!(k.max_records_per_call, 10_000);
        assert_eq!(k.poll_interval_ms, 1000);
        assert_eq!(k.lease_duration_seconds, 30);
        assert_eq!(k.application, "sluice");
        assert_eq!(
            k.lease_table,
            TableName::unqualified("sluice_kinesis_leases")
        );
        assert!(!c.dedupe_enabled(), "checkpoints, not the ledger");
    }

    #[test]
    fn bad_kinesis_values_name_their_keys() {
        let text = r#"
            [source]
            kind = "kinesis"
            [source.kinesis]
            stream_name = "logins"
            stream_arn = "arn:aws:kinesis:us-east-1:123456789012:stream/logins"
            endpoint_url = "localhost:4567"
            start_position = "at_timestamp"
            max_records_per_call = 10001
            poll_interval_ms = 100
            lease_duration_seconds = 0
            application = ""
            [sink.postgres]
            url = "postgres://x@y/z"
            dedupe = true
        "#;
        assert_eq!(
            problems(text),
            // In file order; a missing key (at_timestamp) has no line and comes last.
            [
                "source.kinesis.stream_arn",
                "source.kinesis.endpoint_url",
                "source.kinesis.max_records_per_call",
                "source.kinesis.poll_interval_ms",
                "source.kinesis.lease_duration_seconds",
                "source.kinesis.application",
                "sink.postgres.dedupe",
                "source.kinesis.at_timestamp",
            ]
        );
        let missing = KINESIS.replace("stream_name = \"logins\"", "");
        assert_eq!(problems(&missing), ["source.kinesis.stream_name"]);
        let bad_time = KINESIS.replace(
            "stream_name = \"logins\"",
            "stream_name = \"logins\"\nstart_position = \"at_timestamp\"\nat_timestamp = \"yesterday\"",
        );
        assert_eq!(problems(&bad_time), ["source.kinesis.at_timestamp"]);
        let start = KINESIS.replace(
            "stream_name = \"logins\"",
            "stream_name = \"logins\"\nstart_position = \"at_timestamp\"\nat_timestamp = \"2026-11-01T00:00:00Z\"",
        );
        let c = parse(&start).expect("valid");
        assert_eq!(
            c.source.kinesis.at_timestamp_millis(),
            Some(1_793_491_200_000)
        );
    }

    #[test]
    fn the_environment_names_the_kinesis_stream_and_endpoint() {
        let arn = "arn:aws:kinesis:us-east-1:123456789012:stream/other";
        let env = |stream: &str| EnvOverrides {
            kinesis_stream: Some(stream.into()),
            kinesis_endpoint_url: Some("http://127.0.0.1:4567".into()),
            ..EnvOverrides::default()
        };
        let c = Config::from_toml(KINESIS, Path::new("t.toml"), env(arn)).expect("valid");
        let k = &c.source.kinesis;
        assert_eq!(
            (k.stream_name.as_deref(), k.stream_arn.as_deref()),
            (None, Some(arn))
        );
        assert_eq!(k.endpoint_url.as_deref(), Some("http://127.0.0.1:4567"));
        let c = Config::from_toml(KINESIS, Path::new("t.toml"), env("b")).expect("valid");
        assert_eq!(c.source.kinesis.stream_name.as_deref(), Some("b"));
    }

    #[test]
    fn missing_key_is_a_clear_error() {
        let c = parse(MINIMAL).expect("valid");
        let err = c.mask_key().unwrap_err();
        let text = crate::error_chain::Chain(&err).to_string();
        assert!(text.contains("SLUICE_MASK_KEY"), "{text}");
        assert_eq!(text.matches("no masking key").count(), 1, "{text}");
    }

    #[test]
    fn shipped_configs_are_valid() {
        for name in [
            "demo.toml",
            "demo-kinesis.toml",
            "example.toml",
            "file-backfill.toml",
            "container.toml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(name);
            let env = EnvOverrides {
                database_url: Some("postgres://x@localhost/y".into()),
                ..EnvOverrides::default()
            };
            if let Err(e) = Config::load_with(&path, env) {
                panic!("{name}: {}", crate::error_chain::Chain(&e));
            }
        }
    }
}
