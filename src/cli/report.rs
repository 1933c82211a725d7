//! `sluice report`: what has landed, for people (the demo ends with it).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_sqs::types::QueueAttributeName;
use sluice::aws;
use sluice::config::{Config, SourceKind, redact_url};
use sluice::pg;
use sluice::pipeline::tables;

use crate::cli::output::outln;

pub async fn report(config: &Config, sample_rows: i64) -> anyhow::Result<ExitCode> {
    let url = config.database_url();
    let timeout = Duration::from_secs(config.sink.postgres.connect_timeout_seconds);
    let client = pg::connect(url, "sluice-report", timeout)
        .await
        .map_err(|e| anyhow::anyhow!(pg::describe(&e)))
        .with_context(|| format!("cannot connect to {}", redact_url(url)))?;
    let t = tables(config);

    let totals = client_query(&client, &format!(
        "SELECT count(*)::text, count(DISTINCT masked_ip)::text, count(DISTINCT masked_device_id)::text,
                count(DISTINCT user_id)::text FROM {}",
        t.target
    ))
    .await?;
    if let Some(row) = totals.first() {
        outln!(
            "{}: {} rows ({} distinct masked_ip, {} distinct masked_device_id, {} users)",
            t.target,
            row[0],
            row[1],
            row[2],
            row[3]
        );
    }
    let by_reason = |label: &str| {
        format!(
            "SELECT count(*)::text, {label} FROM {} GROUP BY 2 ORDER BY count(*) DESC, 2",
            t.dead_letter
        )
    };
    let reasons = match client_query(&client, &by_reason("stage || ': ' || reason")).await {
        Ok(reasons) => reasons,
        // A hand-made dead-letter table may lack `stage`.
        Err(_) => client_query(&client, &by_reason("reason")).await?,
    };
    let rejected: i64 = reasons
        .iter()
        .filter_map(|r| r[0].parse::<i64>().ok())
        .sum();
    outln!("{}: {rejected} dead letters", t.dead_letter);
    for r in &reasons {
        outln!("  {:>6}  {}", r[0], r[1]);
    }
    let rows = client_query(
        &client,
        &format!(
        "SELECT user_id, device_type, left(masked_ip, 16) || '…', left(masked_device_id, 16) || '…',
                coalesce(locale, 'NULL'), app_version::text, create_date::text
         FROM {} ORDER BY user_id LIMIT {}",
        t.target,
        sample_rows.max(0)
    ),
    )
    .await?;
    if !rows.is_empty() {
        outln!("sample rows:");
        outln!(
            "  {:<36}  {:<8}  {:<17}  {:<17}  {:<6}  {:>3}  create_date",
            "user_id",
            "device",
            "masked_ip",
            "masked_device_id",
            "locale",
            "ver"
        );
        for r in rows {
            outln!(
                "  {:<36}  {:<8}  {:<17}  {:<17}  {:<6}  {:>3}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6]
            );
        }
    }
    if config.source.kind == SourceKind::Sqs {
        print_queue(config).await;
    }
    Ok(ExitCode::SUCCESS)
}

async fn client_query(
    client: &tokio_postgres::Client,
    sql: &str,
) -> anyhow::Result<Vec<Vec<String>>> {
    let rows = client
        .query(sql, &[])
        .await
        .map_err(|e| anyhow::anyhow!(pg::describe(&e)))?;
    Ok(rows
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
                .collect()
        })
        .collect())
}

async fn print_queue(config: &Config) {
    let cfg = &config.source.sqs;
    let client = aws::sqs_client(cfg).await;
    let url = match aws::resolve_queue_url(&client, cfg).await {
        Ok(url) => url,
        Err(e) => return outln!("queue: not reachable: {e}"),
    };
    let attrs = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .ok()
        .and_then(|o| o.attributes)
        .unwrap_or_default();
    let get = |n| attrs.get(&n).cloned().unwrap_or_else(|| "?".into());
    outln!(
        "queue {url}: {} waiting, {} in flight",
        get(QueueAttributeName::ApproximateNumberOfMessages),
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
    );
}
