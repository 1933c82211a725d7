//! `sluice unmask` and `sluice keygen`: the keyring's two operations outside the daemon.
//!
//! Unmasking is what makes `mask.mode = "aes-siv"` recoverable, and it is deliberately a separate,
//! explicit command that needs the keyring: the daemon only ever seals. Values come from the
//! command line or, one per line, from standard input (a column piped out of `psql`), and the
//! recovered values are printed in the same order, one per line. The first value that cannot be
//! opened stops the command with exit 1 and says why, so a column's output never silently loses
//! its alignment with the input.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use sluice::stage::mask::MaskKey;
use sluice::stage::seal::{KEY_ID_MAX, Keyring, generate_entry};

use crate::cli::output::{self, errln, outln};

pub fn unmask(key_file: Option<PathBuf>, values: Vec<String>) -> ExitCode {
    let from_env = std::env::var("SLUICE_MASK_KEY")
        .ok()
        .filter(|v| !v.is_empty());
    let ring = match MaskKey::load(from_env.as_deref(), key_file.as_deref())
        .and_then(|key| key.keyring())
    {
        Ok(ring) => ring,
        Err(e) => {
            errln!("sluice: error: {}", sluice::error_chain::Chain(&e));
            return ExitCode::from(2);
        }
    };
    let outcome = if values.is_empty() {
        let stdin = std::io::stdin().lock();
        let lines = stdin.lines().map_while(Result::ok);
        open_all(&ring, lines.filter(|l| !l.trim().is_empty()))
    } else {
        open_all(&ring, values.into_iter())
    };
    match (outcome, output::finish()) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (Err(message), _) => {
            errln!("sluice: error: {message}");
            ExitCode::FAILURE
        }
        (Ok(()), Err(e)) => {
            errln!("sluice: error: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open_all(ring: &Keyring, values: impl Iterator<Item = String>) -> Result<(), String> {
    for (i, value) in values.enumerate() {
        let value = value.trim();
        let plain = ring
            .open(value)
            .map_err(|e| format!("value {} ({value:?}): {e}", i + 1))?;
        outln!("{}", String::from_utf8_lossy(&plain));
    }
    Ok(())
}

/// Prints a new keyring entry `ID:BASE64KEY` (64 random bytes).
pub fn keygen(id: &str) -> ExitCode {
    let valid = (1..=KEY_ID_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        errln!(
            "sluice: error: the key id {id:?} must be 1 to {KEY_ID_MAX} letters, digits, `-` or `_`"
        );
        return ExitCode::from(2);
    }
    outln!("{}", generate_entry(id));
    match output::finish() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("sluice: error: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}
