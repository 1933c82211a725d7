#!/usr/bin/env python3
"""Writes docs/capacity.md from the numbers the benchmarks just measured.

Reads criterion's results (target/criterion/**/new/{benchmark,estimates}.json), the side results of
the PostgreSQL benchmark (target/bench/postgres-run.json) and of the memory runs
(target/bench/memory-COUNT.json, written by scripts/bench-memory.sh). No number in the report is typed
in: every figure is computed from those files, and the sizing rules plug them in.

    python3 scripts/capacity_report.py [--since EPOCH] [--command "make bench"] [--out docs/capacity.md]

--since refuses results older than the given Unix time, so a report never mixes runs: `make bench`
passes the moment it started. Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import statistics
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shown(path: Path) -> Path:
    """`path` relative to the repository when it lies inside it, as given otherwise."""
    return path.relative_to(ROOT) if path.is_absolute() and path.is_relative_to(ROOT) else path


# What the project aims for; the report marks each as met or not met.
TARGET_PARSE = 1_000_000  # messages/s on one core
TARGET_TRANSFORM = 1_000_000  # messages/s on one core
TARGET_ENCODE = 3_000_000  # rows/s on one core
TARGET_VS_COPY = 0.85  # pipeline rate / COPY ceiling
TARGET_VS_NAIVE = 20.0  # pipeline rate / naive loader
TARGET_RSS_MIB = 64.0  # peak RSS for 1M messages
RSS_GROWTH_TOLERANCE = 0.10  # "does not grow": the 1M peak within 10% of the 250k peak

SQS_BATCH = 10  # messages per ReceiveMessage, at most
SQS_LATENCIES_MS = (20, 50, 100)
KINESIS_WRITE_RECORDS = 1_000  # records/s per shard, written
KINESIS_WRITE_BYTES = 1024 * 1024  # bytes/s per shard, written
KINESIS_READ_BYTES = 2 * 1024 * 1024  # bytes/s per shard, read
PLANNING_HEADROOM = 0.7  # plan to run at most this fraction of a measured ceiling


class ReportError(Exception):
    pass


# --------------------------------------------------------------------------------------- inputs


class Result:
    """One criterion benchmark: time per iteration (ns) and elements per iteration."""

    def __init__(self, bench: dict, estimates: dict, path: Path):
        self.id = bench["full_id"]
        self.group = bench["group_id"]
        self.function = bench.get("function_id")
        self.value = bench.get("value_str")
        throughput = bench.get("throughput") or {}
        self.elements = throughput.get("Elements") or throughput.get("Bytes")
        if not self.elements:
            raise ReportError(f"{self.id}: no element throughput in {path}")
        median = estimates["median"]
        self.ns = median["point_estimate"]
        ci = median["confidence_interval"]
        self.ns_low, self.ns_high = ci["lower_bound"], ci["upper_bound"]
        self.path = path

    @property
    def rate(self) -> float:
        """Elements per second at the median."""
        return self.elements / (self.ns * 1e-9)

    @property
    def rate_low(self) -> float:
        return self.elements / (self.ns_high * 1e-9)

    @property
    def rate_high(self) -> float:
        return self.elements / (self.ns_low * 1e-9)

    @property
    def ns_per_element(self) -> float:
        return self.ns / self.elements


def load_criterion(criterion_dir: Path, since: float | None) -> dict[tuple, Result]:
    results: dict[tuple, Result] = {}
    for bench_file in criterion_dir.glob("**/new/benchmark.json"):
        estimates_file = bench_file.with_name("estimates.json")
        if not estimates_file.exists():
            continue
        if since is not None and estimates_file.stat().st_mtime < since:
            continue  # an older run's result; never mixed in
        bench = json.loads(bench_file.read_text())
        result = Result(bench, json.loads(estimates_file.read_text()), estimates_file)
        results[(result.group, result.function, result.value)] = result
    return results


def pick(results: dict[tuple, Result], group: str, function: str, value: str | None = None) -> Result:
    """The result of group/function[/value]; with no value, the only one there must be."""
    found = [
        r
        for (g, f, v), r in results.items()
        if g == group and f == function and (value is None or v == value)
    ]
    if not found:
        wanted = "/".join(x for x in (group, function, value) if x)
        raise ReportError(
            f"no fresh criterion result for {wanted}; run the benchmarks first (`make bench`)"
        )
    if len(found) > 1:
        raise ReportError(
            f"several fresh results for {group}/{function}: "
            + ", ".join(r.id for r in found)
            + "; remove stale ones from target/criterion"
        )
    return found[0]


def load_json(path: Path, since: float | None, what: str) -> dict:
    if not path.exists():
        raise ReportError(f"{shown(path)} is missing; {what}")
    if since is not None and path.stat().st_mtime < since:
        raise ReportError(f"{shown(path)} is older than this run; {what}")
    return json.loads(path.read_text())


def machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        cores = os.cpu_count() or 0
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass
    try:
        rustc = subprocess.run(
            ["rustc", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rustc = "rustc (version unknown)"
    return {
        "cores": cores,
        "cpu": cpu,
        "memory_gib": memory,
        "kernel": f"{platform.system()} {platform.release()}",
        "rustc": rustc,
    }


# ------------------------------------------------------------------------------------ formatting


def n(x: float) -> str:
    """A rate or count with thousands separators, no decimals."""
    return f"{x:,.0f}"


def sig(x: float) -> str:
    """A small quantity with three significant digits."""
    if x == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{digits}f}"


NOISY_CI = 0.2  # a confidence interval wider than this share of the median is flagged


def noisy(r: Result) -> bool:
    return (r.rate_high - r.rate_low) / r.rate > NOISY_CI


def ci(r: Result) -> str:
    return f"{n(r.rate_low)} – {n(r.rate_high)}" + (" ⚠" if noisy(r) else "")


def mark(ok: bool) -> str:
    return "✅ met" if ok else "❌ not met"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


# --------------------------------------------------------------------------------------- report


def build(args: argparse.Namespace) -> str:
    since = args.since
    results = load_criterion(ROOT / "target" / "criterion", since)
    bench_dir = ROOT / "target" / "bench"
    pg_run = load_json(
        bench_dir / "postgres-run.json", since, "run `cargo bench --bench postgres` first"
    )
    memory = {
        count: load_json(
            bench_dir / f"memory-{count}.json",
            since,
            f"run `scripts/bench-memory.sh {count}` first",
        )
        for count in (args.memory_large, args.memory_small)
    }
    host = machine()

    parse = pick(results, "parse", "parse_chunk")
    hmac = pick(results, "transform", "hmac-sha256")
    salted = pick(results, "transform", "salted-sha256")
    encodes = sorted(
        (r for (g, f, _), r in results.items() if g == "encode" and f == "encode_rows"),
        key=lambda r: r.elements,
    )
    if not encodes:
        raise ReportError("no fresh encode results; run `cargo bench --bench stages`")
    hops = sorted(
        (r for (g, f, _), r in results.items() if g == "channel_hop" and f == "chunk"),
        key=lambda r: int(r.value),
    )
    sinks = sorted(
        (r for (g, f, _), r in results.items() if g == "sink" and f == "copy"),
        key=lambda r: int(r.value),
    )
    ledger = pick(results, "sink", "copy+ledger")
    pipeline = pick(results, "pipeline", "memory_to_postgres")
    copy = pick(results, "postgres_ceiling", "binary_copy")
    naive = pick(results, "postgres_ceiling", "naive_insert")

    counts = pg_run["pipeline"]
    if counts["messages"] != pipeline.elements:
        raise ReportError(
            "postgres-run.json and the pipeline result come from different runs "
            f"({counts['messages']} vs {pipeline.elements} messages)"
        )
    loaded_share = counts["loaded"] / counts["messages"]
    pipeline_rows_rate = pipeline.rate * loaded_share
    # The target is judged on paired rounds (pipeline and ceiling run back to back, alternately):
    # each pair saw the same machine, so its ratio does not carry the drift between two criterion
    # groups measured minutes apart. Criterion's medians are shown beside it.
    pairs = pg_run.get("paired_seconds") or []
    if not pairs:
        raise ReportError("postgres-run.json has no paired rounds; run `cargo bench --bench postgres`")
    pair_ratios = sorted(
        (counts["messages"] / p["pipeline"]) / (copy.elements / p["ceiling"]) for p in pairs
    )
    vs_copy = statistics.median(pair_ratios)
    vs_copy_medians = pipeline.rate / copy.rate
    vs_copy_rows = vs_copy * loaded_share
    vs_naive = pipeline.rate / naive.rate
    big, small = memory[args.memory_large], memory[args.memory_small]
    growth = big["max_rss_mib"] / small["max_rss_mib"] - 1
    avg_bytes = big["avg_message_bytes"]
    encode_slowest = min(encodes, key=lambda r: r.rate)

    # CPU a message costs inside sluice, from the one-core stage numbers (plus two hops at the
    # file chunk size, the closest measured one to the source's chunks).
    hop_256 = min(hops, key=lambda r: abs(int(r.value) - 256))
    cpu_ns = parse.ns_per_element + hmac.ns_per_element + encode_slowest.ns_per_element
    cpu_ns_with_hops = cpu_ns + 4 * hop_256.ns_per_element
    sluice_core_rate = 1e9 / cpu_ns_with_hops

    started = dt.datetime.fromtimestamp(since, dt.timezone.utc) if since else None
    now = dt.datetime.now(dt.timezone.utc)
    took = f", which took {duration((now - started).total_seconds())}" if started else ""
    memory_gib = f", {host['memory_gib']:.1f} GiB memory" if host["memory_gib"] else ""
    load_note = ""
    load_file = bench_dir / "loadavg-at-start"
    if load_file.exists() and (since is None or load_file.stat().st_mtime >= since):
        load = float(load_file.read_text().split()[0])
        busy = load >= 0.5 * max(host["cores"], 1)
        load_note = (
            f" Load average when the run started: {load:.2f}"
            + (" (other work was running: every number below may be low)." if busy else ".")
        )

    out: list[str] = []
    w = out.append
    w("# Capacity")
    w("")
    w(
        "<!-- Generated by scripts/capacity_report.py from the benchmark results; do not edit by "
        "hand: run `make bench` again. -->"
    )
    w("")
    w(f"- **Measured:** {now:%Y-%m-%d %H:%M} UTC, by `{args.command}`{took}.")
    w(
        f"- **Machine:** {host['cores']} cores (`nproc`), {host['cpu']}{memory_gib}; "
        f"{host['kernel']}; {host['rustc']}, release profile.{load_note}"
    )
    w(
        f"- **PostgreSQL:** {pg_run['server_version']} on the same machine "
        f"(synchronous_commit={pg_run['synchronous_commit']}, fsync={pg_run['fsync']}, "
        f"shared_buffers={pg_run['shared_buffers']}), so it shares the "
        f"{host['cores']} cores with sluice in the end-to-end numbers."
    )
    w(
        f"- **Input:** realistic logins from the seed generator (repeat users and devices, shared "
        f"addresses, `null` locales, two-part versions, IPv6) with a wrong-type message every 50th "
        f"and a few hand-made odd ones; {100 * (1 - loaded_share):.1f}% are rejects. Average "
        f"message size {avg_bytes:.0f} bytes."
    )
    w("")

    w("## How to read this")
    w("")
    w(
        "Each figure is a median over criterion's samples, with its 95% confidence interval where "
        "one exists; a wide interval means a noisy machine, not a slower sluice, and ⚠ marks "
        f"an interval wider than {NOISY_CI:.0%} of its median (run `make bench` again on a quiet "
        "machine before relying on that figure). The stage "
        "benchmarks run one stage on one core with its input already in memory, so their "
        "rates are *per core* and an upper bound for that stage inside the daemon. The channel hop "
        "is the price of one bounded channel between two tasks, per message, at each chunk size. "
        "The sink, pipeline and ceiling numbers include PostgreSQL: commits are durable "
        "(fsync on), and the database competes with sluice for the same cores, so they are what "
        "*this* machine does, not what a dedicated database server would. Compare the pipeline with "
        "the COPY ceiling to see how much of the database's own loading speed sluice keeps; "
        "compare it with the naive loader to see what batching buys. The memory runs use the "
        "release binary on a file, as an operator would run a backfill. The sizing rules at the end "
        "turn these numbers into pollers, shards and servers; plan at about "
        f"{PLANNING_HEADROOM:.0%} of a measured ceiling, not at it."
    )
    w("")

    w("## Targets")
    w("")
    rss_ok = big["max_rss_mib"] <= TARGET_RSS_MIB
    growth_ok = growth <= RSS_GROWTH_TOLERANCE
    w(
        table(
            ["what", "target", "measured", ""],
            [
                ["parse/validate, one core", f"≥ {n(TARGET_PARSE)} msg/s", f"{n(parse.rate)} msg/s", mark(parse.rate >= TARGET_PARSE)],
                ["mask/transform (HMAC-SHA256), one core", f"≥ {n(TARGET_TRANSFORM)} msg/s", f"{n(hmac.rate)} msg/s", mark(hmac.rate >= TARGET_TRANSFORM)],
                ["COPY encoding, one core (slowest batch size)", f"≥ {n(TARGET_ENCODE)} rows/s", f"{n(encode_slowest.rate)} rows/s", mark(encode_slowest.rate >= TARGET_ENCODE)],
                ["pipeline vs PostgreSQL's COPY ceiling (median of paired rounds)", f"≥ {TARGET_VS_COPY:.0%}", f"{vs_copy:.1%}", mark(vs_copy >= TARGET_VS_COPY)],
                ["pipeline vs naive per-row loader", f"≥ {TARGET_VS_NAIVE:.0f}×", f"{vs_naive:,.0f}×", mark(vs_naive >= TARGET_VS_NAIVE)],
                [f"peak RSS, {n(args.memory_large)} messages", f"≤ {TARGET_RSS_MIB:.0f} MiB", f"{big['max_rss_mib']:.1f} MiB", mark(rss_ok)],
                [
                    f"peak RSS does not grow with the count ({n(args.memory_small)} → {n(args.memory_large)})",
                    f"≤ +{RSS_GROWTH_TOLERANCE:.0%}",
                    f"{growth:+.1%}",
                    mark(growth_ok),
                ],
            ],
            "lrrl",
        )
    )
    w("")
    w(
        f"The pipeline ratio compares messages per second (rows and dead letters alike) with the "
        f"ceiling's rows per second, in {len(pair_ratios)} rounds that run the pipeline and the "
        f"ceiling back to back on the same {n(counts['messages'])} messages (ratios "
        f"{', '.join(f'{x:.1%}' for x in pair_ratios)}); counting only loaded rows the pipeline "
        f"keeps {vs_copy_rows:.1%} of the ceiling. The two criterion medians below, measured minutes "
        f"apart, give {vs_copy_medians:.1%}."
    )
    w("")

    w("## Stages, one core each")
    w("")
    stage_rows = [
        ["parse/validate (`parse_chunk`)", f"{parse.value} messages", n(parse.rate), ci(parse), sig(parse.ns_per_element)],
        ["mask/transform, HMAC-SHA256 (`transform_chunk`)", f"{hmac.value} messages", n(hmac.rate), ci(hmac), sig(hmac.ns_per_element)],
        ["mask/transform, salted SHA-256", f"{salted.value} messages", n(salted.rate), ci(salted), sig(salted.ns_per_element)],
    ]
    for r in encodes:
        stage_rows.append(
            ["COPY encoding (`encode_rows`)", f"{n(int(r.value))} rows", n(r.rate), ci(r), sig(r.ns_per_element)]
        )
    w(table(["stage", "per call", "median per s", "95% CI", "ns each"], stage_rows, "llrrr"))
    w("")
    w(
        f"Together, parse + mask/transform + encoding cost {sig(cpu_ns)} ns of CPU per message; with "
        f"four channel hops at {hop_256.value} messages per chunk, {sig(cpu_ns_with_hops)} ns: one "
        f"core can carry about {n(sluice_core_rate)} messages/s through sluice's own stages, before "
        f"PostgreSQL does any work."
    )
    w("")

    w("## Channel hop between stages")
    w("")
    w(
        "A bounded tokio channel sized as the daemon sizes it (the default `pipeline.channel_capacity` "
        "of 2,048 messages in whole chunks, at least two) "
        "between two tasks on the daemon's multi-threaded runtime, carrying "
        f"{n(hops[0].elements)} messages per iteration:"
    )
    w("")
    w(
        table(
            ["messages per chunk", "messages/s", "95% CI", "ns per message", "ns per chunk"],
            [
                [n(int(r.value)), n(r.rate), ci(r), sig(r.ns_per_element), sig(r.ns_per_element * int(r.value))]
                for r in hops
            ],
        )
    )
    w("")
    w(
        "An SQS receive is a chunk of at most 10 messages, a file chunk is 256 "
        "(`source.file.chunk_messages`). The 1,000-message figure includes spawning the two tasks "
        "once per iteration, so it is an upper bound."
    )
    w("")

    w("## The sink alone")
    w("")
    w(
        "`PgCopySink::commit` of one batch: a transaction with a binary COPY of the rows, then "
        "COMMIT (durable). The batch is built and encoded outside the timed part, as the batcher "
        "does while the previous batch commits."
    )
    w("")
    sink_rows = [
        [n(int(r.value)), "off", n(r.rate), ci(r), sig(r.ns / 1e6)] for r in sinks
    ]
    sink_rows.append([n(int(ledger.value)), "on", n(ledger.rate), ci(ledger), sig(ledger.ns / 1e6)])
    w(table(["rows per batch", "dedupe ledger", "rows/s", "95% CI", "ms per commit"], sink_rows, "lrrrr"))
    w("")
    plain_1000 = next((r for r in sinks if int(r.value) == int(ledger.value)), None)
    if plain_1000:
        w(
            f"The ledger (on by default for SQS) costs {sig(ledger.ns / 1e6 - plain_1000.ns / 1e6)} ms "
            f"per {n(int(ledger.value))}-row batch: the SQS path's sink carries "
            f"{ledger.rate / plain_1000.rate:.0%} of the file path's at that batch size."
        )
        w("")

    w("## End to end, and PostgreSQL's own ceiling")
    w("")
    w(
        table(
            ["what", "per iteration", "per second", "95% CI", "pipeline ÷ this"],
            [
                [
                    "pipeline: memory source → parse → mask/transform → batcher → sink → acknowledger",
                    f"{n(pipeline.elements)} messages",
                    f"{n(pipeline.rate)} msg/s",
                    ci(pipeline),
                    "",
                ],
                [
                    "ceiling: one connection, binary COPY of pre-encoded 10,000-row batches, each committed",
                    f"{n(copy.elements)} rows",
                    f"{n(copy.rate)} rows/s",
                    ci(copy),
                    f"{vs_copy_medians:.1%}",
                ],
                [
                    "naive loader: one prepared INSERT per row, each autocommitted",
                    f"{n(naive.elements)} rows",
                    f"{n(naive.rate)} rows/s",
                    ci(naive),
                    f"{vs_naive:,.0f}×",
                ],
            ],
            "lrrrr",
        )
    )
    w("")
    w(
        f"The pipeline runs with `batch_rows = 10000`, `linger_ms = 50`, the dedupe ledger off (as "
        f"for files), the default two sink connections and default channel capacities; its time "
        f"covers the whole run from the first "
        f"message to the last acknowledgement, but not `Pipeline::prepare` (connecting and checking "
        f"the tables), which a daemon does once at start. Of the {n(counts['messages'])} messages, "
        f"{n(counts['loaded'])} became rows and {n(counts['rejected'])} dead-letter records, all in "
        f"the same transactions. The ceiling loads the same {n(copy.elements)} rows the pipeline "
        f"loads."
    )
    w("")

    w("## Memory, and the binary end to end")
    w("")
    w(
        "`target/release/sluice run` on an NDJSON file made by `sluice seed --count N --seed 1 "
        "--bad-every 50`, under `/usr/bin/time -v`, into a throwaway schema; default channel "
        "capacities and chunk size, `batch_rows = 10000`, `linger_ms = 100` (the backfill "
        "settings of `config/file-backfill.toml`). Wall time includes start-up (connecting, creating "
        f"the tables). Each count runs {big.get('runs', 1)} times; the table shows the median run "
        f"(peak RSS and wall time each) and the range of peak RSS."
    )
    w("")
    mem_rows = []
    for count in (args.memory_large, args.memory_small):
        m = memory[count]
        mem_rows.append(
            [
                n(count),
                f"{m['file_bytes'] / 1024 / 1024:,.1f} MiB",
                f"{m['max_rss_mib']:.1f} MiB ({m.get('max_rss_mib_min', m['max_rss_mib']):.1f} – "
                f"{m.get('max_rss_mib_max', m['max_rss_mib']):.1f})",
                f"{m['wall_seconds']:.2f} s",
                f"{m['user_seconds'] + m['system_seconds']:.2f} s",
                n(m["messages_per_second"]),
                f"{n(m['loaded'])} / {n(m['rejected'])}",
            ]
        )
    w(
        table(
            ["messages", "file", "peak RSS (range)", "wall", "CPU (user+sys)", "messages/s", "loaded / rejected"],
            mem_rows,
        )
    )
    w("")
    ratio = big["messages"] / small["messages"]
    if growth_ok:
        w(
            f"Peak memory changes by {growth:+.1%} for {ratio:.0f}× the messages: what sluice holds "
            f"is bounded by its channels and batches, not by the input."
        )
    else:
        w(
            f"Peak memory grows by {growth:+.1%} for {ratio:.0f}× the messages, more than the "
            f"{RSS_GROWTH_TOLERANCE:.0%} allowed: something is held per message, or the allocator "
            f"fragments; look there before sizing memory by these numbers."
        )
    w("")

    w("## Sizing rules")
    w("")
    w("### SQS pollers")
    w("")
    w(
        f"One receive returns at most {SQS_BATCH} messages, and a poller waits for each answer, so one "
        f"poller carries at most {SQS_BATCH} ÷ latency messages per second. Pollers needed = "
        f"⌈target rate × latency ÷ {SQS_BATCH}⌉ (`source.sqs.pollers`, default 4; `max_in_flight` "
        f"must cover what they hold)."
    )
    w("")
    poll_targets = sorted({10_000, 100_000, int(round(pipeline.rate, -3))})
    header = ["receive latency", "per poller"] + [
        f"pollers for {n(t)} msg/s" for t in poll_targets
    ]
    rows = []
    for ms in SQS_LATENCIES_MS:
        per = SQS_BATCH / (ms / 1000)
        rows.append([f"{ms} ms", f"{n(per)} msg/s"] + [n(math.ceil(t / per)) for t in poll_targets])
    w(table(header, rows))
    w("")
    w(
        f"The last column is this machine's measured pipeline rate. With the default 4 pollers, a "
        f"50 ms receive latency caps intake at {n(4 * SQS_BATCH / 0.05)} msg/s, far below what the "
        f"stages can do; for SQS the sink keeps the dedupe ledger, which at 1,000-row batches "
        f"(the default `batch_rows`) commits {n(ledger.rate)} rows/s here."
    )
    w("")

    w("### Kinesis shards")
    w("")
    w(
        f"A shard takes {n(KINESIS_WRITE_RECORDS)} records/s and 1 MiB/s written, and serves "
        f"2 MiB/s read. With the measured average message of {avg_bytes:.0f} bytes, shards needed = "
        f"max(⌈rate ÷ {n(KINESIS_WRITE_RECORDS)}⌉, ⌈rate × {avg_bytes:.0f} B ÷ 1 MiB/s⌉, "
        f"⌈rate × {avg_bytes:.0f} B ÷ 2 MiB/s⌉); at this size the record limit "
        f"{'decides' if avg_bytes * KINESIS_WRITE_RECORDS < KINESIS_WRITE_BYTES else 'does not decide'}"
        f" (one shard's 1,000 records are {avg_bytes * KINESIS_WRITE_RECORDS / 1024:,.0f} KiB/s)."
    )
    w("")
    kinesis_targets = sorted({1_000, 10_000, 100_000, int(round(pipeline.rate, -3))})
    rows = []
    for t in kinesis_targets:
        by_records = math.ceil(t / KINESIS_WRITE_RECORDS)
        by_write = math.ceil(t * avg_bytes / KINESIS_WRITE_BYTES)
        by_read = math.ceil(t * avg_bytes / KINESIS_READ_BYTES)
        note = ""
        if t == int(round(pipeline.rate, -3)):
            note = "this machine's pipeline rate"
        rows.append(
            [n(t), f"{t * avg_bytes / 1024 / 1024:,.2f} MiB/s", str(by_records), str(by_write), str(by_read), str(max(by_records, by_write, by_read)), note]
        )
    w(
        table(
            ["messages/s", "data", "by records", "by write MiB", "by read MiB", "shards", ""],
            rows,
            "rrrrrrl",
        )
    )
    w("")

    w("### When one PostgreSQL is no longer enough")
    w("")
    plan_pipeline = PLANNING_HEADROOM * pipeline.rate
    plan_copy = PLANNING_HEADROOM * copy.rate
    plan_ledger = PLANNING_HEADROOM * ledger.rate
    w(
        f"- Up to **{n(plan_pipeline)} msg/s** ({PLANNING_HEADROOM:.0%} of the measured pipeline "
        f"rate, {n(pipeline.rate)} msg/s): one sluice and one PostgreSQL like this one. For SQS with "
        f"the ledger at the default 1,000-row batches, plan on **{n(plan_ledger)} msg/s** "
        f"({PLANNING_HEADROOM:.0%} of {n(ledger.rate)}); larger `batch_rows` raise it."
    )
    w(
        f"- Between that and **{n(plan_copy)} rows/s** ({PLANNING_HEADROOM:.0%} of the COPY "
        f"ceiling, {n(copy.rate)} rows/s): sluice, not the database connection, is the limit; run "
        f"a second replica (each has its own connection) or give it more cores."
    )
    w(
        f"- Above the COPY ceiling: one connection cannot load faster on this hardware. Several "
        f"replicas COPY in parallel until the server's CPU or WAL writing saturates (not measured "
        f"here: the server shares {host['cores']} cores with sluice); beyond that, a bigger server, "
        f"or split the stream across databases or partitions (for example by `user_id` hash)."
    )
    binary_cpu_us = (big["user_seconds"] + big["system_seconds"]) / big["messages"] * 1e6
    w(
        f"- sluice's own CPU: {sig(cpu_ns_with_hops / 1000)} µs per message in the stages alone, "
        f"{sig(binary_cpu_us)} µs per message for the whole binary on a file (user + system time of "
        f"the {n(big['messages'])}-message run: reading, stages, PostgreSQL client). Cores for "
        f"sluice ≈ target rate × {sig(binary_cpu_us)} µs (100,000 msg/s → "
        f"{100_000 * binary_cpu_us / 1e6:.2f} cores), plus the database's own share on its server."
    )
    w("")
    w("## Reproduce")
    w("")
    w("```sh")
    w("make bench                                  # everything above, then regenerates this file")
    w("cargo bench --bench stages                  # stages and channel hops only, no database")
    w("set -a && . .stack/env && set +a && cargo bench --bench postgres")
    w("scripts/bench-memory.sh 1000000 250000      # memory runs (needs the release binary)")
    w("```")
    w("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=float, help="ignore results older than this Unix time")
    parser.add_argument("--command", default="make bench", help="the command named in the header")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "capacity.md")
    parser.add_argument("--memory-large", type=int, default=1_000_000)
    parser.add_argument("--memory-small", type=int, default=250_000)
    args = parser.parse_args()
    try:
        text = build(args)
    except (ReportError, KeyError, ValueError) as e:
        print(f"capacity_report: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"capacity_report: wrote {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
