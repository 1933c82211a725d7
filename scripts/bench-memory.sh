#!/usr/bin/env bash
# Peak memory and end-to-end rate of the release binary on a file source.
#
# Usage: scripts/bench-memory.sh [COUNT...]        (default: 1000000 250000)
#
# For each COUNT: generates COUNT realistic messages into target/bench/logins-COUNT.ndjson with
# `sluice seed --count COUNT --seed 1 --bad-every 50` (kept and reused while it has COUNT lines),
# writes a file-source configuration next to it, runs `target/release/sluice run` under
# `/usr/bin/time -v` into a throwaway schema (dropped after each run) SLUICE_BENCH_MEMORY_RUNS
# times (default 3), and saves what it measured in target/bench/memory-COUNT.json: the median peak
# RSS (and the range), median wall and CPU time, messages per second and the run's summary counts.
# The capacity report (scripts/capacity_report.py) reads those files.
#
# The database comes from SLUICE_DATABASE_URL, as for the daemon (`make bench` loads .stack/env).
# Channel capacities and chunk size are the defaults; the sink uses the backfill settings of
# config/file-backfill.toml (batch_rows 10000, linger_ms 100). Build the binary first
# (`cargo build --release --bins`).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

BIN="${SLUICE_BIN:-$ROOT/target/release/sluice}"
OUT="$ROOT/target/bench"
TIME=/usr/bin/time
# The masking key of these runs; any key of 16+ bytes costs the same.
export SLUICE_MASK_KEY="${SLUICE_BENCH_MASK_KEY:-capacity-bench-mask-key-0123456789}"

die() {
    printf 'bench-memory: error: %s\n' "$*" >&2
    exit 1
}
say() { printf 'bench-memory: %s\n' "$*" >&2; }

[[ -x $BIN ]] || die "$BIN is missing; run \`cargo build --release --bins\` first"
[[ -x $TIME ]] || die "$TIME (GNU time) is missing; install the \`time\` package"
[[ -n ${SLUICE_DATABASE_URL:-} ]] ||
    die "SLUICE_DATABASE_URL is not set; run \`make up\` and \`set -a && . .stack/env && set +a\`"
PSQL="$(command -v psql || true)"

# Runs per count; the report takes the median (peak RSS and wall time vary a little run to run).
RUNS="${SLUICE_BENCH_MEMORY_RUNS:-3}"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "SLUICE_BENCH_MEMORY_RUNS must be a positive number, got $RUNS"

counts=("$@")
[[ ${#counts[@]} -gt 0 ]] || counts=(1000000 250000)
mkdir -p "$OUT"

SCHEMAS=()
drop_schemas() {
    [[ ${#SCHEMAS[@]} -gt 0 ]] || return 0
    if [[ -z $PSQL ]]; then
        say "psql not found: drop schema(s) ${SCHEMAS[*]} by hand"
        return 0
    fi
    for schema in "${SCHEMAS[@]}"; do
        PGOPTIONS="-c client_min_messages=warning" "$PSQL" -X -q -v ON_ERROR_STOP=1 "$SLUICE_DATABASE_URL" \
            -c "DROP SCHEMA IF EXISTS \"$schema\" CASCADE" >/dev/null ||
            say "could not drop schema $schema"
    done
    SCHEMAS=()
}
trap drop_schemas EXIT

# "h:mm:ss" or "m:ss.ss" from GNU time, in seconds.
to_seconds() {
    awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; printf "%.3f", s }' <<<"$1"
}

for count in "${counts[@]}"; do
    [[ $count =~ ^[1-9][0-9]*$ ]] || die "not a message count: $count"
    data="$OUT/logins-$count.ndjson"
    config="$OUT/memory-$count.toml"
    schema="bench_mem_$$_$count"
    cat >"$config" <<EOF
# Written by scripts/bench-memory.sh for a memory run; regenerated on every run.
[source]
kind = "file"

[source.file]
path = "logins-$count.ndjson"

[sink.postgres]
table = "$schema.user_logins"
ledger_table = "$schema.sluice_ledger"
dedupe = false
batch_rows = 10000
linger_ms = 100

[dead_letter]
table = "$schema.user_logins_rejected"
EOF

    if [[ ! -s $data ]] || [[ $(wc -l <"$data") -ne $count ]]; then
        say "generating $count messages into ${data#"$ROOT"/}"
        "$BIN" seed --config "$config" --count "$count" --seed 1 --bad-every 50 --force 2>/dev/null ||
            die "sluice seed failed"
    fi
    bytes=$(stat -c %s "$data")

    runs=()
    for run in $(seq 1 "$RUNS"); do
        say "running sluice on $count messages, run $run of $RUNS (schema $schema)"
        SCHEMAS+=("$schema")
        timing="$OUT/memory-$count.time"
        stdout="$OUT/memory-$count.out"
        log="$OUT/memory-$count.log"
        if ! "$TIME" -v -o "$timing" "$BIN" run --config "$config" >"$stdout" 2>"$log"; then
            tail -n 20 "$log" >&2
            die "sluice run failed on $count messages (log: ${log#"$ROOT"/})"
        fi
        drop_schemas

        field() { # field LABEL: the value after "LABEL: " in GNU time's report
            awk -v label="$1" 'index($0, label ": ") { sub(/^.*: /, ""); print; exit }' "$timing"
        }
        rss_kib=$(field "Maximum resident set size (kbytes)")
        wall=$(to_seconds "$(field "Elapsed (wall clock) time (h:mm:ss or m:ss)")")
        user=$(field "User time (seconds)")
        sys=$(field "System time (seconds)")
        summary=$(grep -E '^sluice: received=' "$stdout" | tail -n 1)
        [[ -n $summary ]] || die "no summary line in ${stdout#"$ROOT"/}"
        value() { sed -E "s/.* $1=([0-9]+).*/\\1/" <<<"$summary"; }
        received=$(value received)
        loaded=$(value loaded)
        rejected=$(value rejected)
        duplicates=$(value duplicates)
        [[ $received -eq $count ]] || die "the run received $received of $count messages"
        [[ $((loaded + rejected)) -eq $count ]] ||
            die "the run loaded $loaded and rejected $rejected of $count messages"
        runs+=("$rss_kib $wall $user $sys")
        say "$(awk -v c="$count" -v k="$rss_kib" -v w="$wall" \
            'BEGIN { printf "%d messages: peak RSS %.1f MiB, %.2f s wall, %.0f messages/s", c, k / 1024, w, c / w }')"
    done

    # The median run by peak RSS and by wall time (each on its own), plus every run.
    result="$OUT/memory-$count.json"
    printf '%s\n' "${runs[@]}" | awk -v count="$count" -v bytes="$bytes" -v received="$received" \
        -v loaded="$loaded" -v rejected="$rejected" -v duplicates="$duplicates" \
        -v when="$(date -u +%Y-%m-%dT%H:%M:%SZ)" '
        { rss[NR] = $1; wall[NR] = $2; user[NR] = $3; sys[NR] = $4 }
        function median(a, n,   i, j, t, b) {
            for (i = 1; i <= n; i++) b[i] = a[i]
            for (i = 2; i <= n; i++) for (j = i; j > 1 && b[j - 1] > b[j]; j--) { t = b[j]; b[j] = b[j - 1]; b[j - 1] = t }
            return n % 2 ? b[(n + 1) / 2] : (b[n / 2] + b[n / 2 + 1]) / 2
        }
        END {
            n = NR
            mr = median(rss, n); mw = median(wall, n); mu = median(user, n); ms = median(sys, n)
            lo = rss[1]; hi = rss[1]
            for (i = 2; i <= n; i++) { if (rss[i] < lo) lo = rss[i]; if (rss[i] > hi) hi = rss[i] }
            printf "{\n"
            printf "  \"messages\": %d,\n  \"runs\": %d,\n  \"file_bytes\": %d,\n  \"avg_message_bytes\": %.1f,\n", count, n, bytes, bytes / count - 1
            printf "  \"max_rss_kib\": %d,\n  \"max_rss_mib\": %.1f,\n", mr, mr / 1024
            printf "  \"max_rss_mib_min\": %.1f,\n  \"max_rss_mib_max\": %.1f,\n", lo / 1024, hi / 1024
            printf "  \"wall_seconds\": %.3f,\n  \"user_seconds\": %.2f,\n  \"system_seconds\": %.2f,\n", mw, mu, ms
            printf "  \"messages_per_second\": %.0f,\n", count / mw
            printf "  \"received\": %d,\n  \"loaded\": %d,\n  \"rejected\": %d,\n  \"duplicates\": %d,\n", received, loaded, rejected, duplicates
            printf "  \"batch_rows\": 10000,\n  \"channel_capacity\": \"default\",\n"
            printf "  \"each_run\": ["
            for (i = 1; i <= n; i++) printf "%s{\"max_rss_kib\": %d, \"wall_seconds\": %.3f, \"user_seconds\": %.2f, \"system_seconds\": %.2f}", (i > 1 ? ", " : ""), rss[i], wall[i], user[i], sys[i]
            printf "],\n"
            printf "  \"measured_at\": \"%s\"\n}\n", when
        }' >"$result"
done
