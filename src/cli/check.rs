//! `sluice check`: everything `run` would need, verified without moving a message.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use sluice::aws;
use sluice::config::{Config, SourceKind, redact_url};
use sluice::pg;
use sluice::pipeline::tables;
use sluice::sink::schema::{self, SchemaError};

use crate::cli::output::outln;

/// Longest any one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Findings {
    failed: bool,
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
    check_key(config, &mut findings);
    match config.source.kind {
        SourceKind::Sqs => check_queue(config, &mut findings).await,
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
    Ok(if findings.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn check_key(config: &Config, findings: &mut Findings) {
    match config.mask_key() {
        Ok(key) if key.is_development_key() => findings.warn(
            "mask key",
            "the PUBLIC development key: fine for the demo, masks protect nothing; set SLUICE_MASK_KEY for real data",
        ),
        Ok(_) => findings.ok("mask key", format!("loaded ({:?})", config.mask.mode)),
        Err(e) => findings.fail("mask key", e.to_string()),
    }
}

async fn check_queue(config: &Config, findings: &mut Findings) {
    let cfg = &config.source.sqs;
    let client = aws::sqs_client(cfg).await;
    let url = match probe(async { aws::resolve_queue_url(&client, cfg).await }).await {
        Ok(url) => url,
        Err(e) => return findings.fail("sqs", e),
    };
    match probe(queue_depth(&client, &url)).await {
        Ok(depth) => findings.ok("sqs", format!("{url}: {depth}")),
        Err(e) => findings.fail("sqs", e),
    }
}

async fn queue_depth(client: &aws_sdk_sqs::Client, url: &str) -> Result<String, String> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", aws::describe(&e)))?;
    let attrs = out.attributes.unwrap_or_default();
    let get = |name| attrs.get(&name).cloned().unwrap_or_else(|| "?".into());
    Ok(format!(
        "~{} waiting, ~{} in flight",
        get(QueueAttributeName::ApproximateNumberOfMessages),
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
    ))
}

/// What the dead-letter queue accepts (reading its attributes proves it exists and is reachable
/// with these credentials; only a send could prove the permission to send).
async fn dead_letter_queue_limits(
    client: &aws_sdk_sqs::Client,
    url: &str,
) -> Result<String, String> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::MaximumMessageSize)
        .attribute_names(QueueAttributeName::FifoQueue)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", aws::describe(&e)))?;
    let attrs = out.attributes.unwrap_or_default();
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
    let path = config.source.file.path.clone().unwrap_or_default();
    if path.as_os_str() == "-" {
        return findings.ok("file", "standard input");
    }
    let path = if path.is_absolute() {
        path
    } else {
        config.base_dir.join(path)
    };
    match std::fs::metadata(&path) {
        Ok(meta) => findings.ok("file", format!("{} ({} bytes)", path.display(), meta.len())),
        Err(e) => findings.fail("file", format!("{}: {e}", path.display())),
    }
}

async fn check_postgres(config: &Config, findings: &mut Findings) {
    let url = config.database_url();
    let timeout = Duration::from_secs(config.sink.postgres.connect_timeout_seconds);
    let client = match probe(async {
        pg::connect(url, "sluice-check", timeout)
            .await
            .map_err(|e| pg::describe(&e))
    })
    .await
    {
        Ok(client) => client,
        Err(e) => return findings.fail("postgres", format!("{}: {e}", redact_url(url))),
    };
    match client.query_one("SHOW server_version", &[]).await {
        Ok(row) => findings.ok(
            "postgres",
            format!("{} (server {})", redact_url(url), row.get::<_, String>(0)),
        ),
        Err(e) => return findings.fail("postgres", pg::describe(&e)),
    }
    let tables = tables(config);
    match schema::verify(&client, &tables, config.dedupe_enabled()).await {
        Ok(_) => findings.ok(
            "tables",
            format!("{}, {} ready", tables.target, tables.dead_letter),
        ),
        Err(SchemaError::Missing { table }) if config.sink.postgres.create_tables => findings.warn(
            "tables",
            format!("{table} is missing; `run` creates it (or run `sluice migrate` now)"),
        ),
        Err(e) => findings.fail("tables", e.to_string()),
    }
}

async fn probe<T>(work: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())))
}
