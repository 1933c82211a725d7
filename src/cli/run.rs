//! `sluice run`: the daemon.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sluice::config::Config;
use sluice::pipeline::{Pipeline, RunOptions, build_source};

pub async fn run(config: &Config, exit_when_idle: Option<f64>) -> anyhow::Result<ExitCode> {
    let idle = match exit_when_idle {
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            anyhow::bail!("--exit-when-idle must be a non-negative number of seconds, got {s}")
        }
        None => None,
    };
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
    };
    let result = pipeline.run(source, options).await;
    let summary = stats.summary();
    println!("{summary}");
    result.context("the pipeline stopped")?;
    if summary.released > 0 {
        tracing::info!(
            released = summary.released,
            "unprocessed messages were handed back to the source"
        );
    }
    Ok(ExitCode::SUCCESS)
}
