//! `sluice migrate`: create what is missing, report what exists. Existing tables are checked first:
//! if one cannot be used, every column that is off is reported and nothing is created.

use std::process::ExitCode;
use std::time::Duration;

use sluice::config::Config;
use sluice::pg::Connector;
use sluice::sink::schema;

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
    Ok(ExitCode::SUCCESS)
}
