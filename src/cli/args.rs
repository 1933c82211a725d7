//! The command line's grammar: commands, options and the help that explains them.
//!
//! Every command but `completions` reads one configuration file, found by `--config`, `-c` or
//! `SLUICE_CONFIG`, in that order, so that a deployment can set it once in the environment. The
//! help ends with what `--help` is usually asked for beyond the options: which environment
//! variables override the file, and what the exit codes mean.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Shown after every command's help.
const AFTER_HELP: &str = "\
Environment:
  SLUICE_CONFIG            the configuration file when --config is not given
  SLUICE_DATABASE_URL      overrides sink.postgres.url (the place for a password)
  SLUICE_SQS_QUEUE_URL     overrides source.sqs.queue_url and queue_name
  SLUICE_SQS_ENDPOINT_URL  overrides source.sqs.endpoint_url (an emulator)
  SLUICE_MASK_KEY          the masking key, over mask.key_file
  RUST_LOG                 the log filter, over log.level
  AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...
                           AWS region and credentials (the standard AWS chain)
  The SLUICE_* overrides ignore empty values.

Exit codes:
  0    success
  1    failure while running (check: a finding failed)
  2    unusable configuration or command line
  3    run: a file run stopped by a signal before the end of its file (run again to continue)
  130  a second SIGINT/SIGTERM ended the drain at once";

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Streams login events from SQS (or files) into PostgreSQL: validated, PII masked, nothing dropped silently.",
    after_help = AFTER_HELP
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

/// The configuration file option every command but `completions` takes.
#[derive(clap::Args)]
pub struct ConfigFile {
    /// The configuration file (TOML; config/example.toml lists every key).
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        env = "SLUICE_CONFIG"
    )]
    pub path: PathBuf,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the pipeline until SIGINT/SIGTERM, the end of a file source, or idleness.
    #[command(after_help = AFTER_HELP)]
    Run {
        #[command(flatten)]
        config: ConfigFile,
        /// Exit 0 once the source has returned nothing for this long and everything received is
        /// committed and acknowledged.
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        exit_when_idle: Option<std::time::Duration>,
    },
    /// Send messages to the configured source (SQS queue, or the file of a file source).
    #[command(after_help = AFTER_HELP)]
    Seed {
        #[command(flatten)]
        config: ConfigFile,
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
    #[command(after_help = AFTER_HELP)]
    Migrate {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Validate the configuration and reach the source and PostgreSQL; exit non-zero on any problem.
    #[command(after_help = AFTER_HELP)]
    Check {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Print what has landed: row and dead-letter counts, reject reasons, sample rows, queue depth.
    #[command(after_help = AFTER_HELP)]
    Report {
        #[command(flatten)]
        config: ConfigFile,
        /// Sample rows to show.
        #[arg(long, value_name = "N", default_value_t = 5)]
        rows: i64,
    },
    /// Print a completion script for a shell (e.g. `source <(sluice completions bash)`).
    Completions {
        /// The shell to complete in.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_grammar_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn every_option_and_argument_has_help() {
        let args = Args::command();
        for command in args.get_subcommands() {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "`{} {id}` has no help text",
                    command.get_name()
                );
            }
        }
    }

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(
            parse_seconds(" 1.5 "),
            Ok(std::time::Duration::from_millis(1500))
        );
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("1e20").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
