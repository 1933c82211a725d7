#!/usr/bin/env bash
# The local stack sluice's tests, demo and benchmarks run against: an SQS
# emulator, a Kinesis emulator and a PostgreSQL server.
#
# Usage: scripts/stack.sh up|down|status
#
#   up      Reuse what already answers, start what is missing, then write
#           .stack/env (sourced by make: `set -a && . .stack/env && set +a`).
#           Idempotent.
#   down    Stop what `up` started; never a server it merely reused.
#   status  Show what answers where, and what `up` started.
#
# SQS, first match wins: anything answering on 127.0.0.1:$SLUICE_AWS_PORT;
#   LocalStack from docker-compose.yml when a Docker engine answers; moto from
#   a virtualenv built from scripts/requirements-moto.txt (.stack/venv).
# Kinesis: LocalStack when it is the SQS emulator (it serves both); else
#   anything answering on 127.0.0.1:$SLUICE_KINESIS_PORT; else kinesis-mock
#   (npm package kinesis-local, pinned below, in .stack/kinesis) on Node.js.
# PostgreSQL, first match wins: $SLUICE_DATABASE_URL; a server on
#   127.0.0.1:5432 accepting user postgres; the postgres service of
#   docker-compose.yml; a private throwaway cluster made with the installed
#   initdb on 127.0.0.1:$SLUICE_PRIVATE_PG_PORT.
#
# Knobs: SLUICE_AWS_PORT (4566), SLUICE_KINESIS_PORT (4567),
#   SLUICE_PRIVATE_PG_PORT (54329), SLUICE_STACK_USE_DOCKER=0 (never Docker),
#   SLUICE_STACK_FORCE_PRIVATE_PG=1 (always the private cluster),
#   SLUICE_PYTHON (a Python >= 3.11 for the moto virtualenv).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
STACK="$ROOT/.stack"
ENV_FILE="$STACK/env"
COMPOSE_FILE="$ROOT/docker-compose.yml"
# docker compose services `up` started, one per line.
DOCKER_RECORD="$STACK/docker-services"

HOST=127.0.0.1
AWS_PORT="${SLUICE_AWS_PORT:-4566}"
AWS_ENDPOINT="http://$HOST:$AWS_PORT"
KINESIS_PORT="${SLUICE_KINESIS_PORT:-4567}"
PRIVATE_PG_PORT="${SLUICE_PRIVATE_PG_PORT:-54329}"

REQUIREMENTS="$ROOT/scripts/requirements-moto.txt"
VENV="$STACK/venv"
KINESIS_MOCK_VERSION=0.6.2
KINESIS_PACKAGE="$STACK/kinesis/node_modules/kinesis-local"

say() { printf 'stack: %s\n' "$*"; }
die() {
    printf 'stack: error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
have curl || die "needs curl (Debian/Ubuntu: apt-get install -y curl)"

# True if the URL gives any HTTP answer at all.
http_answers() { curl --noproxy '*' -s -o /dev/null --connect-timeout 2 --max-time 5 "$1"; }
http_ok() { curl --noproxy '*' -fs -o /dev/null --connect-timeout 2 --max-time 5 "$1"; }

# ---------------------------------------------------------------------------
# Processes started by `up`: .stack/NAME.pid and .stack/NAME.log

# alive PID WORD: the process runs and its command line contains WORD (so a
# stale pid file never names an unrelated process that reuses the number).
alive() { [[ $1 =~ ^[0-9]+$ ]] && [[ "$(ps -o args= -p "$1" 2>/dev/null)" == *"$2"* ]]; }

# Prints the pid of NAME if `up` started it and it still runs.
our_pid() {
    local pid
    pid="$(cat "$STACK/$1.pid" 2>/dev/null)" && alive "$pid" "$STACK/" && printf '%s\n' "$pid"
}

stop_pid() { # stop_pid PID [SIGNAL]: waits up to 10 s, then kills
    local i
    kill -"${2:-TERM}" "$1" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$1" 2>/dev/null || true
}

stop_ours() { # stop_ours NAME
    local pid
    if pid="$(our_pid "$1")"; then
        say "stopping $1 (pid $pid)"
        stop_pid "$pid"
    fi
    rm -f "$STACK/$1.pid"
}

# start_server NAME PROBE_URL COMMAND...: starts COMMAND in the background, in
# its own session, and waits until PROBE_URL answers. The pid file names the
# server itself (the inner shell execs it).
start_server() {
    local name="$1" url="$2" pid="" deadline=$((SECONDS + 60))
    shift 2
    rm -f "$STACK/$name.pid"
    printf '\n==== %s: %s\n' "$(date '+%F %T')" "$*" >>"$STACK/$name.log"
    # shellcheck disable=SC2016
    setsid sh -c 'echo "$$" >"$1"; shift; exec "$@"' sh "$STACK/$name.pid" "$@" \
        </dev/null >>"$STACK/$name.log" 2>&1 9>&- &
    until [[ -n $pid ]] && http_answers "$url"; do
        pid="$(cat "$STACK/$name.pid" 2>/dev/null || true)"
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
            [[ -n $pid ]] && stop_pid "$pid"
            tail -n 20 "$STACK/$name.log" >&2
            die "$name did not answer on $url (log: .stack/$name.log)"
        fi
        sleep 0.3
    done
    say "started $name (pid $pid, log .stack/$name.log)"
}

# ---------------------------------------------------------------------------
# Docker: used only when nothing answers and an engine does

docker_usable() {
    if [[ -z ${DOCKER_USABLE:-} ]]; then
        DOCKER_USABLE=no
        if [[ ${SLUICE_STACK_USE_DOCKER:-1} != 0 ]] && have docker &&
            timeout 20 docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
            DOCKER_USABLE=yes
        fi
    fi
    [[ $DOCKER_USABLE == yes ]]
}

compose() { docker compose -f "$COMPOSE_FILE" "$@"; }

compose_start() { # compose_start SERVICE: waits for its healthcheck
    say "starting $1 with docker compose ..."
    compose up -d --wait "$1"
    grep -qsx "$1" "$DOCKER_RECORD" || printf '%s\n' "$1" >>"$DOCKER_RECORD"
}

localstack_ready() {
    local health
    health="$(curl --noproxy '*' -fs --max-time 5 "$AWS_ENDPOINT/_localstack/health")" &&
        grep -Eq '"sqs": *"(available|running)"' <<<"$health" &&
        grep -Eq '"kinesis": *"(available|running)"' <<<"$health"
}

# ---------------------------------------------------------------------------
# SQS: moto

# The venv is current when it was built from this requirements file.
moto_installed() {
    [[ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" == "$(sha256sum <"$REQUIREMENTS" | cut -d' ' -f1)" ]]
}

install_moto() {
    local python="" candidate
    for candidate in ${SLUICE_PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if have "$candidate" && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            python="$candidate"
            break
        fi
    done
    [[ -n $python ]] ||
        die "moto needs Python >= 3.11 with venv (Debian/Ubuntu: apt-get install -y python3 python3-venv), or set SLUICE_PYTHON"
    say "building .stack/venv from scripts/requirements-moto.txt with $python ..."
    rm -rf "$VENV"
    if ! "$python" -m venv "$VENV" ||
        ! "$VENV/bin/pip" install --disable-pip-version-check --no-input -q -r "$REQUIREMENTS"; then
        rm -rf "$VENV"
        die "could not build .stack/venv"
    fi
    # Written last: an interrupted build is redone on the next run.
    sha256sum <"$REQUIREMENTS" | cut -d' ' -f1 >"$VENV/.requirements.sha256"
}

ensure_sqs() {
    if http_answers "$AWS_ENDPOINT/"; then
        SQS_DESC="$(our_pid moto >/dev/null && echo "moto, started by make up" || echo "already running")"
        return
    fi
    stop_ours moto # hung, or serving another port
    if docker_usable; then
        compose_start localstack
        SQS_DESC="LocalStack (docker compose)"
    else
        moto_installed || install_moto
        start_server moto "$AWS_ENDPOINT/" "$VENV/bin/moto_server" -H "$HOST" -p "$AWS_PORT"
        SQS_DESC="moto, started by make up"
    fi
}

# ---------------------------------------------------------------------------
# Kinesis: kinesis-mock

kinesis_installed() {
    grep -qs "\"version\" *: *\"$KINESIS_MOCK_VERSION\"" "$KINESIS_PACKAGE/package.json"
}

install_kinesis() {
    if ! have node || ! have npm; then
        die "kinesis-mock needs Node.js >= 20 and npm (Debian/Ubuntu: apt-get install -y nodejs npm)"
    fi
    say "installing kinesis-local@$KINESIS_MOCK_VERSION into .stack/kinesis ..."
    npm install --prefix "$STACK/kinesis" --no-audit --no-fund --loglevel=error \
        "kinesis-local@$KINESIS_MOCK_VERSION" >/dev/null || die "npm install failed"
}

ensure_kinesis() {
    if localstack_ready; then
        KINESIS_ENDPOINT="$AWS_ENDPOINT"
        KINESIS_DESC="LocalStack"
        return
    fi
    KINESIS_ENDPOINT="http://$HOST:$KINESIS_PORT"
    if our_pid kinesis >/dev/null && ! kinesis_installed; then
        stop_ours kinesis # the pin changed
    fi
    if http_ok "$KINESIS_ENDPOINT/healthcheck"; then
        KINESIS_DESC="$(our_pid kinesis >/dev/null && echo "kinesis-mock, started by make up" || echo "already running")"
        return
    fi
    stop_ours kinesis
    kinesis_installed || install_kinesis
    # Plain HTTP on KINESIS_PORT; the TLS listener it always opens gets any
    # free port (0). Stream changes (create, delete, split, merge) complete at
    # once so tests need not wait; nothing is persisted across restarts.
    start_server kinesis "$KINESIS_ENDPOINT/healthcheck" env \
        KINESIS_MOCK_PLAIN_PORT="$KINESIS_PORT" KINESIS_MOCK_TLS_PORT=0 \
        KINESIS_MOCK_CERT_PATH="$KINESIS_PACKAGE/server.json" \
        CREATE_STREAM_DURATION=0ms DELETE_STREAM_DURATION=0ms SPLIT_SHARD_DURATION=0ms \
        MERGE_SHARDS_DURATION=0ms UPDATE_SHARD_COUNT_DURATION=0ms \
        SHOULD_PERSIST_DATA=false LOG_LEVEL=WARN \
        node "$KINESIS_PACKAGE/main.js"
    KINESIS_DESC="kinesis-mock $KINESIS_MOCK_VERSION, started by make up"
}

# ---------------------------------------------------------------------------
# PostgreSQL

pg_accepts() { # pg_accepts URL
    PGCONNECT_TIMEOUT=3 psql "$1" -XAtqc 'select 1' >/dev/null 2>&1
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# The private cluster's data directory. initdb refuses to run as root, so as
# root the cluster belongs to the postgres user, under /tmp (the checkout may
# sit where that user cannot go).
if ((EUID == 0)); then
    PG_DATA="/tmp/sluice-pg-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)/data"
else
    PG_DATA="$STACK/pgdata"
fi
PG_LOG="$(dirname "$PG_DATA")/postgres.log"

as_pg_owner() {
    if ((EUID == 0)); then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# The private cluster's postmaster pid, if it runs.
private_pg_pid() {
    local pid
    pid="$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null)" && alive "$pid" "$PG_DATA" && printf '%s\n' "$pid"
}

stop_private_pg() {
    local pid
    pid="$(private_pg_pid)" || return 0
    say "stopping the private PostgreSQL cluster (pid $pid)"
    stop_pid "$pid" INT # fast shutdown
}

# The directory of initdb and pg_ctl: from PATH, else the newest installed.
pg_bin_dir() {
    local d
    for d in "$(dirname "$(command -v initdb || echo /none/initdb)")" \
        $(printf '%s\n' /usr/lib/postgresql/*/bin /usr/pgsql-*/bin | sort -V -r); do
        [[ -x $d/initdb && -x $d/pg_ctl ]] && { printf '%s\n' "$d"; return; }
    done
    return 1
}

ensure_private_pg() {
    local bin major url="postgres://postgres@$HOST:$PRIVATE_PG_PORT/postgres"
    if private_pg_pid >/dev/null; then
        if pg_accepts "$url"; then
            DB_URL="$url" DB_DESC="private cluster $PG_DATA"
            return
        fi
        stop_private_pg # running on another port
    fi
    bin="$(pg_bin_dir)" || die "no initdb/pg_ctl found to start a private PostgreSQL cluster.
  Install PostgreSQL (Debian/Ubuntu: apt-get install -y postgresql), or
  point the stack at a server: export SLUICE_DATABASE_URL=postgres://USER:PASSWORD@HOST:PORT/DB"
    major="$("$bin/pg_ctl" --version | sed 's/.* \([0-9]*\).*/\1/')"
    if [[ "$(cat "$PG_DATA/PG_VERSION" 2>/dev/null)" != "$major" ]]; then
        say "initialising a private PostgreSQL $major cluster in $PG_DATA ..."
        [[ ! -L "$(dirname "$PG_DATA")" ]] || die "$(dirname "$PG_DATA") is a symlink; refusing to use it"
        mkdir -p "$(dirname "$PG_DATA")"
        chmod 700 "$(dirname "$PG_DATA")"
        if ((EUID == 0)); then
            id -u postgres >/dev/null 2>&1 || die "as root, the private cluster needs a 'postgres' user (useradd --system postgres)"
            chown postgres: "$(dirname "$PG_DATA")"
        fi
        rm -rf "$PG_DATA" "$PG_DATA.init"
        as_pg_owner "$bin/initdb" -D "$PG_DATA.init" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null ||
            die "initdb failed"
        # A throwaway cluster: durability traded for speed; TCP only.
        printf '%s\n' "listen_addresses = '$HOST'" "unix_socket_directories = ''" \
            "fsync = off" "synchronous_commit = off" "full_page_writes = off" >>"$PG_DATA.init/postgresql.conf"
        # TLS on, as on a real server, with a self-signed certificate for `localhost`: the tests
        # of every sslmode read it back with SHOW ssl_cert_file.
        if have openssl; then
            as_pg_owner openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=localhost \
                -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
                -keyout "$PG_DATA.init/server.key" -out "$PG_DATA.init/server.crt" >/dev/null 2>&1 &&
                printf '%s\n' "ssl = on" >>"$PG_DATA.init/postgresql.conf" ||
                say "could not make a TLS certificate; the private cluster runs without TLS"
        else
            say "no openssl: the private cluster runs without TLS (the TLS tests need it)"
        fi
        mv "$PG_DATA.init" "$PG_DATA"
    fi
    as_pg_owner "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -o "-p $PRIVATE_PG_PORT" start >/dev/null 9>&- ||
        { tail -n 20 "$PG_LOG" >&2; die "could not start the private cluster (log: $PG_LOG)"; }
    say "started the private PostgreSQL cluster on port $PRIVATE_PG_PORT (log: $PG_LOG)"
    DB_URL="$url" DB_DESC="private cluster $PG_DATA"
}

ensure_postgres() {
    local url
    have psql || die "needs psql (Debian/Ubuntu: apt-get install -y postgresql-client)"
    if [[ -n ${SLUICE_DATABASE_URL:-} ]]; then
        pg_accepts "$SLUICE_DATABASE_URL" ||
            die "SLUICE_DATABASE_URL is set but does not answer: $SLUICE_DATABASE_URL (unset it if it came from an old .stack/env)"
        DB_URL="$SLUICE_DATABASE_URL" DB_DESC="SLUICE_DATABASE_URL"
        return
    fi
    if [[ ${SLUICE_STACK_FORCE_PRIVATE_PG:-0} != 1 ]]; then
        # The system server (trust) or the compose container (password postgres).
        for url in "postgres://postgres@$HOST:5432/postgres" "postgres://postgres:postgres@$HOST:5432/postgres"; do
            if pg_accepts "$url"; then
                DB_URL="$url" DB_DESC="already running"
                return
            fi
        done
        if port_open 5432; then
            say "a server on $HOST:5432 rejects user postgres; using a private cluster"
        elif docker_usable; then
            compose_start postgres
            DB_URL="postgres://postgres:postgres@$HOST:5432/postgres" DB_DESC="postgres:15 (docker compose)"
            return
        fi
    fi
    ensure_private_pg
}

# ---------------------------------------------------------------------------
# Commands

# Tests always use the stack; the daemon's variables keep a value already set.
write_env() {
    local name value
    {
        printf '# Written by scripts/stack.sh up.\n'
        printf 'export SLUICE_TEST_DATABASE_URL=%q\n' "$DB_URL"
        printf 'export SLUICE_TEST_AWS_ENDPOINT=%q\n' "$AWS_ENDPOINT"
        printf 'export SLUICE_TEST_KINESIS_ENDPOINT=%q\n' "$KINESIS_ENDPOINT"
        while read -r name value; do
            # shellcheck disable=SC2016
            printf '[ -n "${%s:-}" ] || %s=%q; export %s\n' "$name" "$name" "$value" "$name"
        done <<EOF
AWS_ACCESS_KEY_ID test
AWS_SECRET_ACCESS_KEY test
AWS_REGION us-east-1
SLUICE_DATABASE_URL $DB_URL
SLUICE_SQS_ENDPOINT_URL $AWS_ENDPOINT
SLUICE_KINESIS_ENDPOINT_URL $KINESIS_ENDPOINT
EOF
    } >"$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
}

cmd_up() {
    ensure_sqs
    ensure_kinesis
    ensure_postgres
    write_env
    say "sqs       $AWS_ENDPOINT  ($SQS_DESC)"
    say "kinesis   $KINESIS_ENDPOINT  ($KINESIS_DESC)"
    say "postgres  $DB_URL  ($DB_DESC)"
    say "env file  .stack/env"
}

cmd_down() {
    local services
    stop_ours moto
    stop_ours kinesis
    if [[ -s $DOCKER_RECORD ]]; then
        mapfile -t services <"$DOCKER_RECORD"
        say "stopping docker compose services: ${services[*]}"
        compose rm --stop --force "${services[@]}"
        rm -f "$DOCKER_RECORD"
    fi
    stop_private_pg
    rm -f "$ENV_FILE"
    say "down (servers make up did not start are left alone)"
}

cmd_status() {
    local ok=0 name pid
    [[ -f $ENV_FILE ]] || { say "not up: no .stack/env (run make up)"; exit 1; }
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    probe() { # probe LABEL ADDRESS COMMAND...
        if "${@:3}"; then say "$1 $2  answers"; else say "$1 $2  does NOT answer"; ok=1; fi
    }
    probe "sqs      " "$SLUICE_TEST_AWS_ENDPOINT" http_answers "$SLUICE_TEST_AWS_ENDPOINT/"
    probe "kinesis  " "$SLUICE_TEST_KINESIS_ENDPOINT" http_answers "$SLUICE_TEST_KINESIS_ENDPOINT/"
    probe "postgres " "$SLUICE_TEST_DATABASE_URL" pg_accepts "$SLUICE_TEST_DATABASE_URL"
    for name in moto kinesis; do
        if pid="$(our_pid "$name")"; then say "started   $name (pid $pid)"; fi
    done
    if pid="$(private_pg_pid)"; then say "started   private PostgreSQL cluster $PG_DATA (pid $pid)"; fi
    if [[ -s $DOCKER_RECORD ]]; then say "started   docker compose: $(paste -sd' ' "$DOCKER_RECORD")"; fi
    return "$ok"
}

mkdir -p "$STACK"
# One `up` or `down` at a time per checkout; started servers do not inherit the lock (9>&-).
exec 9>"$STACK/lock"
flock -w 600 9 || die "another scripts/stack.sh holds .stack/lock"

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
        exit 2
        ;;
esac
