//! Project chores that outgrew the shell: `cargo xtask memory-runs` measures the release binary's
//! peak memory and end-to-end rate on generated files, and `cargo xtask capacity-report` writes
//! `docs/capacity.md` from what the benchmarks and the memory runs have just measured.
//!
//! They live in a crate of their own (the cargo `xtask` convention) so that the arithmetic behind
//! the published figures is typed, unit-tested Rust, while `make bench` stays the one command an
//! operator runs. Neither command links the `sluice` library: the memory runs drive the binary
//! from outside, as an operator would, and the report reads files.

mod memory;
mod report;
mod stats;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "sluice's project chores", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run `target/release/sluice` on generated files of COUNT messages, several times each, and
    /// save the median peak RSS, wall and CPU time in target/bench/memory-COUNT.json.
    MemoryRuns {
        /// Message counts, one run series each.
        #[arg(required = true)]
        counts: Vec<u64>,
        /// Runs per count; the median run is kept. Five, because single runs' peak RSS differs by
        /// several MiB (how many encoded batches are alive at the peak), and the growth check
        /// compares two medians.
        #[arg(long, default_value_t = 5, env = "SLUICE_BENCH_MEMORY_RUNS")]
        runs: usize,
    },
    /// Write docs/capacity.md from criterion's results and the side results in target/bench.
    CapacityReport(report::Options),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::MemoryRuns { counts, runs } => memory::run_all(&counts, runs),
        Command::CapacityReport(options) => report::write(&options),
    }
}

/// The repository's root (this crate's parent directory).
fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the repository")
}

/// Cargo's target directory, as the benchmarks find it: `$CARGO_TARGET_DIR` or `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Where the benchmarks' side results and the memory runs' files go.
fn bench_dir() -> PathBuf {
    target_dir().join("bench")
}

/// `path` relative to the repository when it lies inside it, as given otherwise.
fn shown(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}
