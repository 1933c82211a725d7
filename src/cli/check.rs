//! `sluice check`: everything `run` would need, verified without moving a message.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use sluice::aws;
use sluice::config::{Config, SourceKind};
use sluice::error_chain::Chain;
use sluice::pg::{Connector, PgError};
use sluice::sink::schema::{self, SchemaError};
use sluice::source::file_path;
use sluice::source::kinesis::shards::list_shards;
use sluice::source::kinesis::source as kinesis;
use sluice::stage::mask::Masker;

use crate::cli::output::outln;

/// Longest any one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Findings {
    failed: bool,
    /// A finding that makes the configuration unusable (the masking key): exit 2, as for a bad file.
    unusable: bool,
}

impl Findings {
    fn ok(&mut self, what: &str, detail: impl AsRef<str>) {
        outln!("{what:<11} ok    {}", detail.as_ref());
    }
    fn warn(&mut self, what: &str, detail: impl AsRef<str>) {
        outln!("{what:<11} WARN  {}", detail.as_ref());
    }
    fn fail(&mut self, what: &str, detail: impl AsRef<str>) {
        self.failed = true;
        outln!("{what:<11} FAIL  {}", detail.as_ref());
    }
}

pub async fn check(config: &Config, path: &Path) -> anyhow::Result<ExitCode> {
    let mut findings = Findings::default();
    findings.ok("config", format!("{} is valid", path.display()));
    check_key(config, &mut findings).await;
    match config.source.kind {
        SourceKind::Sqs => check_queue(config, &mut findings).await,
        SourceKind::Kinesis => check_stream(config, &mut findings).await,
        SourceKind::File => check_file(config, &mut findings),
    }
    check_postgres(config, &mut findings).await;
    if let Some(url) = &config.dead_letter.sqs_queue_url {
        let client = aws::sqs_client(&config.source.sqs).await;
        match probe(dead_letter_queue_limits(&client, url)).await {
            Ok(limits) => findings.ok("dlq", format!("{url}: {limits}")),
            Err(e) => findings.fail("dlq", e),
        }
    }
    Ok(if findings.unusable {
        ExitCode::from(2)
    } else if findings.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The key as the daemon would load it (through KMS when configured so), and usable in its mode.
async fn check_key(config: &Config, findings: &mut Findings) {
    let usable = match sluice::pipeline::mask_key(config).await {
        Ok(key) => Masker::new(config.mask.mode, &key)
            .map(|_| key)
            .map_err(|e| Chain(&e).to_string()),
        Err(e) => Err(Chain(&e).to_string()),
    };
    match usable {
        Ok(key) if key.is_development_key() => findings.warn(
            "mask key",
            "the PUBLIC development key: fine for the demo, masks protect nothing; set SLUICE_MASK_KEY for real data",
        ),
        Ok(_) => findings.ok("mask key", format!("loaded ({:?})", config.mask.mode)),
        Err(e) => {
            findings.unusable = true;
            findings.fail("mask key", e);
        }
    }
}

async fn check_queue(config: &Config, findings: &mut Findings) {
    let cfg = &config.source.sqs;
    let client = aws::sqs_client(cfg).await;
    let depth = probe(async {
        let url = aws::resolve_queue_url(&client, cfg).await?;
        let (waiting, in_flight) = aws::queue_depth(&client, &url).await?;
        Ok(format!("{url}: ~{waiting} waiting, ~{in_flight} in flight"))
    })
    .await;
    match depth {
        Ok(depth) => findings.ok("sqs", depth),
        Err(e) => findings.fail("sqs", e),
    }
}

async fn check_stream(config: &Config, findings: &mut Findings) {
    let cfg = &config.source.kinesis;
    let stream = kinesis::stream_ref(cfg);
    let api = kinesis::client(cfg).await;
    let listed = probe(async {
        let graph = list_shards(api.as_ref(), &stream).await?;
        Ok(format!(
            "stream {}: {} shards ({} open)",
            stream.name(),
            graph.len(),
            graph.open_count()
        ))
    })
    .await;
    match listed {
        Ok(shards) => findings.ok("kinesis", shards),
        Err(e) => findings.fail("kinesis", e),
    }
}

/// What the dead-letter queue accepts (reading its attributes proves it exists and is reachable
/// with these credentials; only a send could prove the permission to send).
async fn dead_letter_queue_limits(
    client: &aws_sdk_sqs::Client,
    url: &str,
) -> anyhow::Result<String> {
    let attrs = aws::queue_attributes(
        client,
        url,
        &[
            QueueAttributeName::MaximumMessageSize,
            QueueAttributeName::FifoQueue,
        ],
    )
    .await?;
    let size = attrs
        .get(&QueueAttributeName::MaximumMessageSize)
        .cloned()
        .unwrap_or_else(|| "?".into());
    let fifo = attrs
        .get(&QueueAttributeName::FifoQueue)
        .is_some_and(|v| v == "true");
    Ok(format!(
        "accepts messages up to {size} bytes{}; larger dead letters stay in the table only",
        if fifo { " (FIFO)" } else { "" }
    ))
}

fn check_file(config: &Config, findings: &mut Findings) {
    let path = file_path(config);
    if path.as_os_str() == "-" {
        return findings.ok("file", "standard input");
    }
    match std::fs::metadata(&path) {
        Ok(meta) => findings.ok("file", format!("{} ({} bytes)", path.display(), meta.len())),
        Err(e) => findings.fail("file", format!("{}: {e}", path.display())),
    }
}

async fn check_postgres(config: &Config, findings: &mut Findings) {
    let connector = Connector::from_config(&config.sink.postgres);
    let client = match probe(async { Ok(connector.connect("sluice-check").await?) }).await {
        Ok(client) => client,
        Err(e) => return findings.fail("postgres", e),
    };
    // Whether the session is encrypted, as the server sees it: `sslmode=prefer` falls back to
    // plain text quietly when the server offers no TLS.
    let probe_sql = "SELECT current_setting('server_version'), \
                     coalesce((SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl), \
                              'no TLS')";
    match client.query_one(probe_sql, &[]).await {
        Ok(row) => findings.ok(
            "postgres",
            format!(
                "{} (server {}, {})",
                connector.redacted_url(),
                row.get::<_, String>(0),
                row.get::<_, String>(1)
            ),
        ),
        Err(e) => return findings.fail("postgres", PgError(e).to_string()),
    }
    let tables = config.tables();
    match schema::verify(&client, &tables, config.dedupe_enabled()).await {
        Ok(_) => findings.ok(
            "tables",
            format!("{}, {} ready", tables.target, tables.dead_letter),
        ),
        Err(SchemaError::Missing { table }) if config.sink.postgres.create_tables => findings.warn(
            "tables",
            format!("{table} is missing; `run` creates it (or run `sluice migrate` now)"),
        ),
        Err(e) => findings.fail("tables", Chain(&e).to_string()),
    }
    if config.source.kind == SourceKind::Kinesis {
        let table = &config.source.kinesis.lease_table;
        match kinesis::lease_table_exists(&client, config).await {
            Ok(true) => findings.ok("leases", format!("{table} (leases and checkpoints) ready")),
            Ok(false) if config.sink.postgres.create_tables => findings.warn(
                "leases",
                format!("{table} is missing; `run` creates it (or run `sluice migrate` now)"),
            ),
            Ok(false) => findings.fail(
                "leases",
                format!("{table} is missing: run `sluice migrate`"),
            ),
            Err(e) => findings.fail("leases", Chain(&e).to_string()),
        }
    }
}

/// Runs a probe within [`PROBE_TIMEOUT`]; its failure as one line, each cause once.
async fn probe<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}
