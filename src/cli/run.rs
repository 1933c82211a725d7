//! `sluice run`: the daemon.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sluice::config::Config;
use sluice::pipeline::{Pipeline, RunOptions};
use sluice::source::build_source;

use crate::cli::output::outln;

/// Exit status of a file run stopped (by a signal) before the end of its file.
pub const STOPPED_BEFORE_END: u8 = 3;

pub async fn run(config: &Config, idle: Option<Duration>) -> anyhow::Result<ExitCode> {
    let pipeline = Pipeline::prepare(config)
        .await
        .context("cannot start the pipeline")?;
    let stats = pipeline.stats();
    let source = build_source(config, stats.clone())
        .await
        .context("cannot start the source")?;
    let options = RunOptions {
        exit_when_idle: idle,
        handle_signals: true,
        ..RunOptions::default()
    };
    // A run that could not start has nothing to sum up: its error alone is the answer.
    let running = pipeline
        .start(source, options)
        .await
        .context("cannot start the pipeline")?;
    let result = running.finish().await;
    let summary = stats.summary();
    outln!("{summary}");
    result.context("the pipeline stopped")?;
    if summary.stopped_before_end {
        tracing::warn!(
            "stopped before the end of the file: what was committed is recorded; run again to continue after it"
        );
        return Ok(ExitCode::from(STOPPED_BEFORE_END));
    }
    if summary.released > 0 {
        tracing::info!(
            released = summary.released,
            "unprocessed messages were handed back to the source"
        );
    }
    Ok(ExitCode::SUCCESS)
}
