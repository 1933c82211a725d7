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
  SLUICE_DATABASE_CA_FILE  overrides sink.postgres.ca_file (CAs for sslmode=verify-*)
  SLUICE_SQS_QUEUE_URL     overrides source.sqs.queue_url and queue_name
  SLUICE_SQS_ENDPOINT_URL  overrides source.sqs.endpoint_url (an emulator)
  SLUICE_MASK_KEY          the masking key, over mask.key_file
  SLUICE_KMS_ENDPOINT_URL  overrides mask.kms_endpoint_url (an emulator)
  RUST_LOG                 the log filter, over log.level
  AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...
                           AWS region and credentials (the standard AWS chain)
  The SLUICE_* overrides ignore empty values.

Exit codes:
  0    success
  1    failure while running (check: a finding failed)
  2    unusable configuration (the masking key included) or command line
  3    run: a file run stopped by a signal before the end of its file (run again to continue)
  130  a second SIGINT/SIGTERM ended the drain at once";

/// Shown after the help of the keyring commands.
const UNMASK_HELP: &str = "\
Environment:
  SLUICE_MASK_KEY  the keyring when --key-file is not given

Exit codes:
  0    success
  1    a value could not be opened (wrong key, unknown key id, altered value)
  2    no usable keyring, or a mistake on the command line";

/// Shown after `keygen`'s help.
const KEYGEN_HELP: &str = "\
Environment:
  SLUICE_KMS_ENDPOINT_URL  a KMS endpoint (an emulator) for --kms-key-id
  AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...
                           AWS region and credentials for --kms-key-id

Exit codes:
  0    success
  1    KMS refused or did not answer
  2    a mistake on the command line";

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
        /// How the final summary is printed on stdout: one text line, or one JSON object for
        /// scripts.
        #[arg(long, value_name = "FORMAT", value_enum, default_value_t = SummaryFormat::Text)]
        summary: SummaryFormat,
    },
    /// Send messages to the configured source (SQS queue, or the file of a file source).
    #[command(
        after_help = AFTER_HELP,
        group(clap::ArgGroup::new("messages").required(true).args(["file", "count"]))
    )]
    Seed {
        #[command(flatten)]
        config: ConfigFile,
        /// JSON array or NDJSON of message bodies, gzip or not.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Generate this many realistic login events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Seed for --count (same seed, same messages); random if not given.
        #[arg(long, value_name = "S", requires = "count", conflicts_with = "file")]
        seed: Option<u64>,
        /// With --count: make every K-th message one of the wrong type.
        #[arg(long, value_name = "K", requires = "count", conflicts_with = "file")]
        bad_every: Option<u64>,
        /// Do not attach dedupe ids (then re-seeding the same messages loads them again).
        #[arg(long)]
        no_dedupe_id: bool,
        /// Write the messages to this file (NDJSON, gzip if it ends in .gz) instead of the
        /// configured source.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Replace the file of a file source if it exists (without it, seed refuses).
        #[arg(long, conflicts_with = "out")]
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
    /// Recover values sealed with `mask.mode = "aes-siv"` (from the arguments, or one per line on
    /// stdin), one per line in the same order.
    #[command(after_help = UNMASK_HELP)]
    Unmask {
        /// The keyring file (`ID:BASE64KEY` entries); without it, SLUICE_MASK_KEY holds the keyring.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Sealed values (`ID:BASE64URL`), e.g. a `masked_ip`; none: read them from stdin.
        #[arg(value_name = "VALUE")]
        values: Vec<String>,
    },
    /// Print a new masking key: a keyring entry `ID:BASE64KEY` (64 random bytes) for
    /// `mask.mode = "aes-siv"`, or with --kms-key-id a data key encrypted under that KMS key
    /// (`[ID:]CIPHERTEXT`, for `mask.kms_data_keys`).
    #[command(after_help = KEYGEN_HELP)]
    Keygen {
        /// The new key's id (1 to 8 letters, digits, `-` or `_`), carried by every value it seals;
        /// required without --kms-key-id.
        #[arg(long, value_name = "ID", required_unless_present = "kms_key_id")]
        id: Option<String>,
        /// Generate the data key with AWS KMS under this key (id, ARN or alias) and print only
        /// its ciphertext, base64; the plaintext is never shown.
        #[arg(long, value_name = "KEY")]
        kms_key_id: Option<String>,
    },
    /// Print a completion script for a shell (e.g. `source <(sluice completions bash)`).
    Completions {
        /// The shell to complete in.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// The shape of `sluice run`'s final summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SummaryFormat {
    // Variants without doc comments: with them clap switches every option's help to its long,
    // multi-paragraph layout.
    // `sluice: received=N loaded=N rejected=N duplicates=N`
    Text,
    // `{"received":N,"loaded":N,…}` on one line
    Json,
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
