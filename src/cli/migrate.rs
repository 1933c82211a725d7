//! `sluice migrate`: create what is missing, report what exists. Existing tables are checked first:
//! if one cannot be used, every column that is off is reported and nothing is created.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sluice::config::{Config, SourceKind};
use sluice::pg::Connector;
use sluice::sink::schema;
use sluice::source::kinesis::source as kinesis;

use crate::cli::output::outln;

pub async fn migrate(config: &Config) -> anyhow::Result<ExitCode> {
    let postgres = &config.sink.postgres;
    let patience = Duration::from_secs(postgres.connect_retry_seconds);
    let mut client = Connector::from_config(postgres)
        .connect_at_start("sluice-migrate", patience)
        .await?;
    let tables = config.tables();
    let dedupe = config.dedupe_enabled();
    for status in schema::migrate(&mut client, &tables, dedupe).await? {
        let what = if status.created {
            "created"
        } else {
            "exists, left unchanged"
        };
        outln!("{:<40} {what}", status.table);
    }
    if config.source.kind == SourceKind::Kinesis {
        let created = kinesis::create_lease_table(&client, config)
            .await
            .context("cannot create the Kinesis lease and checkpoint table")?;
        let what = if created {
            "created"
        } else {
            "exists, left unchanged"
        };
        outln!(
            "{:<40} {what}",
            config.source.kinesis.lease_table.to_string()
        );
    }
    Ok(ExitCode::SUCCESS)
}
