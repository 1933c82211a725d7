//! `sluice run`: the daemon.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sluice::config::Config;
use sluice::pipeline::{Pipeline, PipelineError, RunOptions};
use sluice::source::build_source;

use crate::cli::args::SummaryFormat;
use crate::cli::output::outln;

/// Exit status of a file run stopped (by a signal) before the end of its file.
pub const STOPPED_BEFORE_END: u8 = 3;

pub async fn run(
    config: &Config,
    idle: Option<Duration>,
    format: SummaryFormat,
) -> anyhow::Result<ExitCode> {
    let pipeline = match Pipeline::prepare(config).await {
        Ok(pipeline) => pipeline,
        // A key KMS will not give is a configuration that cannot be used, like a bad file.
        Err(e @ PipelineError::Kms(_)) => {
            let e = anyhow::Error::from(e).context("cannot start the pipeline");
            crate::cli::telemetry::fatal(&config.log, &format!("{e:#}"));
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e).context("cannot start the pipeline"),
    };
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
    match format {
        SummaryFormat::Text => outln!("{summary}"),
        // A struct of integers always serializes.
        SummaryFormat::Json => match serde_json::to_string(&summary) {
            Ok(json) => outln!("{json}"),
            Err(e) => tracing::error!(error = %e, "cannot print the summary as JSON"),
        },
    }
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
