//! `sluice migrate`: create what is missing, report what exists.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sluice::config::{Config, redact_url};
use sluice::pg;
use sluice::pipeline::tables;
use sluice::sink::schema;

use crate::cli::output::outln;

pub async fn migrate(config: &Config) -> anyhow::Result<ExitCode> {
    let url = config.database_url();
    let timeout = Duration::from_secs(config.sink.postgres.connect_timeout_seconds);
    let mut client = pg::connect(url, "sluice-migrate", timeout)
        .await
        .map_err(|e| anyhow::anyhow!(pg::describe(&e)))
        .with_context(|| format!("cannot connect to {}", redact_url(url)))?;
    let tables = tables(config);
    let dedupe = config.dedupe_enabled();
    for status in schema::migrate(&mut client, &tables, dedupe).await? {
        let what = if status.created {
            "created"
        } else {
            "exists, left unchanged"
        };
        outln!("{:<40} {what}", status.table);
    }
    schema::verify(&client, &tables, dedupe)
        .await
        .context("an existing table does not have the columns sluice writes")?;
    Ok(ExitCode::SUCCESS)
}
