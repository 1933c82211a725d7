//! The configuration file: one TOML document deserialized into one typed tree.
//!
//! Unknown keys are rejected (a typo must not silently fall back to a default), every key but the
//! source's address and the database URL has a default documented on its field, and [`Config::load`]
//! validates the whole tree before anything starts, reporting every problem by its dotted key.
//! Environment variables override what differs between deployments and carry the secrets:
//! `SLUICE_SQS_QUEUE_URL`, `SLUICE_SQS_ENDPOINT_URL`, `SLUICE_DATABASE_URL`, `SLUICE_MASK_KEY`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::stage::mask::{KeyError, MaskKey, MaskMode};
use crate::stage::transform::{AppVersionMode, CreateDateMode};
use crate::table_name::TableName;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub sink: SinkConfig,
    #[serde(default)]
    pub mask: MaskConfig,
    #[serde(default)]
    pub transform: TransformConfig,
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where the file was read from: relative paths in it are taken from its directory.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// `SLUICE_MASK_KEY`, kept apart from the file's keys so it is never printed.
    #[serde(skip)]
    mask_key_from_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Sqs,
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Which source feeds the pipeline: `"sqs"` or `"file"`.
    pub kind: SourceKind,
    #[serde(default)]
    pub sqs: SqsConfig,
    #[serde(default)]
    pub file: FileConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqsConfig {
    /// Full queue URL. Either this or `queue_name` (env `SLUICE_SQS_QUEUE_URL` overrides).
    pub queue_url: Option<String>,
    /// Queue name, resolved to a URL with GetQueueUrl at start.
    pub queue_name: Option<String>,
    /// Custom endpoint, for emulators such as moto or LocalStack (env `SLUICE_SQS_ENDPOINT_URL`).
    pub endpoint_url: Option<String>,
    /// AWS region; default: the standard chain (`AWS_REGION`, profile), else `us-east-1`.
    pub region: Option<String>,
    /// Concurrent long-polling receivers. Default 4.
    pub pollers: usize,
    /// Long-poll wait, 0-20 s. Default 20.
    pub wait_time_seconds: i32,
    /// Messages per receive, 1-10. Default 10.
    pub max_messages: i32,
    /// Visibility timeout asked for on receive, and the extension granted while a message waits.
    /// Default 60.
    pub visibility_timeout_seconds: i32,
    /// Most messages received but not yet acknowledged; pollers wait beyond it. Default 5000.
    pub max_in_flight: usize,
    /// Message attribute holding a producer's idempotency key, which the dedupe ledger uses instead of
    /// the SQS message id when present; `""` turns this off. Default `"dedupe_id"`.
    pub dedupe_attribute: String,
}

impl Default for SqsConfig {
    fn default() -> Self {
        SqsConfig {
            queue_url: None,
            queue_name: None,
            endpoint_url: None,
            region: None,
            pollers: 4,
            wait_time_seconds: 20,
            max_messages: 10,
            visibility_timeout_seconds: 60,
            max_in_flight: 5000,
            dedupe_attribute: "dedupe_id".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// NDJSON or a JSON array, gzip when the name ends in `.gz`, `-` for standard input. Relative to
    /// the config file. Required when `source.kind = "file"`.
    pub path: Option<PathBuf>,
    /// Messages per chunk handed to the parse stage. Default 256.
    pub chunk_messages: usize,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            path: None,
            chunk_messages: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Messages each channel between stages may hold, counted in whole chunks of the source (an SQS
    /// chunk is one receive of up to 10 messages, a file chunk `source.file.chunk_messages`), at least
    /// two chunks. Bounded so that a slow sink stops the source instead of growing memory.
    /// Default 2048.
    pub channel_capacity: usize,
    /// How long a graceful shutdown may take to drain before uncommitted messages are released to the
    /// source and the daemon exits non-zero. Default 30.
    pub shutdown_timeout_seconds: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            channel_capacity: 2048,
            shutdown_timeout_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    #[serde(default)]
    pub postgres: PostgresConfig,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL, e.g. `postgres://user@host:5432/db`. Required; env `SLUICE_DATABASE_URL`
    /// overrides (and is where a password belongs).
    pub url: Option<String>,
    /// Target table, optionally schema-qualified. Default `user_logins`.
    pub table: String,
    /// Rows (and dead-letter records) per transaction. Default 1000.
    pub batch_rows: usize,
    /// Longest a partial batch waits for more messages before it is committed, in ms. Default 500.
    pub linger_ms: u64,
    /// Table of committed message keys used to skip redeliveries. Default `sluice_ledger`.
    pub ledger_table: String,
    /// How long ledger entries are kept: at least the source's retention (SQS: 14 days max).
    /// Default 336.
    pub ledger_retention_hours: u64,
    /// Record every message in the ledger and skip ones seen before. Default: on for sources that
    /// redeliver (SQS), off for files.
    pub dedupe: Option<bool>,
    /// Create missing tables at start (never alters existing ones). Default true.
    pub create_tables: bool,
    /// Connections committing batches side by side, so one batch's COMMIT overlaps the next one's
    /// COPY. Default 2.
    pub connections: usize,
    /// Seconds to wait for a connection. Default 10.
    pub connect_timeout_seconds: u64,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("table", &self.table)
            .field("batch_rows", &self.batch_rows)
            .field("linger_ms", &self.linger_ms)
            .finish_non_exhaustive()
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            table: "user_logins".into(),
            batch_rows: 1000,
            linger_ms: 500,
            ledger_table: "sluice_ledger".into(),
            ledger_retention_hours: 336,
            dedupe: None,
            create_tables: true,
            connections: 2,
            connect_timeout_seconds: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskConfig {
    /// `"hmac-sha256"` (default) or `"salted-sha256"` (compatibility).
    pub mode: MaskMode,
    /// File holding the key; relative to the config file. `SLUICE_MASK_KEY` overrides it.
    pub key_file: Option<PathBuf>,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            mode: MaskMode::HmacSha256,
            key_file: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformConfig {
    /// `"major"` (default) or `"packed"`.
    pub app_version: AppVersionMode,
    /// `"sent_time"` (default) or `"processing_time"`.
    pub create_date: CreateDateMode,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Table of rejected messages with their reason. Default `user_logins_rejected`.
    pub table: String,
    /// Also forward every reject to this SQS queue (body unchanged, reason as message attributes).
    pub sqs_queue_url: Option<String>,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            table: "user_logins_rejected".into(),
            sqs_queue_url: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `"human"` (default) or `"json"`.
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` wins. Default `"info"`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address for `/metrics`, `/healthz` and `/readyz`, e.g. `"127.0.0.1:9187"`. Default: off.
    pub listen: Option<String>,
    /// `/readyz` fails when messages are waiting and nothing has been committed or acknowledged for
    /// this long. Default 120.
    pub stall_after_seconds: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            stall_after_seconds: 120,
        }
    }
}

/// A configuration that cannot be used. Every problem is named by its dotted key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", .problems.len(), format_problems(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
    #[error("masking key: {0}")]
    MaskKey(#[from] KeyError),
}

/// One invalid key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - `{}`: {}", p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Values that the environment supplies over the file.
#[derive(Debug, Default, Clone)]
pub struct EnvOverrides {
    pub sqs_queue_url: Option<String>,
    pub sqs_endpoint_url: Option<String>,
    pub database_url: Option<String>,
    pub mask_key: Option<String>,
}

impl EnvOverrides {
    /// Reads the `SLUICE_*` variables; empty values count as unset.
    pub fn from_env() -> EnvOverrides {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        EnvOverrides {
            sqs_queue_url: var("SLUICE_SQS_QUEUE_URL"),
            sqs_endpoint_url: var("SLUICE_SQS_ENDPOINT_URL"),
            database_url: var("SLUICE_DATABASE_URL"),
            mask_key: var("SLUICE_MASK_KEY"),
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
        let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
        Config::from_toml(&text, path, &base_dir, env)
    }

    pub fn from_toml(
        text: &str,
        path: &Path,
        base_dir: &Path,
        env: EnvOverrides,
    ) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.base_dir = base_dir.to_owned();
        config.apply(env);
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    fn apply(&mut self, env: EnvOverrides) {
        if let Some(url) = env.sqs_queue_url {
            self.source.sqs.queue_url = Some(url);
            self.source.sqs.queue_name = None;
        }
        if let Some(url) = env.sqs_endpoint_url {
            self.source.sqs.endpoint_url = Some(url);
        }
        if let Some(url) = env.database_url {
            self.sink.postgres.url = Some(url);
        }
        self.mask_key_from_env = env.mask_key;
    }

    /// Every problem in the tree, in file order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut v = Validator::default();
        if self.source.kind == SourceKind::Sqs {
            self.source.sqs.validate(&mut v);
        }
        if self.source.kind == SourceKind::File && self.source.file.path.is_none() {
            v.problem("source.file.path", "required when `source.kind = \"file\"`");
        }
        v.range(
            "source.file.chunk_messages",
            self.source.file.chunk_messages,
            1,
            100_000,
        );
        v.range(
            "pipeline.channel_capacity",
            self.pipeline.channel_capacity,
            1,
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
        v.table("dead_letter.table", &self.dead_letter.table);
        if let Some(url) = &self.dead_letter.sqs_queue_url {
            v.url("dead_letter.sqs_queue_url", url);
        }
        if let Some(listen) = &self.metrics.listen
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            v.problem(
                "metrics.listen",
                format!("{listen:?} is not an address like \"127.0.0.1:9187\""),
            );
        }
        v.range(
            "metrics.stall_after_seconds",
            self.metrics.stall_after_seconds,
            1,
            86_400,
        );
        v.problems
    }

    /// The masking key (environment first, then `mask.key_file`).
    pub fn mask_key(&self) -> Result<MaskKey, ConfigError> {
        let file = self.mask.key_file.as_ref().map(|p| self.base_dir.join(p));
        Ok(MaskKey::load(
            self.mask_key_from_env.as_deref(),
            file.as_deref(),
        )?)
    }

    /// Whether the sink keeps the dedupe ledger.
    pub fn dedupe_enabled(&self) -> bool {
        self.sink
            .postgres
            .dedupe
            .unwrap_or(self.source.kind == SourceKind::Sqs)
    }

    /// The database URL; validation guarantees it is present.
    pub fn database_url(&self) -> &str {
        self.sink.postgres.url.as_deref().unwrap_or_default()
    }

    /// A table-name key, already validated.
    pub fn table(&self) -> TableName {
        TableName::parse(&self.sink.postgres.table)
            .unwrap_or_else(|_| TableName::unqualified("user_logins"))
    }

    pub fn dead_letter_table(&self) -> TableName {
        TableName::parse(&self.dead_letter.table)
            .unwrap_or_else(|_| TableName::unqualified("user_logins_rejected"))
    }

    pub fn ledger_table(&self) -> TableName {
        TableName::parse(&self.sink.postgres.ledger_table)
            .unwrap_or_else(|_| TableName::unqualified("sluice_ledger"))
    }
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

impl PostgresConfig {
    fn validate(&self, v: &mut Validator) {
        match &self.url {
            None => v.problem("sink.postgres.url", "required (or set SLUICE_DATABASE_URL)"),
            Some(url) => {
                if let Err(e) = url.parse::<tokio_postgres::Config>() {
                    v.problem("sink.postgres.url", format!("not a PostgreSQL URL: {e}"));
                }
            }
        }
        v.table("sink.postgres.table", &self.table);
        v.table("sink.postgres.ledger_table", &self.ledger_table);
        v.range("sink.postgres.batch_rows", self.batch_rows, 1, 1_000_000);
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

    fn table(&mut self, key: &str, name: &str) {
        if let Err(e) = TableName::parse(name) {
            self.problem(key, e);
        }
    }
}

/// A URL with its password replaced, for logs and reports.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
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
        Config::from_toml(
            text,
            Path::new("test.toml"),
            Path::new("."),
            EnvOverrides::default(),
        )
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
        assert_eq!(c.sink.postgres.table, "user_logins");
        assert_eq!(c.sink.postgres.batch_rows, 1000);
        assert_eq!(c.dead_letter.table, "user_logins_rejected");
        assert_eq!(c.mask.mode, MaskMode::HmacSha256);
        assert_eq!(c.transform.app_version, AppVersionMode::Major);
        assert!(c.dedupe_enabled());
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = parse(&format!("{MINIMAL}\n[pipeline]\nchanel_capacity = 3\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("chanel_capacity"), "{text}");
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
            table = "drop table; --"
            batch_rows = 0
        "#;
        assert_eq!(
            problems(text),
            [
                "source.sqs.queue_url",
                "source.sqs.wait_time_seconds",
                "source.sqs.max_messages",
                "sink.postgres.url",
                "sink.postgres.table",
                "sink.postgres.batch_rows",
            ]
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = EnvOverrides {
            sqs_queue_url: Some("http://localhost:4566/000000000000/q".into()),
            sqs_endpoint_url: Some("http://localhost:4566".into()),
            database_url: Some("postgres://other@db/x".into()),
            mask_key: Some("0123456789abcdef0123".into()),
        };
        let c =
            Config::from_toml(MINIMAL, Path::new("t.toml"), Path::new("."), env).expect("valid");
        assert_eq!(
            c.source.sqs.queue_url.as_deref(),
            Some("http://localhost:4566/000000000000/q")
        );
        assert_eq!(c.source.sqs.queue_name, None);
        assert_eq!(c.database_url(), "postgres://other@db/x");
        assert_eq!(
            c.mask_key().expect("key"),
            MaskKey::from_bytes(b"0123456789abcdef0123")
        );
    }

    #[test]
    fn missing_key_is_a_clear_error() {
        let c = parse(MINIMAL).expect("valid");
        let err = c.mask_key().unwrap_err().to_string();
        assert!(err.contains("SLUICE_MASK_KEY"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/d"),
            "postgres://u:***@h:5432/d"
        );
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
    }

    #[test]
    fn shipped_configs_are_valid() {
        for name in ["demo.toml", "example.toml", "file-backfill.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(name);
            let env = EnvOverrides {
                database_url: Some("postgres://x@localhost/y".into()),
                ..EnvOverrides::default()
            };
            if let Err(e) = Config::load_with(&path, env) {
                panic!("{name}: {e}");
            }
        }
    }
}
