//! `sluice migrate`: create what is missing, report what exists.

use std::process::ExitCode;

use anyhow::Context;
use sluice::config::Config;
use sluice::pg::Connector;
use sluice::sink::schema;

use crate::cli::output::outln;

pub async fn migrate(config: &Config) -> anyhow::Result<ExitCode> {
    let mut client = Connector::from_config(&config.sink.postgres)
        .connect("sluice-migrate")
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
    schema::verify(&client, &tables, dedupe)
        .await
        .context("an existing table cannot be used as it is")?;
    Ok(ExitCode::SUCCESS)
}
