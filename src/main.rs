//! The `sluice` command line: parses arguments, loads the configuration, sets up logging, and hands
//! over to the command. Errors get their context here and become exit codes: 2 for a configuration
//! that cannot be used, 1 for anything that went wrong while running.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::args::{Args, Command};
use crate::cli::output::{errln, outln};

fn main() -> ExitCode {
    let args = Args::parse();
    let path = match &args.command {
        Command::Completions { shell } => return cli::completions::print(*shell),
        Command::Unmask { key_file, values } => {
            return cli::unmask::unmask(key_file.clone(), values.clone());
        }
        Command::Keygen { id, kms_key_id } => {
            return cli::unmask::keygen(id.as_deref(), kms_key_id.as_deref());
        }
        Command::Run { config, .. }
        | Command::Seed { config, .. }
        | Command::Migrate { config }
        | Command::Check { config }
        | Command::Report { config, .. } => config.path.clone(),
    };
    let config = match sluice::config::Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            // `check` reports a bad file as one of its findings.
            let e = anyhow::Error::from(e);
            if matches!(args.command, Command::Check { .. }) {
                outln!("config      FAIL  {e:#}");
            }
            errln!("sluice: {e:#}");
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
            Command::Run {
                exit_when_idle,
                summary,
                ..
            } => cli::run::run(&config, exit_when_idle, summary).await,
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
            // Done above, before any configuration is read.
            Command::Completions { .. } | Command::Unmask { .. } | Command::Keygen { .. } => {
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    // Long polls and background connections need not finish: everything that matters is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            cli::telemetry::fatal(&config.log, &format!("{e:#}"));
            exit_code_of(&e)
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

/// 2 when the configuration turned out unusable once a command looked closer (the masking key is
/// read only by the commands that mask), 1 for anything that failed while running.
fn exit_code_of(error: &anyhow::Error) -> ExitCode {
    use sluice::pipeline::PipelineError;
    let unusable = error.chain().any(|cause| {
        cause.is::<sluice::config::ConfigError>()
            || cause.is::<sluice::stage::mask::KeyError>()
            || matches!(
                cause.downcast_ref::<PipelineError>(),
                Some(PipelineError::Config(_))
            )
    });
    if unusable {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}
