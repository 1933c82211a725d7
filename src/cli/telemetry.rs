//! Logging: human-readable by default, JSON lines on request, always on stderr so that stdout carries
//! only what scripts read (the run summary, reports).

use std::io::IsTerminal;

use serde::Serialize;
use sluice::config::{LogConfig, LogFormat};
use tracing::{Level, Metadata};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, filter};

use crate::cli::output::errln;

pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(filter::filter_fn(not_driver_detail));
    match config.format {
        LogFormat::Human => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).init(),
    }
}

/// PostgreSQL's driver logs every statement's parameters at `debug` (dead letters' raw bodies,
/// user ids): its events below `info` never print, whatever `log.level` or `RUST_LOG` asks for.
fn not_driver_detail(meta: &Metadata<'_>) -> bool {
    !(meta.target().starts_with("tokio_postgres") && *meta.level() > Level::INFO)
}

/// Says why the command failed, as its last line on stderr: with JSON logs a JSON object shaped like
/// the log lines (so a collector parsing them never meets a stray text line), else
/// `sluice: error: …`. Written directly rather than as a log event so that no level filter
/// (`log.level`, `RUST_LOG`) can hide it.
pub fn fatal(config: &LogConfig, message: &str) {
    #[derive(Serialize)]
    struct Line<'a> {
        timestamp: String,
        level: &'static str,
        message: &'a str,
        target: &'static str,
    }
    if config.format == LogFormat::Json {
        let line = Line {
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            level: "ERROR",
            message,
            target: "sluice",
        };
        if let Ok(json) = serde_json::to_string(&line) {
            return errln!("{json}");
        }
    }
    errln!("sluice: error: {message}");
}
