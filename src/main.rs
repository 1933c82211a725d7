//! The `sluice` command line: parses arguments, loads the configuration, sets up logging, and hands
//! over to the command. Errors get their context here and become exit codes: 2 for a configuration
//! that cannot be used, 1 for anything that went wrong while running.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cli::output::{errln, outln};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Streams login events from SQS (or files) into PostgreSQL: validated, PII masked, nothing dropped silently."
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline until SIGINT/SIGTERM, the end of a file source, or idleness.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Exit 0 once the source has returned nothing for this long and everything received is
        /// committed and acknowledged.
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        exit_when_idle: Option<std::time::Duration>,
    },
    /// Send messages to the configured source (SQS queue, or the file of a file source).
    Seed {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// JSON array or NDJSON of message bodies, gzip or not.
        #[arg(
            long,
            value_name = "PATH",
            conflicts_with = "count",
            required_unless_present = "count"
        )]
        file: Option<PathBuf>,
        /// Generate this many realistic login events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Seed for --count (same seed, same messages); random if not given.
        #[arg(long, value_name = "S", requires = "count")]
        seed: Option<u64>,
        /// With --count: make every K-th message one of the wrong type.
        #[arg(long, value_name = "K", requires = "count")]
        bad_every: Option<u64>,
        /// Do not attach dedupe ids (then re-seeding the same messages loads them again).
        #[arg(long)]
        no_dedupe_id: bool,
        /// Write the messages to this file (NDJSON, gzip if it ends in .gz) instead of the
        /// configured source.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Replace the file of a file source if it exists (without it, seed refuses).
        #[arg(long)]
        force: bool,
    },
    /// Create the target, dead-letter and ledger tables if missing (existing tables are left as they are).
    Migrate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate the configuration and reach the source and PostgreSQL; exit non-zero on any problem.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print what has landed: row and dead-letter counts, reject reasons, sample rows, queue depth.
    Report {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Sample rows to show.
        #[arg(long, default_value_t = 5)]
        rows: i64,
    },
}

/// A non-negative number of seconds, at most a year (a longer idle time is a typo, and a duration
/// beyond what the clock can represent must not crash the daemon).
fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    const MAX_SECONDS: f64 = 366.0 * 24.0 * 3600.0;
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.0..=MAX_SECONDS).contains(&seconds) {
        return Err(format!("must be between 0 and {MAX_SECONDS} seconds"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

impl Command {
    fn config_path(&self) -> &PathBuf {
        match self {
            Command::Run { config, .. }
            | Command::Seed { config, .. }
            | Command::Migrate { config }
            | Command::Check { config }
            | Command::Report { config, .. } => config,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let path = args.command.config_path().clone();
    let config = match sluice::config::Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            // `check` reports a bad file as one of its findings.
            if matches!(args.command, Command::Check { .. }) {
                outln!("config      FAIL  {e}");
            }
            errln!("sluice: {e}");
            return ExitCode::from(2);
        }
    };
    cli::telemetry::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            cli::telemetry::fatal(&config.log, &format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match args.command {
            Command::Run { exit_when_idle, .. } => cli::run::run(&config, exit_when_idle).await,
            Command::Seed {
                file,
                count,
                seed,
                bad_every,
                no_dedupe_id,
                out,
                force,
                ..
            } => {
                let what = match (file, count) {
                    (Some(path), _) => cli::seed::What::File(path),
                    (None, count) => cli::seed::What::Generate {
                        count: count.unwrap_or_default(),
                        seed,
                        bad_every,
                    },
                };
                let target = cli::seed::Target { out, force };
                cli::seed::seed(&config, what, target, !no_dedupe_id).await
            }
            Command::Migrate { .. } => cli::migrate::migrate(&config).await,
            Command::Check { .. } => cli::check::check(&config, &path).await,
            Command::Report { rows, .. } => cli::report::report(&config, rows).await,
        }
    });
    // Long polls and background connections need not finish: everything that matters is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            cli::telemetry::fatal(&config.log, &format!("{e:#}"));
            ExitCode::FAILURE
        }
    };
    match cli::output::finish() {
        Ok(()) => code,
        Err(e) => {
            let message = format!("cannot write to standard output: {e}");
            cli::telemetry::fatal(&config.log, &message);
            ExitCode::FAILURE
        }
    }
}
