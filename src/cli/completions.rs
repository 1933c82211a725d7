//! `sluice completions SHELL`: a completion script, generated from the same grammar that parses the
//! command line, so it cannot fall behind it.

use std::process::ExitCode;

use clap::CommandFactory;

use crate::cli::args::Args;
use crate::cli::output::{self, errln};

pub fn print(shell: clap_complete::Shell) -> ExitCode {
    // Generated into memory first: the generators panic when their writer fails, as writing into a
    // closed pipe does.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Args::command(), "sluice", &mut script);
    output::bytes(&script);
    match output::finish() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("sluice: error: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}
