//! `sluice report`: what has landed, for people (the demo ends with it).

use std::process::ExitCode;

use sluice::aws;
use sluice::config::{Config, SourceKind};
use sluice::error_chain::Chain;
use sluice::pg::{Connector, PgError};
use sluice::sink::schema;

use sluice::source::kinesis::api::{KinesisApi, StreamRef};
use sluice::source::kinesis::position::StartPosition;
use sluice::source::kinesis::sequence::SequenceNumber;
use sluice::source::kinesis::source as kinesis;

use crate::cli::output::outln;

pub async fn report(config: &Config, sample_rows: i64) -> anyhow::Result<ExitCode> {
    let client = Connector::from_config(&config.sink.postgres)
        .connect("sluice-report")
        .await?;
    let t = config.tables();
    let missing = schema::missing(&client, &[&t.target, &t.dead_letter]).await?;
    if !missing.is_empty() {
        anyhow::bail!(
            "{} not created yet: run `sluice migrate` (or `sluice run`, which creates missing tables)",
            missing.join(" and ")
        );
    }

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
    match config.source.kind {
        SourceKind::Sqs => print_queue(config).await,
        SourceKind::Kinesis => print_shards(config, &client).await,
        SourceKind::File => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn client_query(
    client: &tokio_postgres::Client,
    sql: &str,
) -> anyhow::Result<Vec<Vec<String>>> {
    let rows = client.query(sql, &[]).await.map_err(PgError)?;
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
        Err(e) => return outln!("queue: not reachable: {}", Chain(&e)),
    };
    match aws::queue_depth(&client, &url).await {
        Ok((waiting, in_flight)) => outln!("queue {url}: {waiting} waiting, {in_flight} in flight"),
        Err(e) => outln!("queue {url}: depth not readable: {}", Chain(&e)),
    }
}

/// Per shard: checkpoint, owner and lag (how far the checkpoint is behind the shard's tip, as
/// GetRecords reports it from there).
async fn print_shards(config: &Config, client: &tokio_postgres::Client) {
    let cfg = &config.source.kinesis;
    let stream = kinesis::stream_ref(cfg);
    let leases = kinesis::leases(config, "sluice-report");
    let rows = match leases.rows(client).await {
        Ok(rows) => rows,
        Err(e) => {
            return outln!(
                "stream {}: leases not readable: {}",
                stream.name(),
                Chain(&e)
            );
        }
    };
    outln!(
        "stream {} (application {:?}): {} shards known",
        stream.name(),
        cfg.application,
        rows.len()
    );
    if rows.is_empty() {
        return;
    }
    let api = kinesis::client(cfg).await;
    outln!(
        "  {:<22}  {:<9}  {:<28}  {:<14}  checkpoint",
        "shard",
        "state",
        "owner",
        "lag"
    );
    for row in rows {
        let live = row.expires_in_seconds.is_some_and(|s| s > 0.0);
        let owner = match (&row.owner, live) {
            (Some(owner), true) => owner.clone(),
            (Some(owner), false) => format!("{owner} (expired)"),
            (None, _) => "-".into(),
        };
        let (state, lag) = if row.finished {
            ("finished", "-".to_owned())
        } else {
            let lag = shard_lag(
                api.as_ref(),
                &stream,
                &row.shard_id,
                row.checkpoint.as_deref(),
            )
            .await;
            ("reading", lag)
        };
        outln!(
            "  {:<22}  {:<9}  {:<28}  {:<14}  {}",
            row.shard_id,
            state,
            owner,
            lag,
            row.checkpoint.as_deref().unwrap_or("-")
        );
    }
}

/// How far behind the tip the shard's checkpoint is, in words.
async fn shard_lag(
    api: &dyn KinesisApi,
    stream: &StreamRef,
    shard: &str,
    checkpoint: Option<&str>,
) -> String {
    let start = match checkpoint.map(SequenceNumber::parse) {
        Some(Ok(sequence)) => StartPosition::AfterSequence(sequence),
        Some(Err(e)) => return format!("? ({e})"),
        None => StartPosition::TrimHorizon,
    };
    let page = async {
        let iterator = api.shard_iterator(stream, shard, &start).await?;
        api.get_records(&iterator, 1).await
    };
    match page.await {
        Ok(page) => match (page.records.is_empty(), page.millis_behind_latest) {
            (true, _) if page.next_iterator.is_none() => "read to end".into(),
            (true, Some(0) | None) => "0 ms".into(),
            (_, Some(ms)) => format!("{ms} ms"),
            (false, None) => "records waiting".into(),
        },
        Err(e) => format!("? ({e})"),
    }
}
