//! `docs/capacity.md`, written from what the benchmarks just measured.
//!
//! Three layers, so that prose and arithmetic never mix: [`inputs`] reads the result files,
//! [`sections`] turns them into one context struct per section using the rules in [`figures`],
//! and the templates under `xtask/templates/` (MiniJinja) put the words around the numbers, with
//! the number formats of [`format`]. The templates are compiled into the binary. [`charts`] draws
//! the main comparisons from the same sections as SVG files beside the report, which links them.

mod charts;
mod figures;
mod format;
mod inputs;
mod sections;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use minijinja::Environment;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;

use crate::{bench_dir, memory, repo_root, shown, target_dir};
use inputs::{Criterion, Machine, PostgresRun};
use sections::{ChartLink, Load, Measured, Report, Run, Server};

#[derive(clap::Args)]
pub struct Options {
    /// Ignore results older than this Unix time (`make bench` passes the moment it started), so
    /// a report never mixes runs.
    #[arg(long)]
    since: Option<f64>,
    /// The command named in the report's header.
    #[arg(long, default_value = "make bench")]
    command: String,
    /// Where to write the report (default: docs/capacity.md).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The message count of the large memory run.
    #[arg(long, default_value_t = 1_000_000)]
    memory_large: u64,
    /// The message count of the small memory run.
    #[arg(long, default_value_t = 250_000)]
    memory_small: u64,
}

/// The templates: `capacity.md` includes one file per section, in reading order.
const TEMPLATES: &[(&str, &str)] = &[
    ("capacity.md", include_str!("../../templates/capacity.md")),
    (
        "header.md",
        include_str!("../../templates/capacity/header.md"),
    ),
    (
        "how-to-read.md",
        include_str!("../../templates/capacity/how-to-read.md"),
    ),
    (
        "targets.md",
        include_str!("../../templates/capacity/targets.md"),
    ),
    (
        "charts.md",
        include_str!("../../templates/capacity/charts.md"),
    ),
    (
        "stages.md",
        include_str!("../../templates/capacity/stages.md"),
    ),
    (
        "channel-hop.md",
        include_str!("../../templates/capacity/channel-hop.md"),
    ),
    ("sink.md", include_str!("../../templates/capacity/sink.md")),
    (
        "end-to-end.md",
        include_str!("../../templates/capacity/end-to-end.md"),
    ),
    (
        "kinesis.md",
        include_str!("../../templates/capacity/kinesis.md"),
    ),
    (
        "memory.md",
        include_str!("../../templates/capacity/memory.md"),
    ),
    (
        "sizing.md",
        include_str!("../../templates/capacity/sizing.md"),
    ),
    (
        "reproduce.md",
        include_str!("../../templates/capacity/reproduce.md"),
    ),
];

pub fn write(options: &Options) -> Result<()> {
    let mut report = Report::build(measure(options)?)?;
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| repo_root().join("docs/capacity.md"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    report.charts = write_charts(&report, &out)?;
    let text = render(&report)?;
    std::fs::write(&out, text).with_context(|| format!("cannot write {}", shown(&out)))?;
    println!("capacity-report: wrote {}", shown(&out));
    Ok(())
}

/// Draws the charts into `<report stem>-<chart>.svg` beside the report at `out`; returns their
/// links for the report.
fn write_charts(report: &Report, out: &Path) -> Result<Vec<ChartLink>> {
    let stem = out
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("capacity");
    let mut links = Vec::new();
    for chart in charts::draw_all(report)? {
        let path = out.with_file_name(chart.file_name(stem));
        std::fs::write(&path, &chart.svg)
            .with_context(|| format!("cannot write {}", shown(&path)))?;
        println!("capacity-report: wrote {}", shown(&path));
        links.push(chart.link(stem));
    }
    Ok(links)
}

/// Reads every input of the report.
fn measure(options: &Options) -> Result<Measured> {
    let since = options.since.map(inputs::unix_time);
    let dir = bench_dir();
    let postgres: PostgresRun = inputs::load_fresh(
        &dir.join("postgres-run.json"),
        since,
        "run `cargo bench --bench postgres` first",
    )?;
    let memory_run = |count: u64| {
        inputs::load_fresh(
            &memory::result_path(count),
            since,
            &format!("run `cargo xtask memory-runs {count}` first"),
        )
    };
    let memory_large: memory::MemoryResult = memory_run(options.memory_large)?;
    let memory_small = memory_run(options.memory_small)?;
    let machine = Machine::this_one();
    // When the measuring ended (`make bench` notes it before writing the report), so that a report
    // written again from the same results tells the same times; now, when that is not known.
    let now = inputs::unix_time_in(&dir.join("finished-at"), since)
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .unwrap_or_else(chrono::Utc::now);
    let started = options
        .since
        .and_then(|s| chrono::DateTime::from_timestamp(s as i64, 0));
    let load = inputs::load_average(&dir.join("loadavg-at-start"), since)
        .map(|l| Load::new(l, machine.cores));
    let run = Run {
        measured: now.format("%Y-%m-%d %H:%M").to_string(),
        command: options.command.clone(),
        took: started.map(|s| format::duration((now - s).as_seconds_f64())),
        load,
        postgres: Server::of(&postgres),
        reject_share: 1.0 - postgres.pipeline.loaded as f64 / postgres.pipeline.messages as f64,
        avg_message_bytes: memory_large.avg_message_bytes,
        machine,
    };
    Ok(Measured {
        criterion: Criterion::load(&target_dir().join("criterion"), since)?,
        postgres,
        memory_large,
        memory_small,
        run,
    })
}

fn render(report: &Report) -> Result<String> {
    let mut env = Environment::new();
    // Block tags on lines of their own leave no blank lines; `+%}` keeps the newline after a
    // tag that ends a line of prose.
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()?,
    );
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    format::register(&mut env);
    for (name, source) in TEMPLATES {
        env.add_template(name, source)?;
    }
    Ok(env.get_template("capacity.md")?.render(Serde(report))?)
}

#[cfg(test)]
mod tests {
    use super::inputs::{Bench, CheckpointSide, PairedRound, PipelineCounts, SinkPairedRound};
    use super::*;

    fn bench(group: &str, function: &str, size: u64, elements: f64, rate: f64) -> Bench {
        let ns = elements / rate * 1e9;
        Bench {
            id: format!("{group}/{function}/{size}"),
            group: group.into(),
            function: function.into(),
            value: Some(size.to_string()),
            elements,
            ns,
            ns_low: ns * 0.97,
            ns_high: ns * 1.03,
        }
    }

    fn memory_result(messages: u64, rss_mib: f64) -> memory::MemoryResult {
        memory::MemoryResult {
            messages,
            runs: 3,
            file_bytes: messages * 155,
            avg_message_bytes: 154.0,
            max_rss_mib: rss_mib,
            max_rss_mib_min: rss_mib - 1.0,
            max_rss_mib_max: rss_mib + 1.0,
            wall_seconds: 1.0,
            user_seconds: 1.0,
            system_seconds: 0.2,
            messages_per_second: messages as f64,
            received: messages,
            loaded: messages / 50 * 49,
            rejected: messages / 50,
            duplicates: 0,
            batch_rows: 10_000,
            each_run: Vec::new(),
            psql_copy_seconds: 1.25,
            vs_psql: 1.25,
            each_psql_copy_seconds: vec![1.2, 1.25, 1.3],
            measured_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn measured(large_rss_mib: f64) -> Measured {
        let mut results = vec![
            bench("parse", "parse_chunk", 256, 256.0, 2.8e6),
            bench("transform", "hmac-sha256", 256, 256.0, 2.9e6),
            bench("transform", "salted-sha256", 256, 256.0, 4.0e6),
            bench("encode", "encode_rows", 1000, 1000.0, 3.0e7),
            bench("encode", "encode_rows", 10000, 10000.0, 2.7e7),
            bench("sink", "copy+ledger", 1000, 1000.0, 95_000.0),
            bench("sink", "copy+producer-ledger", 1000, 1000.0, 80_000.0),
            bench(
                "pipeline",
                "memory_to_postgres",
                600_000,
                600_000.0,
                760_000.0,
            ),
            bench(
                "postgres_ceiling",
                "binary_copy",
                585_650,
                585_650.0,
                830_000.0,
            ),
            bench("postgres_ceiling", "naive_insert", 2000, 2000.0, 3400.0),
        ];
        for size in [1, 10, 100, 1000] {
            results.push(bench(
                "channel_hop",
                "chunk",
                size,
                100_000.0,
                1e7 * size as f64,
            ));
        }
        for (size, rate) in [(100, 130_000.0), (1000, 320_000.0), (10_000, 860_000.0)] {
            results.push(bench("sink", "copy", size, size as f64, rate));
        }
        // Kinesis: the parameter is the shard count.
        for (shards, rate) in [(4, 290_000.0), (64, 250_000.0)] {
            results.push(bench("kinesis_sink", "checkpoints", shards, 1000.0, rate));
        }
        for (shards, rate) in [(4, 740_000.0), (64, 700_000.0)] {
            results.push(bench(
                "kinesis_pipeline",
                "checkpoints",
                shards,
                600_000.0,
                rate,
            ));
        }
        let side = |shards, seconds| CheckpointSide { shards, seconds };
        let postgres = PostgresRun {
            paired_seconds: [(0.84, 0.9), (0.85, 0.92), (0.86, 0.95)]
                .into_iter()
                .map(|(four, sixty_four)| PairedRound {
                    pipeline: 0.8,
                    ceiling: 0.7,
                    checkpoints: vec![side(4, four), side(64, sixty_four)],
                })
                .collect(),
            sink_paired_seconds: vec![
                SinkPairedRound {
                    plain: 0.004,
                    ledger: 0.008,
                    producer_ledger: Some(0.01),
                    checkpoints: vec![side(4, 0.005), side(64, 0.006)],
                },
                SinkPairedRound {
                    plain: 0.004,
                    ledger: 0.006,
                    producer_ledger: Some(0.008),
                    checkpoints: vec![side(4, 0.0052), side(64, 0.0061)],
                },
                SinkPairedRound {
                    plain: 0.0045,
                    ledger: 0.0075,
                    producer_ledger: Some(0.009),
                    checkpoints: vec![side(4, 0.0055), side(64, 0.0066)],
                },
            ],
            server_version: "15".into(),
            synchronous_commit: "on".into(),
            fsync: "on".into(),
            shared_buffers: "128MB".into(),
            pipeline: PipelineCounts {
                messages: 600_000,
                loaded: 585_650,
                rejected: 14_350,
            },
        };
        let machine = Machine {
            cores: 2,
            cpu: "a CPU".into(),
            memory_gib: Some(8.0),
            kernel: "Linux 6".into(),
            rustc: "rustc 1".into(),
        };
        Measured {
            criterion: Criterion::from_results(results),
            memory_large: memory_result(1_000_000, large_rss_mib),
            memory_small: memory_result(250_000, 50.0),
            run: Run {
                measured: "2026-01-01 00:00".into(),
                command: "make bench".into(),
                took: Some("5 min 0 s".into()),
                load: Some(Load::new(1.5, 2)),
                postgres: Server::of(&postgres),
                reject_share: 0.024,
                avg_message_bytes: 154.0,
                machine,
            },
            postgres,
        }
    }

    #[test]
    fn every_section_renders_with_its_numbers() {
        let text = render(&Report::build(measured(54.0)).unwrap()).unwrap();
        for heading in [
            "# Capacity",
            "## Targets",
            "## Stages, one core each",
            "## Channel hop between stages",
            "## The sink alone",
            "## End to end, and PostgreSQL's own ceiling",
            "## Kinesis: shard checkpoints in the batch's transaction",
            "## Memory, and the binary end to end",
            "### SQS pollers",
            "### Kinesis shards",
            "### When one PostgreSQL is no longer enough",
            "## Reproduce",
        ] {
            assert!(
                text.contains(&format!("\n{heading}\n")) || text.starts_with(heading),
                "{heading} missing"
            );
        }
        assert!(text.contains(
            "| parse/validate, one core | ≥ 1,000,000 msg/s | 2,800,000 msg/s | ✅ met |"
        ));
        assert!(text.contains("Load average when the run started: 1.50 (other work was running"));
        assert!(text.contains("Peak memory changes by +8.0% for 4× the messages"));
        assert!(text.contains(
            "| 700,000 | 102.81 MiB/s | 700 | 103 | 52 | 700 | 2 | this machine's Kinesis pipeline rate |"
        ));
        // The checkpoints' cost and share are the paired rounds' medians, not the criterion
        // medians' (3.125 ms plain, 4.00 ms over 64 shards).
        assert!(
            text.contains("| 64 | 250,000 rows/s | 242,718 – 257,732 | 4.00 | 2.10 ms | 67% |")
        );
        assert!(text.contains(
            "with checkpoints the sink kept 76.9%, 80.0%, 81.8% of the plain sink's rate over 4 shards, and 65.6%, 66.7%, 68.2% over 64 shards."
        ));
        assert!(
            text.contains(
                "Checkpointing costs about 0.927 ms per batch plus 18.3 µs per shard in it"
            )
        );
        assert!(
            text.contains(
                "spread over a 10,000-row batch of 64 shards it is 0.210 µs per message."
            )
        );
        // The Kinesis pipelines' shares are the paired rounds' medians (criterion's: 97.4% and
        // 89.2% over 4 shards), and so is the plain pipeline's share of the ceiling beside them.
        assert!(text.contains("| 4 | 740,000 msg/s | 718,447 – 762,887 | 94.1% | 84.4% |"));
        assert!(text.contains("| 64 | 700,000 msg/s |"));
        assert!(text.contains("| 87.0% | 78.0% |"));
        assert!(text.contains("| none | 760,000 msg/s | 737,864 – 783,505 | 100% | 89.6% |"));
        assert!(text.contains(
            "with checkpoints it kept 93.0%, 94.1%, 95.2% of its rate over 4 shards, and 84.2%, 87.0%, 88.9% over 64 shards"
        ));
        assert!(text.contains("**490,000 msg/s per process**"));
        assert!(text.contains("one process keeps up with about **490 shards**"));
        assert!(text.contains("one process drains a backlog on about 36 shards"));
        assert!(text.contains(
            "| the binary, default config, vs `psql \\copy` of the same rows (1,000,000 messages) | ≥ 1.2× | 1.25× | ✅ met |"
        ));
        assert!(text.contains("| 1.25× | 1.20 s, 1.25 s, 1.30 s |"));
        assert!(text.contains(
            "| sink with the SQS dedupe ledger vs without, 1,000-row batches (median of paired rounds) | ≥ 60% | 60.0% | ✅ met |"
        ));
        assert!(
            text.contains("The ledger (on by default for SQS) costs 3.00 ms per 1,000-row batch")
        );
        assert!(text.contains(
            "(ledger-on rate over ledger-off: 50.0%, 60.0%, 66.7%); the two criterion medians in the table, measured minutes apart, give 29.7%."
        ));
        assert!(text.contains(
            "and the sink carries 50% of the file path's rate (median of the same rounds: 40.0%, 50.0%, 50.0%)."
        ));
        assert!(!text.contains("\n\n\n"), "no double blank lines");
        assert!(text.ends_with("```\n"));
    }

    #[test]
    fn without_paired_rounds_ledger_and_checkpoints_use_criterion_medians() {
        let mut no_sink_rounds = measured(54.0);
        no_sink_rounds.postgres.sink_paired_seconds.clear();
        let text = render(&Report::build(no_sink_rounds).unwrap()).unwrap();
        assert!(text.contains(
            "| sink with the SQS dedupe ledger vs without, 1,000-row batches | ≥ 60% | 29.7% | ❌ not met |"
        ));
        assert!(!text.contains("rounds that run the sink without and with the ledger"));
        // 80,000 against 320,000 rows/s in the criterion medians.
        assert!(text.contains("and the sink carries 25% of the file path's rate."));
        // The checkpoints too: 3.125 ms plain, 4.00 ms over 64 shards.
        assert!(
            text.contains("| 64 | 250,000 rows/s | 242,718 – 257,732 | 4.00 | 0.875 ms | 78% |")
        );
        assert!(text.contains(
            "The cost per batch and the share compare criterion medians measured minutes apart."
        ));
        // And the Kinesis pipelines, once their rounds are gone too.
        let mut older = measured(54.0);
        older.postgres.sink_paired_seconds.clear();
        for round in &mut older.postgres.paired_seconds {
            round.checkpoints.clear();
        }
        let text = render(&Report::build(older).unwrap()).unwrap();
        assert!(text.contains("| 4 | 740,000 msg/s | 718,447 – 762,887 | 97.4% | 89.2% |"));
        assert!(
            text.contains("The shares are ratios of criterion medians measured minutes apart.")
        );
        assert!(
            text.contains(
                "Checkpointing costs about 0.286 ms per batch plus 9.20 µs per shard in it"
            )
        );
    }

    #[test]
    fn charts_are_written_beside_the_report_and_linked_from_it() {
        let mut report = Report::build(measured(54.0)).unwrap();
        let dir = std::env::temp_dir().join(format!("xtask-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        report.charts = write_charts(&report, &dir.join("capacity.md")).unwrap();
        let files: Vec<&str> = report.charts.iter().map(|c| c.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "capacity-batch-size.svg",
                "capacity-commit-records.svg",
                "capacity-end-to-end.svg",
                "capacity-stage-costs.svg"
            ]
        );
        let svg = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let expect = [
            (
                "capacity-batch-size.svg",
                &[
                    "Rows per second against rows per batch",
                    "sink, no commit record (files)",
                    "sink, SQS dedupe ledger on",
                    "sink, ledger on, producer keys",
                    "sink, Kinesis checkpoints over 64 shards",
                    "whole pipeline, memory source",
                    "PostgreSQL&apos;s own COPY ceiling",
                    "rows per batch (log scale)",
                ][..],
            ),
            (
                "capacity-commit-records.svg",
                &[
                    "ledger off (files)",
                    "SQS dedupe ledger on",
                    "ledger on, producer keys",
                    "80,000",
                    "Kinesis checkpoints, 4 shards",
                    "Kinesis checkpoints, 64 shards",
                    "320,000",
                    "95,000",
                ][..],
            ),
            (
                "capacity-end-to-end.svg",
                &[
                    "pipeline, memory source",
                    "pipeline, Kinesis checkpoints, 64 shards",
                    "PostgreSQL binary COPY ceiling",
                    "release binary, file, default config",
                    "psql \\copy of the same rows",
                ][..],
            ),
            (
                "capacity-stage-costs.svg",
                &[
                    "parse/validate",
                    "mask/transform, HMAC-SHA256",
                    "four channel hops",
                    "the whole binary on a file",
                ][..],
            ),
        ];
        for (file, labels) in expect {
            let text = svg(file);
            assert!(text.starts_with("<svg"), "{file} is not SVG");
            for label in labels {
                assert!(text.contains(label), "{file} lacks {label:?}");
            }
        }
        let markdown = render(&report).unwrap();
        assert!(markdown.contains(
            "\n## At a glance\n\n![Rows per second against rows per batch](capacity-batch-size.svg)\n"
        ));
        assert!(!markdown.contains("\n\n\n"), "no double blank lines");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_that_grows_with_the_input_is_called_out() {
        let text = render(&Report::build(measured(70.0)).unwrap()).unwrap();
        assert!(text.contains("| ≤ +10% | +40.0% | ❌ not met |"));
        assert!(text.contains(
            "Peak memory grows by +40.0% for 4× the messages, more than the 10% allowed"
        ));
    }

    #[test]
    fn a_pipeline_result_from_another_run_is_refused() {
        let mut m = measured(54.0);
        m.postgres.pipeline.messages = 1;
        assert!(Report::build(m).is_err());
    }
}
