//! What the report reads: criterion's results, the PostgreSQL benchmark's side results, the
//! memory runs, and facts about the machine. Nothing in the report is typed in by hand.
//!
//! A report never mixes runs: with `--since`, a result file older than that moment is ignored
//! (criterion) or refused (side results), so a benchmark that did not run this time cannot lend
//! its old figure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::shown;

/// One criterion benchmark: its median time per iteration and the elements per iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct Bench {
    pub id: String,
    pub group: String,
    pub function: String,
    pub value: Option<String>,
    pub elements: f64,
    /// Median nanoseconds per iteration and its 95% confidence interval.
    pub ns: f64,
    pub ns_low: f64,
    pub ns_high: f64,
}

impl Bench {
    /// Elements per second at the median.
    pub fn rate(&self) -> f64 {
        self.elements / (self.ns * 1e-9)
    }

    /// Elements per second at the slow end of the confidence interval.
    pub fn rate_low(&self) -> f64 {
        self.elements / (self.ns_high * 1e-9)
    }

    /// Elements per second at the fast end of the confidence interval.
    pub fn rate_high(&self) -> f64 {
        self.elements / (self.ns_low * 1e-9)
    }

    pub fn ns_per_element(&self) -> f64 {
        self.ns / self.elements
    }

    /// The benchmark's parameter as a number (chunk size, rows per batch).
    pub fn size(&self) -> u64 {
        self.value
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// criterion's `new/benchmark.json`.
#[derive(Deserialize)]
struct BenchmarkFile {
    full_id: String,
    group_id: String,
    function_id: Option<String>,
    value_str: Option<String>,
    throughput: Option<BTreeMap<String, f64>>,
}

/// criterion's `new/estimates.json` (the part the report uses).
#[derive(Deserialize)]
struct EstimatesFile {
    median: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
    confidence_interval: Interval,
}

#[derive(Deserialize)]
struct Interval {
    lower_bound: f64,
    upper_bound: f64,
}

/// Every fresh criterion result under a directory, found by group, function and value.
pub struct Criterion {
    results: Vec<Bench>,
}

impl Criterion {
    pub fn load(dir: &Path, since: Option<SystemTime>) -> Result<Self> {
        let mut results = Vec::new();
        for bench_file in find_files(dir, "benchmark.json")? {
            let estimates_file = bench_file.with_file_name("estimates.json");
            if bench_file.parent().and_then(Path::file_name) != Some("new".as_ref())
                || !estimates_file.exists()
                || !is_fresh(&estimates_file, since)?
            {
                continue;
            }
            let bench: BenchmarkFile = read_json(&bench_file)?;
            let estimates: EstimatesFile = read_json(&estimates_file)?;
            let elements = bench
                .throughput
                .as_ref()
                .and_then(|t| t.get("Elements").or_else(|| t.get("Bytes")).copied())
                .with_context(|| {
                    format!(
                        "{}: no element throughput in {}",
                        bench.full_id,
                        shown(&bench_file)
                    )
                })?;
            let median = estimates.median;
            results.push(Bench {
                id: bench.full_id,
                group: bench.group_id,
                function: bench.function_id.unwrap_or_default(),
                value: bench.value_str,
                elements,
                ns: median.point_estimate,
                ns_low: median.confidence_interval.lower_bound,
                ns_high: median.confidence_interval.upper_bound,
            });
        }
        Ok(Self { results })
    }

    /// Results already in hand (the report's tests build them).
    #[cfg(test)]
    pub fn from_results(results: Vec<Bench>) -> Self {
        Self { results }
    }

    /// The one result of `group/function`.
    pub fn one(&self, group: &str, function: &str) -> Result<Bench> {
        match self.all(group, function)?.as_slice() {
            [one] => Ok(one.clone()),
            several => bail!(
                "several fresh results for {group}/{function}: {}; remove stale ones from target/criterion",
                several
                    .iter()
                    .map(|b| b.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Every result of `group/function`, smallest parameter first; at least one.
    pub fn all(&self, group: &str, function: &str) -> Result<Vec<Bench>> {
        let mut found: Vec<Bench> = self
            .results
            .iter()
            .filter(|b| b.group == group && b.function == function)
            .cloned()
            .collect();
        if found.is_empty() {
            bail!(
                "no fresh criterion result for {group}/{function}; run the benchmarks first (`make bench`)"
            );
        }
        found.sort_by_key(Bench::size);
        Ok(found)
    }
}

/// `target/bench/postgres-run.json`, written by `cargo bench --bench postgres`.
#[derive(Debug, Clone, Deserialize)]
pub struct PostgresRun {
    pub paired_seconds: Vec<PairedRound>,
    /// The sink without a commit record, with the ledger and with Kinesis checkpoints, back to
    /// back; absent from runs before they were measured (named for the ledger alone in the first
    /// runs that paired it).
    #[serde(default, alias = "ledger_paired_seconds")]
    pub sink_paired_seconds: Vec<SinkPairedRound>,
    pub server_version: String,
    pub synchronous_commit: String,
    pub fsync: String,
    pub shared_buffers: String,
    pub pipeline: PipelineCounts,
}

/// One round that ran the pipeline and the COPY ceiling back to back, and the pipeline with
/// Kinesis checkpoints beside them: seconds each.
#[derive(Debug, Clone, Deserialize)]
pub struct PairedRound {
    pub pipeline: f64,
    pub ceiling: f64,
    /// The pipeline with its messages read from each shard count measured; absent from runs before
    /// they were paired.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointSide>,
}

/// One round that ran the sink without a commit record, with the dedupe ledger and with Kinesis
/// checkpoints back to back: seconds per batch.
#[derive(Debug, Clone, Deserialize)]
pub struct SinkPairedRound {
    pub plain: f64,
    /// Messages known by SQS message id (ordered keys).
    pub ledger: f64,
    /// Messages known by a producer's key (unordered); absent from the first runs that paired.
    #[serde(default)]
    pub producer_ledger: Option<f64>,
    /// Batches spread over each shard count measured; absent from runs before they were paired.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointSide>,
}

/// The sink or the pipeline with Kinesis checkpoints, its messages spread over `shards` shards:
/// seconds per batch (sink) or per run (pipeline).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct CheckpointSide {
    pub shards: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct PipelineCounts {
    pub messages: u64,
    pub loaded: u64,
    pub rejected: u64,
}

/// The machine the figures were measured on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: Option<f64>,
    pub kernel: String,
    pub rustc: String,
}

impl Machine {
    pub fn this_one() -> Self {
        let proc_line = |file: &str, prefix: &str| -> Option<String> {
            let text = std::fs::read_to_string(file).ok()?;
            let line = text.lines().find(|l| l.starts_with(prefix))?;
            Some(line.split_once(':')?.1.trim().to_owned())
        };
        let proc_value = |file: &str| std::fs::read_to_string(file).map(|s| s.trim().to_owned());
        let rustc = std::process::Command::new("rustc")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu: proc_line("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown CPU".into()),
            memory_gib: proc_line("/proc/meminfo", "MemTotal")
                .and_then(|kib| kib.trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kib| kib / 1024.0 / 1024.0),
            kernel: format!(
                "{} {}",
                proc_value("/proc/sys/kernel/ostype")
                    .unwrap_or_else(|_| std::env::consts::OS.into()),
                proc_value("/proc/sys/kernel/osrelease").unwrap_or_default()
            ),
            rustc: rustc.unwrap_or_else(|| "rustc (version unknown)".into()),
        }
    }
}

/// A side result written during this run.
pub fn load_fresh<T: DeserializeOwned>(
    path: &Path,
    since: Option<SystemTime>,
    what: &str,
) -> Result<T> {
    if !path.exists() {
        bail!("{} is missing; {what}", shown(path));
    }
    if !is_fresh(path, since)? {
        bail!("{} is older than this run; {what}", shown(path));
    }
    read_json(path)
}

/// The system load average when the run started, if `make bench` recorded it during this run.
pub fn load_average(path: &Path, since: Option<SystemTime>) -> Option<f64> {
    if !path.exists() || !is_fresh(path, since).ok()? {
        return None;
    }
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The Unix time written in `path` (what `date +%s` prints), if the file is as fresh as `since`.
pub fn unix_time_in(path: &Path, since: Option<SystemTime>) -> Option<i64> {
    if !path.exists() || !is_fresh(path, since).ok()? {
        return None;
    }
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Seconds since the Unix epoch as a time.
pub fn unix_time(seconds: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(seconds.max(0.0))
}

fn is_fresh(path: &Path, since: Option<SystemTime>) -> Result<bool> {
    let Some(since) = since else { return Ok(true) };
    let modified = std::fs::metadata(path)?.modified()?;
    Ok(modified >= since)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", shown(path)))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not what was expected", shown(path)))
}

/// Every file called `name` under `dir`, at any depth.
fn find_files(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name() == Some(name.as_ref()) {
                found.push(path);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(value: &str, elements: f64, ns: f64) -> Bench {
        Bench {
            id: format!("g/f/{value}"),
            group: "g".into(),
            function: "f".into(),
            value: Some(value.into()),
            elements,
            ns,
            ns_low: ns * 0.9,
            ns_high: ns * 1.25,
        }
    }

    /// The facts a run writes beside the pipeline's counts, with the given sink rounds.
    fn run_facts(sink_rounds: &str) -> String {
        format!(
            r#"{{"paired_seconds": [{{"pipeline": 1.0, "ceiling": 0.9}}], {sink_rounds}
                "server_version": "15", "synchronous_commit": "on", "fsync": "on",
                "shared_buffers": "128MB",
                "pipeline": {{"messages": 10, "loaded": 9, "rejected": 1}}}}"#
        )
    }

    #[test]
    fn sink_rounds_are_read_from_this_runs_facts_and_from_older_ones() {
        let now: PostgresRun = serde_json::from_str(&run_facts(
            r#""sink_paired_seconds": [{"plain": 0.003, "ledger": 0.006, "producer_ledger": 0.007,
                "checkpoints": [{"shards": 4, "seconds": 0.0045}, {"shards": 64, "seconds": 0.005}]}],"#,
        ))
        .unwrap();
        let round = &now.sink_paired_seconds[0];
        assert_eq!(round.producer_ledger, Some(0.007));
        let shards: Vec<u64> = round.checkpoints.iter().map(|k| k.shards).collect();
        assert_eq!(shards, [4, 64]);
        // Before the checkpoints were paired, the rounds were the ledger's alone.
        let older: PostgresRun = serde_json::from_str(&run_facts(
            r#""ledger_paired_seconds": [{"plain": 0.003, "ledger": 0.006}],"#,
        ))
        .unwrap();
        let round = &older.sink_paired_seconds[0];
        assert_eq!((round.plain, round.ledger), (0.003, 0.006));
        assert!(round.producer_ledger.is_none() && round.checkpoints.is_empty());
        // And before any sink rounds, none.
        let oldest: PostgresRun = serde_json::from_str(&run_facts("")).unwrap();
        assert!(oldest.sink_paired_seconds.is_empty());
    }

    #[test]
    fn rate_is_elements_per_second_at_the_median() {
        let b = bench("1", 1000.0, 1e6);
        assert_eq!(b.rate(), 1_000_000.0);
        assert_eq!(b.ns_per_element(), 1000.0);
        assert!((b.rate_low() - 800_000.0).abs() < 1e-6);
        assert!(b.rate_high() > b.rate());
    }

    #[test]
    fn results_are_sorted_by_their_numeric_parameter() {
        let criterion = Criterion {
            results: vec![
                bench("1000", 1.0, 1.0),
                bench("10", 1.0, 1.0),
                bench("100", 1.0, 1.0),
            ],
        };
        let sizes: Vec<u64> = criterion
            .all("g", "f")
            .unwrap()
            .iter()
            .map(Bench::size)
            .collect();
        assert_eq!(sizes, [10, 100, 1000]);
        assert!(
            criterion.one("g", "f").is_err(),
            "three results are not one"
        );
        assert!(criterion.all("g", "other").is_err());
    }

    #[test]
    fn criterion_files_are_read_from_new_directories_only() {
        let dir = std::env::temp_dir().join(format!("xtask-criterion-{}", std::process::id()));
        for (sub, ns) in [("new", 2000.0), ("base", 1.0)] {
            let d = dir.join("parse/parse_chunk/256").join(sub);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("benchmark.json"),
                r#"{"group_id":"parse","function_id":"parse_chunk","value_str":"256","throughput":{"Elements":256},"full_id":"parse/parse_chunk/256"}"#,
            )
            .unwrap();
            std::fs::write(
                d.join("estimates.json"),
                format!(r#"{{"median":{{"point_estimate":{ns},"confidence_interval":{{"confidence_level":0.95,"lower_bound":1900.0,"upper_bound":2100.0}}}}}}"#),
            )
            .unwrap();
        }
        let criterion = Criterion::load(&dir, None).unwrap();
        let parse = criterion.one("parse", "parse_chunk").unwrap();
        assert_eq!(
            (parse.elements, parse.ns, parse.size()),
            (256.0, 2000.0, 256)
        );
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert!(
            Criterion::load(&dir, Some(later))
                .unwrap()
                .all("parse", "parse_chunk")
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
