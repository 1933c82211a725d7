//! The memory runs: the release binary loads a generated NDJSON file through a file source, as an
//! operator runs a backfill, and we record its peak RSS, wall and CPU time.
//!
//! The binary is measured from outside (the kernel's `wait4` rusage, what `/usr/bin/time` reads),
//! so the figure includes everything the process holds: allocator, runtime, buffers. Each count
//! runs several times into a throwaway schema that is dropped after the run; the report takes the
//! median run, since one run on a shared machine can be slow or fat for reasons of its own.
//!
//! The configuration is the default one (channel capacities, chunk size, self-sizing batches up to
//! `batch_rows`), as a new user would run it: only the file and the tables are named. The database
//! is `SLUICE_DATABASE_URL`, as for the daemon (`make bench` loads `.stack/env`).
//!
//! After each run, in the same schema, PostgreSQL's own client loads the same rows: `psql \copy`
//! (text format, one transaction) of the rows the run loaded, already transformed, into an identical
//! empty table. Runs and copies alternate, so both see the same machine; the ratio of the two is
//! the figure an operator can reproduce without reading any code.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::{bench_dir, shown, stats, target_dir};

/// The most rows per transaction: the default `sink.postgres.batch_rows`, which these runs keep.
const BATCH_ROWS: u64 = 10_000;
/// The masking key of these runs; any key of 16+ bytes costs the same.
const MASK_KEY: &str = "capacity-bench-mask-key-0123456789";

/// What `memory-runs` saves for one message count, and what the capacity report reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryResult {
    pub messages: u64,
    pub runs: usize,
    pub file_bytes: u64,
    /// Bytes per message, without the newline.
    pub avg_message_bytes: f64,
    /// Median over the runs (peak RSS and each time taken on its own).
    pub max_rss_mib: f64,
    pub max_rss_mib_min: f64,
    pub max_rss_mib_max: f64,
    pub wall_seconds: f64,
    pub user_seconds: f64,
    pub system_seconds: f64,
    /// Messages over the median wall time.
    pub messages_per_second: f64,
    pub received: u64,
    pub loaded: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub batch_rows: u64,
    pub each_run: Vec<RunUsage>,
    /// `psql \copy` of the loaded rows into an identical table, after each run: median seconds.
    #[serde(default)]
    pub psql_copy_seconds: f64,
    /// Each round's sluice rows per second over psql's (same rows, back to back): their median.
    #[serde(default)]
    pub vs_psql: f64,
    #[serde(default)]
    pub each_psql_copy_seconds: Vec<f64>,
    pub measured_at: String,
}

/// One run of the binary, as the kernel accounted it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunUsage {
    pub max_rss_kib: u64,
    pub wall_seconds: f64,
    pub user_seconds: f64,
    pub system_seconds: f64,
}

/// The counts of the line the binary prints on exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub received: u64,
    pub loaded: u64,
    pub rejected: u64,
    pub duplicates: u64,
}

/// The path of the result file of `count` messages.
pub fn result_path(count: u64) -> PathBuf {
    bench_dir().join(format!("memory-{count}.json"))
}

pub fn run_all(counts: &[u64], runs: usize) -> Result<()> {
    ensure!(runs > 0, "the number of runs must be positive");
    let binary = std::env::var_os("SLUICE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/sluice"));
    ensure!(
        binary.is_file(),
        "{} is missing; run `cargo build --release --bins` first",
        shown(&binary)
    );
    let database_url = std::env::var("SLUICE_DATABASE_URL").context(
        "SLUICE_DATABASE_URL is not set; run `make up` and `set -a && . .stack/env && set +a`",
    )?;
    std::fs::create_dir_all(bench_dir())?;
    for &count in counts {
        ensure!(count > 0, "not a message count: {count}");
        let result = measure_count(&binary, &database_url, count, runs)?;
        let path = result_path(count);
        std::fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")
            .with_context(|| format!("cannot write {}", shown(&path)))?;
    }
    Ok(())
}

fn measure_count(
    binary: &Path,
    database_url: &str,
    count: u64,
    runs: usize,
) -> Result<MemoryResult> {
    let dir = bench_dir();
    let data = dir.join(format!("logins-{count}.ndjson"));
    let config = dir.join(format!("memory-{count}.toml"));
    let schema = format!("bench_mem_{}_{count}", std::process::id());
    std::fs::write(&config, run_config(&data, &schema))?;
    if line_count(&data).ok() != Some(count) {
        eprintln!(
            "memory-runs: generating {count} messages into {}",
            shown(&data)
        );
        let status = Command::new(binary)
            .args(["seed", "--config"])
            .arg(&config)
            .args([
                "--count",
                &count.to_string(),
                "--seed",
                "1",
                "--bad-every",
                "50",
                // A file of the wrong length is ours to replace.
                "--force",
            ])
            .stderr(Stdio::null())
            .status()?;
        ensure!(status.success(), "sluice seed failed ({status})");
    }
    let file_bytes = std::fs::metadata(&data)?.len();
    let rows = dir.join(format!("rows-{count}.txt"));

    let mut usages = Vec::with_capacity(runs);
    let mut copies = Vec::with_capacity(runs);
    let mut summary = Summary::default();
    for run in 1..=runs {
        eprintln!("memory-runs: {count} messages, run {run} of {runs} (schema {schema})");
        let (usage, run_summary, copy_seconds) = {
            let _schema = DroppedSchema {
                database_url,
                schema: &schema,
            };
            let (usage, run_summary) = run_once(binary, &config, count)?;
            if run == 1 {
                export_rows(database_url, &schema, &rows)?;
            }
            (usage, run_summary, psql_copy(database_url, &schema, &rows)?)
        };
        eprintln!(
            "memory-runs: peak RSS {:.1} MiB, {:.2} s wall, {:.0} messages/s; psql \\copy of its {} rows {:.2} s",
            usage.max_rss_kib as f64 / 1024.0,
            usage.wall_seconds,
            count as f64 / usage.wall_seconds,
            run_summary.loaded,
            copy_seconds
        );
        usages.push(usage);
        copies.push(copy_seconds);
        summary = run_summary;
    }
    summarize(count, file_bytes, &usages, &copies, summary)
}

/// Saves the rows a run loaded, in `COPY`'s text format, for psql to load again.
fn export_rows(database_url: &str, schema: &str, rows: &Path) -> Result<()> {
    psql(
        database_url,
        &format!(
            "\\copy (SELECT * FROM \"{schema}\".user_logins) TO '{}'",
            rows.display()
        ),
    )
}

/// Times `psql \copy` of `rows` into a new table shaped like the run's: PostgreSQL's own bulk load
/// of the same rows, in one transaction, as an operator would type it.
fn psql_copy(database_url: &str, schema: &str, rows: &Path) -> Result<f64> {
    psql(
        database_url,
        &format!(
            "CREATE TABLE \"{schema}\".psql_copy (LIKE \"{schema}\".user_logins INCLUDING ALL)"
        ),
    )?;
    let started = Instant::now();
    psql(
        database_url,
        &format!("\\copy \"{schema}\".psql_copy FROM '{}'", rows.display()),
    )?;
    Ok(started.elapsed().as_secs_f64())
}

fn psql(database_url: &str, command: &str) -> Result<()> {
    let status = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            database_url,
            "-c",
            command,
        ])
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .stdout(Stdio::null())
        .status()
        .context("cannot run psql (PostgreSQL's client must be installed)")?;
    ensure!(status.success(), "psql failed ({status}): {command}");
    Ok(())
}

/// The median run and the range of peak RSS over `usages`; `copies` are psql's times of the same
/// rounds.
fn summarize(
    count: u64,
    file_bytes: u64,
    usages: &[RunUsage],
    copies: &[f64],
    summary: Summary,
) -> Result<MemoryResult> {
    let of = |f: fn(&RunUsage) -> f64| usages.iter().map(f).collect::<Vec<_>>();
    let rss_mib = of(|u| u.max_rss_kib as f64 / 1024.0);
    let (Some(max_rss_mib), Some((min, max))) = (stats::median(&rss_mib), stats::range(&rss_mib))
    else {
        bail!("no runs to summarize");
    };
    let median = |f| stats::median(&of(f)).unwrap_or_default();
    let wall_seconds = median(|u| u.wall_seconds);
    // Same rows both ways, so the ratio of rates is the ratio of times.
    let ratios: Vec<f64> = usages
        .iter()
        .zip(copies)
        .map(|(u, copy)| copy / u.wall_seconds)
        .collect();
    Ok(MemoryResult {
        messages: count,
        runs: usages.len(),
        file_bytes,
        avg_message_bytes: file_bytes as f64 / count as f64 - 1.0,
        max_rss_mib,
        max_rss_mib_min: min,
        max_rss_mib_max: max,
        wall_seconds,
        user_seconds: median(|u| u.user_seconds),
        system_seconds: median(|u| u.system_seconds),
        messages_per_second: count as f64 / wall_seconds,
        received: summary.received,
        loaded: summary.loaded,
        rejected: summary.rejected,
        duplicates: summary.duplicates,
        batch_rows: BATCH_ROWS,
        each_run: usages.to_vec(),
        psql_copy_seconds: stats::median(copies).unwrap_or_default(),
        vs_psql: stats::median(&ratios).unwrap_or_default(),
        each_psql_copy_seconds: copies.to_vec(),
        measured_at: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    })
}

/// One run of `sluice run`, its rusage and its exit summary, checked against `count`.
fn run_once(binary: &Path, config: &Path, count: u64) -> Result<(RunUsage, Summary)> {
    let dir = bench_dir();
    let (stdout_path, log_path) = (
        dir.join(format!("memory-{count}.out")),
        dir.join(format!("memory-{count}.log")),
    );
    let started = Instant::now();
    let child = Command::new(binary)
        .args(["run", "--config"])
        .arg(config)
        .env(
            "SLUICE_MASK_KEY",
            std::env::var("SLUICE_BENCH_MASK_KEY").unwrap_or_else(|_| MASK_KEY.into()),
        )
        .stdout(File::create(&stdout_path)?)
        .stderr(File::create(&log_path)?)
        .spawn()
        .with_context(|| format!("cannot start {}", shown(binary)))?;
    let (succeeded, usage) = wait_with_usage(child.id(), started)?;
    if !succeeded {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        bail!(
            "sluice run failed on {count} messages (log: {})",
            shown(&log_path)
        );
    }
    let stdout = std::fs::read_to_string(&stdout_path)?;
    let summary = parse_summary(&stdout)
        .with_context(|| format!("no summary line in {}", shown(&stdout_path)))?;
    check_summary(&summary, count)?;
    Ok((usage, summary))
}

/// Reaps the child `pid` with `wait4`, which also returns what the kernel accounted for it.
fn wait_with_usage(pid: u32, started: Instant) -> Result<(bool, RunUsage)> {
    let pid = libc::pid_t::try_from(pid)?;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers are valid for writes for the duration of the call.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error).context("wait4");
        }
    }
    let wall_seconds = started.elapsed().as_secs_f64();
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let succeeded = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((
        succeeded,
        RunUsage {
            // Linux reports ru_maxrss in KiB.
            max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or_default(),
            wall_seconds,
            user_seconds: seconds(usage.ru_utime),
            system_seconds: seconds(usage.ru_stime),
        },
    ))
}

/// The last `sluice: received=N loaded=N rejected=N duplicates=N` line of the output.
pub fn parse_summary(output: &str) -> Option<Summary> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.starts_with("sluice: received="))?;
    let value = |key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(Summary {
        received: value("received")?,
        loaded: value("loaded")?,
        rejected: value("rejected")?,
        duplicates: value("duplicates")?,
    })
}

/// Every generated message was received and either loaded or rejected.
fn check_summary(summary: &Summary, count: u64) -> Result<()> {
    ensure!(
        summary.received == count,
        "the run received {} of {count} messages",
        summary.received
    );
    ensure!(
        summary.loaded + summary.rejected == count,
        "the run loaded {} and rejected {} of {count} messages",
        summary.loaded,
        summary.rejected
    );
    Ok(())
}

/// The file-source configuration of a memory run into `schema`.
fn run_config(data: &Path, schema: &str) -> String {
    let file = data
        .file_name()
        .map(|f| f.to_string_lossy())
        .unwrap_or_default();
    format!(
        "# Written by `cargo xtask memory-runs` for a memory run; regenerated on every run.\n\
         [source]\nkind = \"file\"\n\n\
         [source.file]\npath = \"{file}\"\n\n\
         [sink.postgres]\ntable = \"{schema}.user_logins\"\nledger_table = \"{schema}.sluice_ledger\"\n\
         dedupe = false\n\n\
         [dead_letter]\ntable = \"{schema}.user_logins_rejected\"\n"
    )
}

fn line_count(path: &Path) -> std::io::Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut lines = 0;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(lines);
        }
        lines += buffer.iter().filter(|b| **b == b'\n').count() as u64;
        let consumed = buffer.len();
        reader.consume(consumed);
    }
}

/// Drops the run's schema when the run ends, whether it succeeded or not.
struct DroppedSchema<'a> {
    database_url: &'a str,
    schema: &'a str,
}

impl Drop for DroppedSchema<'_> {
    fn drop(&mut self) {
        let dropped = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", self.database_url, "-c"])
            .arg(format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema))
            .env("PGOPTIONS", "-c client_min_messages=warning")
            .stdout(Stdio::null())
            .status();
        if !matches!(dropped, Ok(status) if status.success()) {
            eprintln!(
                "memory-runs: could not drop schema {}; drop it by hand",
                self.schema
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(rss_kib: u64, wall: f64) -> RunUsage {
        RunUsage {
            max_rss_kib: rss_kib,
            wall_seconds: wall,
            user_seconds: wall / 2.0,
            system_seconds: 0.1,
        }
    }

    #[test]
    fn summary_line_is_read_from_the_last_matching_line() {
        let out = "sluice: received=1 loaded=1 rejected=0 duplicates=0\n\
                   sluice: received=1000 loaded=980 rejected=20 duplicates=0\n";
        assert_eq!(
            parse_summary(out),
            Some(Summary {
                received: 1000,
                loaded: 980,
                rejected: 20,
                duplicates: 0
            })
        );
    }

    #[test]
    fn summary_line_missing_a_count_is_not_a_summary() {
        assert_eq!(parse_summary("sluice: received=5 loaded=5\n"), None);
        assert_eq!(parse_summary("nothing here\n"), None);
    }

    #[test]
    fn a_run_that_lost_messages_is_refused() {
        let ok = Summary {
            received: 10,
            loaded: 8,
            rejected: 2,
            duplicates: 0,
        };
        assert!(check_summary(&ok, 10).is_ok());
        assert!(check_summary(&Summary { received: 9, ..ok }, 10).is_err());
        assert!(check_summary(&Summary { loaded: 7, ..ok }, 10).is_err());
    }

    #[test]
    fn summarize_takes_each_median_on_its_own_and_the_rss_range() {
        let runs = [usage(2048, 3.0), usage(1024, 1.0), usage(3072, 2.0)];
        let result = summarize(1000, 155_000, &runs, &[6.0, 1.0, 1.0], Summary::default()).unwrap();
        assert_eq!(result.max_rss_mib, 2.0);
        assert_eq!((result.max_rss_mib_min, result.max_rss_mib_max), (1.0, 3.0));
        assert_eq!(result.wall_seconds, 2.0);
        assert_eq!(result.user_seconds, 1.0);
        assert_eq!(result.messages_per_second, 500.0);
        assert_eq!(result.avg_message_bytes, 154.0);
        assert_eq!(result.runs, 3);
        assert_eq!(result.psql_copy_seconds, 1.0);
        assert_eq!(result.vs_psql, 1.0, "ratios 2, 1 and 0.5");
    }

    #[test]
    fn run_config_names_the_data_file_beside_it_and_the_schema() {
        let config = run_config(Path::new("/x/target/bench/logins-5.ndjson"), "s1");
        assert!(config.contains("path = \"logins-5.ndjson\""));
        assert!(config.contains("table = \"s1.user_logins\""));
        assert!(!config.contains("batch_rows"), "the default batches");
    }

    #[test]
    fn line_count_counts_newlines() {
        let dir = std::env::temp_dir().join(format!("xtask-lines-{}", std::process::id()));
        std::fs::write(&dir, "a\nb\nc\n").unwrap();
        assert_eq!(line_count(&dir).unwrap(), 3);
        std::fs::remove_file(&dir).unwrap();
    }
}
