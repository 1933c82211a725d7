//! Shared fixtures for the integration tests: a private schema in the real PostgreSQL, a private
//! queue in the SQS emulator, config files, and the `sluice` binary run as a child process.
//!
//! The services are found the way `make test` provides them (`SLUICE_TEST_DATABASE_URL`,
//! `SLUICE_TEST_AWS_ENDPOINT`, defaulting to the local stack's addresses). A test that cannot reach
//! them fails, naming what it tried: it never skips.

#![allow(dead_code)]

pub mod cluster;
pub mod fault_proxy;
pub mod feed;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use tokio_postgres::{Client, NoTls};

pub const MASK_KEY: &str = "integration-test-mask-key-0123456789";

pub fn database_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn aws_endpoint() -> String {
    std::env::var("SLUICE_TEST_AWS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// A short random suffix for names, so parallel tests never share a queue or a schema.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}{:012x}", n & 0xffff_ffff_ffff)
}

pub async fn pg() -> Client {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} does not answer ({e}); run `make up`"));
    tokio::spawn(connection);
    client
}

/// A schema of its own, dropped (with everything in it) when the test ends, pass or fail.
pub struct TestSchema {
    pub name: String,
    pub client: Client,
}

impl TestSchema {
    pub async fn new() -> TestSchema {
        let name = unique("sluice_t_");
        let client = pg().await;
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .expect("create schema");
        TestSchema { name, client }
    }

    pub fn table(&self) -> String {
        format!("{}.user_logins", self.name)
    }
    pub fn dead_letters(&self) -> String {
        format!("{}.user_logins_rejected", self.name)
    }
    pub fn ledger(&self) -> String {
        format!("{}.sluice_ledger", self.name)
    }

    pub async fn count(&self, table: &str) -> i64 {
        self.client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0)
    }

    /// Whether `table` exists yet (sluice creates its tables when it starts).
    pub async fn exists(&self, table: &str) -> bool {
        self.client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .expect("to_regclass")
            .get(0)
    }

    /// Rows in the target table and distinct user ids among them: equal when no message loaded
    /// twice.
    pub async fn rows_and_users(&self) -> (i64, i64) {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT user_id) FROM {}",
                    self.table()
                ),
                &[],
            )
            .await
            .expect("row and user counts");
        (row.get(0), row.get(1))
    }

    /// Rows in the target table, 0 while sluice has not created it yet.
    pub async fn rows_so_far(&self) -> i64 {
        if self.exists(&self.table()).await {
            self.rows_loaded().await
        } else {
            0
        }
    }

    /// Dead letters stored, 0 while sluice has not created their table yet.
    pub async fn dead_letters_so_far(&self) -> i64 {
        if self.exists(&self.dead_letters()).await {
            self.count(&self.dead_letters()).await
        } else {
            0
        }
    }

    pub async fn rows_loaded(&self) -> i64 {
        self.count(&self.table()).await
    }

    /// (reason, stage, body) of every dead letter, ordered by body.
    pub async fn rejects(&self) -> Vec<(String, String, String)> {
        self.client
            .query(
                &format!(
                    "SELECT reason, stage, body FROM {} ORDER BY body",
                    self.dead_letters()
                ),
                &[],
            )
            .await
            .expect("rejects")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// The `user_id` of every loaded row, one entry per row (a row loaded twice appears twice).
    pub async fn user_ids(&self) -> Vec<String> {
        self.client
            .query(&format!("SELECT user_id FROM {}", self.table()), &[])
            .await
            .expect("rows")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// The body of every dead letter, ordered by body, one entry per stored dead letter.
    pub async fn reject_bodies(&self) -> Vec<String> {
        self.rejects().await.into_iter().map(|r| r.2).collect()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async: use a small runtime of its own on another thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok((client, conn)) = tokio_postgres::connect(&database_url(), NoTls).await {
                    tokio::spawn(conn);
                    // A test that failed may still hold a lock in the schema (its client cannot
                    // end while the test's runtime is unwinding): end such sessions first.
                    let _ = client
                        .execute(
                            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
                             JOIN pg_class c ON c.oid = l.relation
                             JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()",
                            &[&name],
                        )
                        .await;
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

pub async fn sqs() -> aws_sdk_sqs::Client {
    let creds = aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "tests");
    let config = aws_sdk_sqs::config::Builder::new()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(aws_endpoint())
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// A queue of its own in the emulator, deleted when the test ends.
pub struct TestQueue {
    pub url: String,
    pub name: String,
    pub client: aws_sdk_sqs::Client,
}

impl TestQueue {
    pub async fn new() -> TestQueue {
        TestQueue::with_visibility(None).await
    }

    /// A queue whose messages, once received, stay invisible for `seconds` unless the receive asks
    /// otherwise (the emulator's default when `None`).
    pub async fn with_visibility(seconds: Option<u32>) -> TestQueue {
        let client = sqs().await;
        let name = unique("sluice-t-");
        let mut create = client.create_queue().queue_name(&name);
        if let Some(seconds) = seconds {
            create = create.attributes(QueueAttributeName::VisibilityTimeout, seconds.to_string());
        }
        let url = create
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "SQS emulator at {} does not answer ({}); run `make up`",
                    aws_endpoint(),
                    aws_sdk_sqs::error::DisplayErrorContext(e)
                )
            })
            .queue_url
            .expect("queue url");
        TestQueue { url, name, client }
    }

    /// Sends bodies in batches of ten; `dedupe_ids[i]`, when given, becomes the `dedupe_id` attribute.
    pub async fn send(&self, bodies: &[String]) {
        self.send_with_ids(bodies, &[]).await;
    }

    pub async fn send_with_ids(&self, bodies: &[String], dedupe_ids: &[&str]) {
        for (g, group) in bodies.chunks(10).enumerate() {
            let entries = group
                .iter()
                .enumerate()
                .map(|(i, body)| {
                    let mut entry = SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(body);
                    if let Some(id) = dedupe_ids.get(g * 10 + i) {
                        entry = entry.message_attributes(
                            "dedupe_id",
                            MessageAttributeValue::builder()
                                .data_type("String")
                                .string_value(*id)
                                .build()
                                .expect("attribute"),
                        );
                    }
                    entry.build().expect("entry")
                })
                .collect();
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("send batch");
            assert!(out.failed.is_empty(), "some sends failed: {:?}", out.failed);
        }
    }

    /// (visible, in flight) as the queue reports them.
    pub async fn depth(&self) -> (i64, i64) {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("queue attributes");
        let attrs = out.attributes.unwrap_or_default();
        let get = |n| attrs.get(&n).and_then(|v| v.parse().ok()).unwrap_or(-1);
        (
            get(QueueAttributeName::ApproximateNumberOfMessages),
            get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let (client, url) = (self.client.clone(), self.url.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = client.delete_queue().queue_url(url).send().await;
                });
            }
        })
        .join();
    }
}

/// A valid login body; `user` makes it unique.
pub fn login(user: &str) -> String {
    login_with(user, "10.0.0.1", "111-22-3333")
}

/// Message `i` as (user, body): user `user-{i:05}` (also a good partition key), and every
/// `bad_every`-th body one the parse stage rejects.
pub fn user_record(i: usize, bad_every: usize) -> (String, Vec<u8>) {
    let user = format!("user-{i:05}");
    let body = if i.is_multiple_of(bad_every) {
        bad_ip_login(&user, i)
    } else {
        login(&user)
    };
    (user, body.into_bytes())
}

/// A login the parse stage rejects (its IP is none), unique per `i`.
/// The sink's tables in `schema` (the ledger too when `ledger`), created as `migrate` creates them,
/// and a committer writing to them, built as the daemon builds its own.
pub async fn committer_in(
    schema: &TestSchema,
    ledger: bool,
) -> (
    sluice::table_name::Tables,
    sluice::sink::postgres::PgCopySink,
) {
    use sluice::sink::postgres::{PgCopySinkBuilder, SinkSettings};
    use sluice::sink::schema as tables;
    use sluice::table_name::{TableName, Tables};
    let table = |name: &str| TableName::parse(&format!("{}.{name}", schema.name)).expect("name");
    let names = Tables {
        target: table("user_logins"),
        dead_letter: table("user_logins_rejected"),
        ledger: table("sluice_ledger"),
    };
    let mut admin = pg().await;
    tables::migrate(&mut admin, &names, ledger)
        .await
        .expect("migrate");
    let columns = tables::verify(&admin, &names, ledger)
        .await
        .expect("verify");
    let settings = SinkSettings {
        connector: sluice::pg::Connector::new(database_url(), Duration::from_secs(10)),
        tables: names.clone(),
        dead_letter_columns: columns,
        dead_letter_queue: None,
    };
    let stats = std::sync::Arc::new(sluice::stats::Stats::default());
    let committer = PgCopySinkBuilder::new(settings, stats).committer(None);
    (names, committer)
}

/// The row sluice makes of `user`'s login, delivered with `meta`.
pub fn login_row(user: &str, meta: sluice::envelope::Meta) -> sluice::stage::transform::LoginRow {
    use sluice::stage::mask::{MaskKey, MaskMode, Masker};
    let body = login(user);
    let event = sluice::stage::parse::parse_login(sluice::envelope::Envelope { body, meta })
        .unwrap_or_else(|_| panic!("a valid login"));
    let masker = Masker::new(
        MaskMode::HmacSha256,
        &MaskKey::from_bytes(MASK_KEY.as_bytes()),
    )
    .expect("a hash key");
    sluice::stage::transform::Transformer::new(masker, Default::default(), Default::default())
        .transform(event, chrono::Utc::now().date_naive())
        .unwrap_or_else(|_| panic!("a row"))
}

pub fn bad_ip_login(user: &str, i: usize) -> String {
    format!(r#"{{"user_id": "{user}", "ip": "not an address {i}"}}"#)
}

pub fn login_with(user: &str, ip: &str, device_id: &str) -> String {
    format!(
        r#"{{"user_id": "{user}", "app_version": "2.3.0", "device_type": "android", "ip": "{ip}", "locale": "RU", "device_id": "{device_id}"}}"#
    )
}

/// A config file in a temporary directory, deleted with it.
pub struct TestConfig {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestConfig {
    pub fn write(toml: &str) -> TestConfig {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, toml).expect("write config");
        TestConfig { dir, path }
    }
}

/// The usual test configuration: SQS queue → the schema's tables, small batches, short polls, one
/// poller (the emulator, like SQS, may hand one message to two concurrent receives; tests that count
/// exactly use one poller, tests of concurrency ask for more and allow for duplicates).
/// `extra_sqs` and `extra_pg` add keys to `[source.sqs]` and `[sink.postgres]` (a key given there
/// replaces the default below); `extra` is appended verbatim.
pub fn sqs_config(
    queue: &TestQueue,
    schema: &TestSchema,
    extra_sqs: &str,
    extra_pg: &str,
    extra: &str,
) -> String {
    let sqs_defaults = with_defaults(
        extra_sqs,
        &[
            ("pollers", "1"),
            ("wait_time_seconds", "1"),
            ("visibility_timeout_seconds", "30"),
        ],
    );
    let pg_defaults = with_defaults(extra_pg, &[("batch_rows", "100"), ("linger_ms", "100")]);
    format!(
        r#"
[source]
kind = "sqs"

[source.sqs]
queue_url = "{queue}"
endpoint_url = "{endpoint}"
region = "us-east-1"
{sqs_defaults}

[sink.postgres]
url = "{db}"
table = "{table}"
ledger_table = "{ledger}"
{pg_defaults}

[dead_letter]
table = "{dead}"

{extra}
"#,
        queue = queue.url,
        endpoint = aws_endpoint(),
        db = database_url(),
        table = schema.table(),
        ledger = schema.ledger(),
        dead = schema.dead_letters(),
    )
}

/// Spawns `run` on `config` and waits until the table holds `threshold` rows, polling every
/// `poll`; fails if the process exits on its own before, or if `limit` passes.
pub async fn spawn_until_rows(
    config: &Path,
    schema: &TestSchema,
    threshold: i64,
    limit: Duration,
    poll: Duration,
) -> Watched {
    let mut daemon = Watched::spawn(run_command(config, None));
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = daemon.child.try_wait().expect("poll the process") {
            let run = daemon.finish(Duration::from_secs(5)).await;
            panic!(
                "sluice exited on its own ({status}) before the kill:\n{}",
                run.stderr
            );
        }
        if schema.rows_so_far().await >= threshold {
            return daemon;
        }
        assert!(
            Instant::now() < deadline,
            "the table did not reach {threshold} rows within {limit:?}"
        );
        tokio::time::sleep(poll).await;
    }
}

/// A file source reading `path` into the schema's tables at the database `db_url` (quoted as a TOML
/// string here). `extra_source`, `extra_file` and `extra_pg` are added verbatim to `[source]`,
/// `[source.file]` and `[sink.postgres]`; every other key is the daemon's default.
pub fn file_config_at(
    schema: &TestSchema,
    path: &str,
    db_url: &str,
    extra_source: &str,
    extra_file: &str,
    extra_pg: &str,
) -> String {
    format!(
        r#"
[source]
kind = "file"
{extra_source}
[source.file]
path = "{path}"
{extra_file}
[sink.postgres]
url = "{db_url}"
table = "{table}"
ledger_table = "{ledger}"
{extra_pg}
[dead_letter]
table = "{dead}"
"#,
        db_url = db_url.replace('\\', "\\\\").replace('"', "\\\""),
        table = schema.table(),
        ledger = schema.ledger(),
        dead = schema.dead_letters(),
    )
}

/// [`file_config_at`] at the test database.
pub fn file_config(
    schema: &TestSchema,
    path: &str,
    extra_source: &str,
    extra_file: &str,
    extra_pg: &str,
) -> String {
    file_config_at(
        schema,
        path,
        &database_url(),
        extra_source,
        extra_file,
        extra_pg,
    )
}

/// `extra` plus every `key = value` default whose key `extra` does not set.
pub fn with_defaults(extra: &str, defaults: &[(&str, &str)]) -> String {
    let mut lines: Vec<String> = extra.lines().map(str::to_owned).collect();
    for (key, value) in defaults {
        if !extra
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{key} ")))
        {
            lines.push(format!("{key} = {value}"));
        }
    }
    lines.join("\n")
}

/// The `sluice` binary, with an environment that holds only what the test decides: the `SLUICE_*`
/// overrides of the surrounding shell are removed so the config file is what counts.
pub fn sluice(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_SQS_QUEUE_URL")
        .env_remove("SLUICE_SQS_ENDPOINT_URL")
        .env_remove("SLUICE_KINESIS_STREAM")
        .env_remove("SLUICE_KINESIS_ENDPOINT_URL")
        .env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_DATABASE_CA_FILE")
        .env("SLUICE_MASK_KEY", MASK_KEY)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// What a finished `sluice` process said.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The counts of the summary `sluice run --summary json` printed: its last line of stdout that
    /// is a JSON object.
    pub fn summary(&self) -> Summary {
        self.stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| {
                panic!(
                    "no JSON summary in stdout (was `--summary json` given?):\n{}\nstderr:\n{}",
                    self.stdout, self.stderr
                )
            })
    }

    pub fn assert_success(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "sluice failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// The counts the tests compare (the JSON summary holds more, which they ignore).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct Summary {
    pub received: u64,
    pub loaded: u64,
    pub rejected: u64,
    pub duplicates: u64,
}

/// Runs `sluice` to completion (at most `limit`).
pub async fn run_to_end(mut cmd: tokio::process::Command, limit: Duration) -> Finished {
    let child = cmd.spawn().expect("spawn sluice");
    finish(child, limit).await
}

pub async fn finish(child: tokio::process::Child, limit: Duration) -> Finished {
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("sluice did not finish within {limit:?}"))
        .expect("wait for sluice");
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `sluice migrate --config …`, which must succeed.
pub async fn migrate(config: &Path) -> Finished {
    let out = run_to_end(
        sluice(&["migrate", "--config", path_str(config)]),
        Duration::from_secs(30),
    )
    .await;
    out.assert_success();
    out
}

/// `sluice run --config … --summary json`, with `--exit-when-idle SECONDS` when given; not started
/// yet.
pub fn run_command(config: &Path, idle_seconds: Option<u32>) -> tokio::process::Command {
    let mut cmd = sluice(&["run", "--config", path_str(config), "--summary", "json"]);
    if let Some(idle) = idle_seconds {
        cmd.args(["--exit-when-idle", &idle.to_string()]);
    }
    cmd
}

/// `sluice run --config … --exit-when-idle SECONDS`, to completion.
pub async fn run_until_idle(config: &Path, idle_seconds: u32) -> Finished {
    run_to_end(
        run_command(config, Some(idle_seconds)),
        Duration::from_secs(180),
    )
    .await
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Ends every database session of one application name every 300 ms, from start to stop: the
/// database connections of a running sluice cut again and again.
pub struct SessionCutter {
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl SessionCutter {
    pub fn start(application_name: &str) -> SessionCutter {
        use std::sync::atomic::Ordering;
        let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (still, app) = (running.clone(), application_name.to_owned());
        let task = tokio::spawn(async move {
            let admin = pg().await;
            let mut cuts = 0;
            while still.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let ended = admin
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1",
                        &[&app],
                    )
                    .await
                    .expect("terminate");
                cuts += ended.len() as u64;
            }
            cuts
        });
        SessionCutter { running, task }
    }

    /// Stops cutting; how many sessions were ended.
    pub async fn stop(self) -> u64 {
        self.running
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("session cutter")
    }
}

/// A generator seeded from `SLUICE_TEST_SEED`, or at random; the seed is printed, so a run whose
/// random moments failed can be replayed.
pub fn seeded_rng(what: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("SLUICE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("seed {seed} (SLUICE_TEST_SEED={seed} replays {what})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Polls `condition` until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        holds_within(limit, condition).await,
        "timed out after {limit:?} waiting for {what}"
    );
}

/// Polls `condition` until it holds (true) or `limit` passes (false), for a caller that explains
/// a timeout with more than its name.
pub async fn holds_within<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        if start.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

/// Sends SIGTERM (or another signal) to a child.
pub fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("child still running").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

impl TestQueue {
    /// The queue's ARN, which scopes its messages' ledger keys.
    pub async fn arn(&self) -> String {
        self.client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue attributes")
            .attributes
            .unwrap_or_default()
            .remove(&QueueAttributeName::QueueArn)
            .expect("the queue's ARN")
    }
}

/// The ledger keys sluice claims for `message` as received from `queue` (received with its system
/// attributes, as the SQS source asks for them).
pub async fn ledger_keys(
    queue: &TestQueue,
    message: &aws_sdk_sqs::types::Message,
    producer_key: Option<&str>,
    outcome: sluice::sink::commit_record::Outcome,
) -> sluice::sink::ledger::MessageKeys {
    use aws_sdk_sqs::types::MessageSystemAttributeName as Attribute;
    use sluice::envelope::{MessageId, Meta};
    use sluice::sink::ledger::LedgerKeys;
    let attribute = |name: Attribute| {
        message
            .attributes
            .as_ref()
            .and_then(|a| a.get(&name))
            .map(|v| v.parse::<i64>().expect("a numeric attribute"))
    };
    let mut meta = Meta::at_position(1, std::time::SystemTime::now());
    meta.message_id = MessageId::Text(message.message_id.clone().expect("a message id"));
    meta.dedupe_key = producer_key.map(str::to_owned);
    meta.sent_at_ms = Some(attribute(Attribute::SentTimestamp).expect("SentTimestamp"));
    meta.receive_count =
        attribute(Attribute::ApproximateReceiveCount).expect("ApproximateReceiveCount") as u32;
    sluice::source::sqs::SqsLedgerKeys::new(queue.arn().await).keys(&meta, "", outcome)
}

/// A running `sluice` whose log (stderr) is read as it is written, so a test can wait for what
/// the daemon says instead of sleeping.
pub struct Watched {
    pub child: tokio::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Watched {
    pub fn spawn(mut cmd: tokio::process::Command) -> Watched {
        use tokio::io::AsyncBufReadExt;
        let mut child = cmd.spawn().expect("spawn sluice");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        Watched { child, log, reader }
    }

    /// The first log line containing `needle`, waiting for it at most `limit`.
    pub async fn line_containing(&self, needle: &str, limit: Duration) -> String {
        let find = || {
            let log = self.log.lock().expect("log");
            log.lines().find(|l| l.contains(needle)).map(str::to_owned)
        };
        eventually(limit, &format!("a log line with {needle:?}"), || async {
            find().is_some()
        })
        .await;
        find().unwrap_or_default()
    }

    /// The address the operations endpoint listens on, as the daemon logs it (configure
    /// `metrics.listen = "127.0.0.1:0"`).
    pub async fn metrics_address(&self) -> String {
        let line = self
            .line_containing("serving /metrics", Duration::from_secs(30))
            .await;
        line.split_whitespace()
            .find_map(|word| word.strip_prefix("listen="))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Every log line containing `needle` so far.
    pub fn lines_containing(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().expect("log");
        log.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Kills the process with SIGKILL and checks that the signal ended it, not an exit of its own.
    pub async fn kill_9(mut self) -> Finished {
        self.child.start_kill().expect("kill -9");
        let run = self.finish(Duration::from_secs(10)).await;
        assert_eq!(
            run.code, None,
            "killed by a signal, not exited:\n{}",
            run.stderr
        );
        run
    }

    pub async fn finish(self, limit: Duration) -> Finished {
        let output = tokio::time::timeout(limit, self.child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("sluice did not finish within {limit:?}"))
            .expect("wait for sluice");
        let _ = self.reader.await;
        let stderr = self.log.lock().expect("log").clone();
        Finished {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr,
        }
    }
}

/// Runs `sluice` with a standard output whose reader has already gone, as in `sluice … | head`
/// once `head` has exited: every write to stdout fails with EPIPE.
pub async fn run_with_stdout_closed(mut cmd: tokio::process::Command, limit: Duration) -> Finished {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    cmd.stdout(Stdio::from(writer));
    run_to_end(cmd, limit).await
}

/// The process neither panicked nor reported a write failure.
pub fn assert_quiet_about_the_pipe(out: &Finished) {
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.to_lowercase().contains("broken pipe"),
        "{}",
        out.stderr
    );
}

/// A plain HTTP GET, enough for the operations endpoint: (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of an unlabelled sample `name` in a scrape (`None` if absent).
pub fn metric_value(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Occurrences of each item of `found`.
fn occurrences(found: &[String]) -> BTreeMap<&str, usize> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for item in found {
        *counts.entry(item).or_default() += 1;
    }
    counts
}

/// Every item of `expected` occurs exactly once in `found`, and nothing else does; a failure names
/// the first missing, doubled and unexpected items. `context` is appended to the message.
pub fn assert_exactly_once(
    what: &str,
    found: &[String],
    expected: &BTreeSet<String>,
    context: &str,
) {
    let counts = occurrences(found);
    let missing: Vec<&String> = expected
        .iter()
        .filter(|e| !counts.contains_key(e.as_str()))
        .collect();
    let doubled: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let strange: Vec<&&str> = counts.keys().filter(|k| !expected.contains(**k)).collect();
    assert!(
        missing.is_empty() && doubled.is_empty() && strange.is_empty(),
        "{what}s: {} missing (first {:?}), {} more than once (first {:?}), {} unexpected (first {:?})\n{context}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        doubled.len(),
        doubled.iter().take(5).collect::<Vec<_>>(),
        strange.len(),
        strange.iter().take(5).collect::<Vec<_>>(),
    );
    assert_eq!(found.len(), expected.len(), "{what}s\n{context}");
}

/// `found` holds exactly `count` items and none of them twice (for tests that know how many items
/// to expect but not which); a failure names the first doubled items.
pub fn assert_distinct_count(what: &str, found: &[String], count: usize) {
    let counts = occurrences(found);
    let doubled: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "{what}s: {} more than once (first {:?})",
        doubled.len(),
        doubled.iter().take(5).collect::<Vec<_>>(),
    );
    assert_eq!(found.len(), count, "{what}s: {count} expected, each once");
}
