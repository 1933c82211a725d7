#!/usr/bin/env bash
# Local dependency stack for sluice's integration tests: an SQS emulator, a
# Kinesis emulator and a PostgreSQL server.
#
# Usage: scripts/stack.sh up|down|status|env
#
#   up      Make sure an emulator answers on 127.0.0.1:$SLUICE_AWS_PORT and a
#           PostgreSQL server answers, then write .stack/env (export lines
#           meant to be sourced: `. .stack/env`). Reuses whatever already
#           runs; starts only what is missing. Idempotent.
#   down    Stop what `up` started (never a server it merely reused).
#   status  Show what answers where.
#   env     Print the path of .stack/env (exit 1 if `up` has not run).
#
# Emulator, first match wins:
#   1. anything that already answers HTTP on 127.0.0.1:$SLUICE_AWS_PORT;
#   2. LocalStack via `docker compose` (docker-compose.yml) when a Docker
#      engine answers and SLUICE_STACK_USE_DOCKER is not 0;
#   3. moto_server from a project-local virtualenv (.stack/venv) built from
#      scripts/requirements-moto.txt.
# Kinesis emulator, first match wins:
#   1. LocalStack on the emulator port (it serves Kinesis too);
#   2. anything that answers /healthcheck on 127.0.0.1:$SLUICE_KINESIS_PORT;
#   3. kinesis-mock (npm package kinesis-local, pinned below) run with Node.js
#      from a project-local install (.stack/kinesis), plain HTTP.
# PostgreSQL, first match wins:
#   1. $SLUICE_DATABASE_URL, used as is;
#   2. a server on 127.0.0.1:5432 that accepts user postgres;
#   3. the postgres service of docker-compose.yml (same Docker rules as above);
#   4. a private throwaway cluster on 127.0.0.1:$SLUICE_PRIVATE_PG_PORT.
#   SLUICE_STACK_FORCE_PRIVATE_PG=1 skips straight to 4.
#
# Environment knobs (all optional):
#   SLUICE_AWS_PORT                emulator port (default 4566)
#   SLUICE_KINESIS_PORT            kinesis-mock's plain HTTP port (default 4567)
#   SLUICE_PRIVATE_PG_PORT         private cluster port (default 54329)
#   SLUICE_DATABASE_URL            use this database instead of looking for one
#   SLUICE_STACK_USE_DOCKER=0      never use Docker
#   SLUICE_STACK_FORCE_PRIVATE_PG=1  always use the private cluster
#   SLUICE_PYTHON                  Python (>= 3.11) used to build .stack/venv

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

STACK_DIR="$ROOT/.stack"
ENV_FILE="$STACK_DIR/env"
LOCK_FILE="$STACK_DIR/lock"
COMPOSE_FILE="$ROOT/docker-compose.yml"
REQUIREMENTS="$ROOT/scripts/requirements-moto.txt"
VENV="$STACK_DIR/venv"
VENV_STAMP="$VENV/.requirements.sha256"
MOTO_PID_FILE="$STACK_DIR/moto.pid"
MOTO_LOG="$STACK_DIR/moto.log"
# kinesis-mock, installed from the npm registry into .stack/kinesis.
KINESIS_MOCK_VERSION=0.6.2
KINESIS_DIR="$STACK_DIR/kinesis"
KINESIS_PACKAGE="$KINESIS_DIR/node_modules/kinesis-local"
KINESIS_PID_FILE="$STACK_DIR/kinesis.pid"
KINESIS_LOG="$STACK_DIR/kinesis.log"
# Names of docker compose services started by `up`, one per line.
DOCKER_RECORD="$STACK_DIR/docker-services"
# Data directory of the private cluster, written when `up` first uses it.
PRIVATE_PG_RECORD="$STACK_DIR/private-pg-datadir"
# Every database URL `up` has written to .stack/env, so that a shell that
# sourced an older .stack/env is not mistaken for a user's own setting.
DB_URL_RECORD="$STACK_DIR/database-urls"

LOCAL_HOST=127.0.0.1
AWS_PORT="${SLUICE_AWS_PORT:-4566}"
AWS_ENDPOINT="http://$LOCAL_HOST:$AWS_PORT"
KINESIS_PORT="${SLUICE_KINESIS_PORT:-4567}"
SYSTEM_PG_PORT=5432
PRIVATE_PG_PORT="${SLUICE_PRIVATE_PG_PORT:-54329}"
MOTO_START_TIMEOUT=30
KINESIS_START_TIMEOUT=60
LOCALSTACK_START_TIMEOUT=180
PG_START_TIMEOUT=60

# Filled in by ensure_emulator / ensure_postgres for the summary.
EMULATOR_DESC=""
KINESIS_ENDPOINT=""
KINESIS_DESC=""
DB_URL=""
DB_DESC=""
DB_VIA_COMPOSE=0

say() { printf 'stack: %s\n' "$*"; }
warn() { printf 'stack: warning: %s\n' "$*" >&2; }
die() {
    printf 'stack: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

for port_var in AWS_PORT KINESIS_PORT PRIVATE_PG_PORT; do
    if ! [[ ${!port_var} =~ ^[0-9]+$ ]] || ((${!port_var} < 1 || ${!port_var} > 65535)); then
        die "$port_var must be a TCP port number, got '${!port_var}'"
    fi
done
unset port_var

have() { command -v "$1" >/dev/null 2>&1; }

sha256_of_file() {
    if have sha256sum; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

sha256_of_string() {
    if have sha256sum; then
        printf '%s' "$1" | sha256sum | cut -d' ' -f1
    else
        printf '%s' "$1" | shasum -a 256 | cut -d' ' -f1
    fi
}

# Serialise concurrent `up`/`down` runs. Background servers are started with
# fd 9 closed so that they do not keep holding the lock.
take_lock() {
    mkdir -p "$STACK_DIR"
    if have flock; then
        exec 9>"$LOCK_FILE"
        flock -w 600 9 || die "could not lock $LOCK_FILE (another stack.sh still running?)"
    fi
}

# ---------------------------------------------------------------------------
# HTTP / process helpers

# True if anything answers HTTP at the URL (any status code counts).
http_answers() {
    if have curl; then
        curl --noproxy '*' -s -o /dev/null --connect-timeout 2 --max-time 5 "$1"
    elif have python3; then
        python3 - "$1" <<'PY'
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    opener.open(sys.argv[1], timeout=5)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)
PY
    else
        die "need curl (or python3) to probe $1"
    fi
}

http_get() {
    if have curl; then
        curl --noproxy '*' -fsS --connect-timeout 2 --max-time 5 "$1" 2>/dev/null
    else
        python3 - "$1" 2>/dev/null <<'PY'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.stdout.write(opener.open(sys.argv[1], timeout=5).read().decode())
PY
    fi
}

pid_cmdline() {
    if [[ -r /proc/$1/cmdline ]]; then
        tr '\0' ' ' <"/proc/$1/cmdline"
    else
        ps -p "$1" -o args= 2>/dev/null
    fi
}

# our_pid PID_FILE WORD: prints the pid recorded by `up` if that process is
# still alive and its command line contains WORD.
our_pid() {
    local pid
    [[ -f $1 ]] || return 1
    pid="$(cat "$1" 2>/dev/null || true)"
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(pid_cmdline "$pid" || true)" == *"$2"* ]] || return 1
    printf '%s\n' "$pid"
}

our_moto_pid() { our_pid "$MOTO_PID_FILE" moto_server; }
our_kinesis_pid() { our_pid "$KINESIS_PID_FILE" kinesis-local; }

stop_pid() {
    local pid="$1" i
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------
# Docker

DOCKER_STATE=""
docker_usable() {
    if [[ -z $DOCKER_STATE ]]; then
        DOCKER_STATE=no
        if [[ ${SLUICE_STACK_USE_DOCKER:-1} != 0 ]] && have docker && [[ -f $COMPOSE_FILE ]]; then
            local info_ok=1
            if have timeout; then
                timeout 20 docker info >/dev/null 2>&1 || info_ok=0
            else
                docker info >/dev/null 2>&1 || info_ok=0
            fi
            if ((info_ok)) && compose version >/dev/null 2>&1; then
                DOCKER_STATE=yes
            fi
        fi
    fi
    [[ $DOCKER_STATE == yes ]]
}

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose -f "$COMPOSE_FILE" "$@"
    elif have docker-compose; then
        docker-compose -f "$COMPOSE_FILE" "$@"
    else
        return 127
    fi
}

record_docker_service() {
    touch "$DOCKER_RECORD"
    grep -qx "$1" "$DOCKER_RECORD" || printf '%s\n' "$1" >>"$DOCKER_RECORD"
}

docker_service_recorded() {
    [[ -f $DOCKER_RECORD ]] && grep -qx "$1" "$DOCKER_RECORD"
}

# ---------------------------------------------------------------------------
# Emulator

localstack_ready() {
    local health
    health="$(http_get "$AWS_ENDPOINT/_localstack/health")" || return 1
    grep -Eq '"sqs": *"(available|running)"' <<<"$health" &&
        grep -Eq '"kinesis": *"(available|running)"' <<<"$health"
}

start_localstack() {
    say "starting LocalStack with docker compose ..."
    compose up -d localstack
    record_docker_service localstack
    local deadline=$((SECONDS + LOCALSTACK_START_TIMEOUT))
    until localstack_ready; do
        if ((SECONDS >= deadline)); then
            compose logs --tail 40 localstack >&2 || true
            die "LocalStack did not become ready on $AWS_ENDPOINT within ${LOCALSTACK_START_TIMEOUT}s"
        fi
        sleep 1
    done
    EMULATOR_DESC="LocalStack (docker compose, started)"
}

find_python() {
    local candidate
    for candidate in ${SLUICE_PYTHON:-} python3 python3.13 python3.12 python3.11; do
        have "$candidate" || continue
        # Print the real interpreter (not a pyenv-style shim).
        if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            "$candidate" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

venv_current() {
    [[ -x $VENV/bin/python && -x $VENV/bin/moto_server && -f $VENV_STAMP ]] || return 1
    [[ "$(cat "$VENV_STAMP")" == "$(sha256_of_file "$REQUIREMENTS")" ]] || return 1
    "$VENV/bin/python" -c 'import moto.server' >/dev/null 2>&1
}

# (Re)builds .stack/venv when it is missing, incomplete or built from another
# version of the requirements file. The stamp is written last, so an
# interrupted build is redone from scratch on the next run.
ensure_venv() {
    venv_current && return 0
    local python
    python="$(find_python)" ||
        die "moto needs Python >= 3.11 with the venv module (Debian/Ubuntu: apt-get install -y python3 python3-venv), or set SLUICE_PYTHON"
    say "building $VENV from scripts/requirements-moto.txt with $python ..."
    rm -rf "$VENV"
    "$python" -m venv "$VENV" ||
        { rm -rf "$VENV"; die "could not create a virtualenv (Debian/Ubuntu: apt-get install -y python3-venv)"; }
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$REQUIREMENTS" ||
        { rm -rf "$VENV"; die "pip install -r scripts/requirements-moto.txt failed"; }
    sha256_of_file "$REQUIREMENTS" >"$VENV_STAMP"
}

start_moto() {
    ensure_venv
    rm -f "$MOTO_PID_FILE"
    printf '\n==== %s: moto_server -H %s -p %s\n' "$(date '+%F %T')" "$LOCAL_HOST" "$AWS_PORT" >>"$MOTO_LOG"
    local launcher=()
    have setsid && launcher=(setsid)
    # The inner shell records its own pid and then execs moto_server, so the
    # pid file names the server whether or not setsid had to fork.
    # shellcheck disable=SC2016
    nohup "${launcher[@]}" sh -c 'echo "$$" >"$1"; shift; exec "$@"' sh "$MOTO_PID_FILE" \
        "$VENV/bin/moto_server" -H "$LOCAL_HOST" -p "$AWS_PORT" \
        </dev/null >>"$MOTO_LOG" 2>&1 9>&- &

    local deadline=$((SECONDS + MOTO_START_TIMEOUT)) pid=""
    while ((SECONDS < deadline)); do
        if [[ -z $pid && -s $MOTO_PID_FILE ]]; then
            pid="$(cat "$MOTO_PID_FILE")"
        fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$MOTO_PID_FILE"
            tail -n 30 "$MOTO_LOG" >&2 || true
            die "moto_server exited during startup (log: $MOTO_LOG)"
        fi
        if [[ -n $pid ]] && http_answers "$AWS_ENDPOINT/"; then
            EMULATOR_DESC="moto $("$VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null || true) (started, pid $pid, log .stack/moto.log)"
            return 0
        fi
        sleep 0.3
    done
    [[ -n $pid ]] && stop_pid "$pid"
    rm -f "$MOTO_PID_FILE"
    tail -n 30 "$MOTO_LOG" >&2 || true
    die "moto_server did not answer on $AWS_ENDPOINT within ${MOTO_START_TIMEOUT}s (log: $MOTO_LOG)"
}

ensure_emulator() {
    local pid
    if http_answers "$AWS_ENDPOINT/"; then
        if pid="$(our_moto_pid)"; then
            EMULATOR_DESC="moto (already running, pid $pid)"
        elif docker_service_recorded localstack; then
            EMULATOR_DESC="LocalStack (docker compose, already running)"
        else
            EMULATOR_DESC="existing server, not managed by stack.sh"
        fi
        return 0
    fi
    # Nothing answers there: a moto_server left by a previous `up` is either
    # hung or serving another port (SLUICE_AWS_PORT changed). The stack has
    # one emulator, so replace it.
    if pid="$(our_moto_pid)"; then
        local old_port
        old_port="$(pid_cmdline "$pid" | sed -n 's/.* -p \([0-9]*\).*/\1/p')"
        if [[ -n $old_port && $old_port != "$AWS_PORT" ]]; then
            say "stopping moto_server (pid $pid) on port $old_port to start it on $AWS_PORT"
        else
            warn "moto_server pid $pid does not answer on $AWS_ENDPOINT; restarting it"
        fi
        stop_pid "$pid"
    fi
    rm -f "$MOTO_PID_FILE"

    if docker_usable; then
        start_localstack
    else
        start_moto
    fi
}

# ---------------------------------------------------------------------------
# Kinesis emulator

kinesis_installed_version() {
    sed -n 's/^ *"version" *: *"\([^"]*\)".*/\1/p' "$KINESIS_PACKAGE/package.json" 2>/dev/null
}

# Installs kinesis-local@$KINESIS_MOCK_VERSION into .stack/kinesis unless that
# version is already there.
ensure_kinesis_installed() {
    [[ "$(kinesis_installed_version)" == "$KINESIS_MOCK_VERSION" && -f $KINESIS_PACKAGE/main.js ]] && return 0
    have node && have npm ||
        die "kinesis-mock needs Node.js (20 or later) and npm (Debian/Ubuntu: apt-get install -y nodejs npm)"
    say "installing kinesis-local@$KINESIS_MOCK_VERSION into $KINESIS_DIR ..."
    mkdir -p "$KINESIS_DIR"
    npm install --prefix "$KINESIS_DIR" --no-audit --no-fund --loglevel=error \
        "kinesis-local@$KINESIS_MOCK_VERSION" >/dev/null ||
        die "npm install kinesis-local@$KINESIS_MOCK_VERSION failed"
}

start_kinesis() {
    ensure_kinesis_installed
    rm -f "$KINESIS_PID_FILE"
    printf '\n==== %s: kinesis-local %s on port %s\n' "$(date '+%F %T')" "$KINESIS_MOCK_VERSION" "$KINESIS_PORT" >>"$KINESIS_LOG"
    local launcher=()
    have setsid && launcher=(setsid)
    # Plain HTTP on $KINESIS_PORT. kinesis-mock always opens a TLS listener as
    # well; port 0 lets the system pick a free one, since nothing uses it.
    # Stream state changes (create, delete, split, merge) complete at once,
    # and nothing is persisted: a restart starts empty.
    # shellcheck disable=SC2016
    nohup "${launcher[@]}" sh -c 'echo "$$" >"$1"; shift; exec "$@"' sh "$KINESIS_PID_FILE" \
        env KINESIS_MOCK_PLAIN_PORT="$KINESIS_PORT" KINESIS_MOCK_TLS_PORT=0 \
        KINESIS_MOCK_CERT_PATH="$KINESIS_PACKAGE/server.json" \
        CREATE_STREAM_DURATION=0ms DELETE_STREAM_DURATION=0ms \
        SPLIT_SHARD_DURATION=0ms MERGE_SHARDS_DURATION=0ms UPDATE_SHARD_COUNT_DURATION=0ms \
        SHOULD_PERSIST_DATA=false LOG_LEVEL=WARN \
        node "$KINESIS_PACKAGE/main.js" \
        </dev/null >>"$KINESIS_LOG" 2>&1 9>&- &

    local deadline=$((SECONDS + KINESIS_START_TIMEOUT)) pid=""
    while ((SECONDS < deadline)); do
        if [[ -z $pid && -s $KINESIS_PID_FILE ]]; then
            pid="$(cat "$KINESIS_PID_FILE")"
        fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$KINESIS_PID_FILE"
            tail -n 30 "$KINESIS_LOG" >&2 || true
            die "kinesis-mock exited during startup (log: $KINESIS_LOG)"
        fi
        if [[ -n $pid ]] && http_get "$KINESIS_ENDPOINT/healthcheck" >/dev/null; then
            KINESIS_DESC="kinesis-mock $KINESIS_MOCK_VERSION (started, pid $pid, log .stack/kinesis.log)"
            return 0
        fi
        sleep 0.3
    done
    [[ -n $pid ]] && stop_pid "$pid"
    rm -f "$KINESIS_PID_FILE"
    tail -n 30 "$KINESIS_LOG" >&2 || true
    die "kinesis-mock did not answer on $KINESIS_ENDPOINT within ${KINESIS_START_TIMEOUT}s (log: $KINESIS_LOG)"
}

ensure_kinesis() {
    local pid
    if localstack_ready; then
        KINESIS_ENDPOINT="$AWS_ENDPOINT"
        KINESIS_DESC="LocalStack, on the emulator port"
        return 0
    fi
    KINESIS_ENDPOINT="http://$LOCAL_HOST:$KINESIS_PORT"
    if pid="$(our_kinesis_pid)"; then
        if [[ "$(kinesis_installed_version)" == "$KINESIS_MOCK_VERSION" ]] &&
            http_get "$KINESIS_ENDPOINT/healthcheck" >/dev/null; then
            KINESIS_DESC="kinesis-mock $KINESIS_MOCK_VERSION (already running, pid $pid)"
            return 0
        fi
        # Another version (the pin changed), another port, or hung.
        say "stopping kinesis-mock (pid $pid) to start kinesis-local@$KINESIS_MOCK_VERSION on port $KINESIS_PORT"
        stop_pid "$pid"
    elif http_get "$KINESIS_ENDPOINT/healthcheck" >/dev/null; then
        KINESIS_DESC="existing server, not managed by stack.sh"
        return 0
    fi
    rm -f "$KINESIS_PID_FILE"
    start_kinesis
}

# ---------------------------------------------------------------------------
# PostgreSQL

pg_major_of() { # pg_major_of /path/to/pg_ctl -> 15
    "$1" --version 2>/dev/null | awk '{print $3}' | sed 's/[^0-9].*//'
}

pg_bin_candidates() {
    local d
    if have initdb; then dirname "$(command -v initdb)"; fi
    for d in /usr/lib/postgresql/*/bin /usr/pgsql-*/bin /usr/local/pgsql/bin \
        /opt/homebrew/opt/postgresql@*/bin /usr/local/opt/postgresql@*/bin; do
        [[ -d $d ]] && printf '%s\n' "$d"
    done | sort -V -r
}

# Prints a directory holding initdb and pg_ctl; of major version $1 if given.
find_pg_bin_dir() {
    local want="${1:-}" d
    while IFS= read -r d; do
        [[ -x $d/initdb && -x $d/pg_ctl ]] || continue
        if [[ -n $want && "$(pg_major_of "$d/pg_ctl")" != "$want" ]]; then
            continue
        fi
        printf '%s\n' "$d"
        return 0
    done < <(pg_bin_candidates)
    return 1
}

# Client tools (psql, pg_isready): PATH first, then the server bin dirs.
find_pg_tool() {
    local d
    if have "$1"; then
        command -v "$1"
        return 0
    fi
    while IFS= read -r d; do
        if [[ -x $d/$1 ]]; then
            printf '%s\n' "$d/$1"
            return 0
        fi
    done < <(pg_bin_candidates)
    return 1
}

PSQL="$(find_pg_tool psql || true)"
PG_ISREADY="$(find_pg_tool pg_isready || true)"

pg_answers() { # pg_answers HOST PORT
    if [[ -n $PG_ISREADY ]]; then
        "$PG_ISREADY" -q -h "$1" -p "$2" -t 3
    elif [[ -n $PSQL ]]; then
        PGCONNECT_TIMEOUT=3 "$PSQL" -X -Atq -h "$1" -p "$2" -U postgres -d postgres -c 'select 1' >/dev/null 2>&1
    else
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
    fi
}

psql_connects() { # psql_connects URL
    [[ -n $PSQL ]] || return 2
    PGCONNECT_TIMEOUT=5 "$PSQL" "$1" -X -Atq -c 'select 1' >/dev/null 2>&1
}

# psql against the chosen database: host psql, else psql inside the compose
# postgres container.
db_psql() {
    if [[ -n $PSQL ]]; then
        PGCONNECT_TIMEOUT=5 "$PSQL" "$DB_URL" -X "$@"
    elif ((DB_VIA_COMPOSE)); then
        compose exec -T postgres psql -U postgres -d postgres -X "$@"
    else
        return 127
    fi
}

no_postgres_binaries() {
    local why="no PostgreSQL server answers on $LOCAL_HOST:$SYSTEM_PG_PORT"
    [[ ${SLUICE_STACK_FORCE_PRIVATE_PG:-0} == 1 ]] && why="SLUICE_STACK_FORCE_PRIVATE_PG=1 is set"
    cat >&2 <<EOF
stack: error: $why, and no PostgreSQL binaries
stack: (initdb, pg_ctl) were found to start a private cluster.
stack: Either install PostgreSQL:
stack:     Debian/Ubuntu:  apt-get install -y postgresql
stack: or point the stack at a reachable server:
stack:     export SLUICE_DATABASE_URL=postgres://USER:PASSWORD@HOST:PORT/DB
EOF
    exit 1
}

# Sets PG_AS_ROOT, PG_DATA, PG_LOG, PG_BASE for the private cluster.
private_pg_layout() {
    if ((EUID == 0)); then
        # initdb refuses to run as root: run the cluster as the postgres
        # user, in a directory that user can reach (the checkout may live
        # under a home directory it cannot traverse).
        PG_AS_ROOT=1
        PG_BASE="/tmp/sluice-pg-$(sha256_of_string "$ROOT" | cut -c1-12)"
        PG_DATA="$PG_BASE/data"
        PG_LOG="$PG_BASE/postgres.log"
    else
        PG_AS_ROOT=0
        PG_BASE=""
        PG_DATA="$STACK_DIR/pgdata"
        PG_LOG="$STACK_DIR/postgres.log"
    fi
}

# Runs a PostgreSQL server-side command as the cluster owner.
pg_run() {
    if ((PG_AS_ROOT)); then
        if have runuser; then
            (cd / && runuser -u postgres -- "$@")
        else
            local cmd
            printf -v cmd '%q ' "$@"
            (cd / && su -s /bin/sh postgres -c "$cmd")
        fi
    else
        "$@"
    fi
}

prepare_root_pg_base() {
    id -u postgres >/dev/null 2>&1 ||
        die "running as root needs a 'postgres' system user to own the private cluster (useradd --system postgres), or set SLUICE_DATABASE_URL"
    if [[ -L $PG_BASE ]]; then
        die "$PG_BASE is a symlink; refusing to use it"
    fi
    if [[ ! -d $PG_BASE ]]; then
        mkdir -m 700 "$PG_BASE"
        chown postgres: "$PG_BASE"
    fi
    [[ "$(stat -c %U "$PG_BASE")" == postgres ]] ||
        die "$PG_BASE is not owned by postgres; remove it and retry"
}

# Socket directory inside the data directory, unless the path would exceed
# the unix socket path limit; then TCP only.
private_pg_socket_dir() {
    local sock="$PG_DATA/.s.PGSQL.$PRIVATE_PG_PORT"
    if ((${#sock} < 100)) && [[ $PG_DATA != *"'"* ]]; then
        printf '%s\n' "$PG_DATA"
    fi
}

private_pg_initdb() {
    local bindir="$1" tmp="$PG_DATA.init" out
    say "initialising a private PostgreSQL cluster in $PG_DATA ..."
    rm -rf "$tmp" "$PG_DATA"
    out="$STACK_DIR/initdb.out"
    if ! pg_run "$bindir/initdb" -D "$tmp" -U postgres --auth=trust -E UTF8 --no-locale >"$out" 2>&1; then
        cat "$out" >&2
        rm -rf "$tmp"
        die "initdb failed"
    fi
    # A throwaway test cluster: trade durability for speed.
    cat >>"$tmp/postgresql.conf" <<EOF

# Added by scripts/stack.sh (throwaway test cluster). Port and socket
# directory are passed on the pg_ctl command line.
listen_addresses = '$LOCAL_HOST'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    mv "$tmp" "$PG_DATA"
    rm -f "$out"
}

# pg_ctl status: 0 running, 3 not running, 4 no usable data directory.
private_pg_status() {
    local bindir="$1" rc=0
    pg_run "$bindir/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1 || rc=$?
    return "$rc"
}

private_pg_start() {
    local bindir="$1" sockdir opts out
    sockdir="$(private_pg_socket_dir)"
    opts="-p $PRIVATE_PG_PORT -k '$sockdir'"
    out="$STACK_DIR/pg_ctl.out"
    if ! pg_run "$bindir/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" -o "$opts" start \
        >"$out" 2>&1 9>&-; then
        cat "$out" >&2
        tail -n 30 "$PG_LOG" >&2 2>/dev/null || true
        rm -f "$out"
        die "could not start the private PostgreSQL cluster (log: $PG_LOG)"
    fi
    rm -f "$out"
}

ensure_private_pg() {
    local bindir version started=0
    private_pg_layout
    ((PG_AS_ROOT)) && prepare_root_pg_base
    mkdir -p "$(dirname "$PG_DATA")"
    if [[ -f $PG_DATA/PG_VERSION ]]; then
        version="$(cat "$PG_DATA/PG_VERSION")"
        bindir="$(find_pg_bin_dir "$version")" ||
            die "$PG_DATA was created by PostgreSQL $version but no PostgreSQL $version binaries were found; install them or delete that directory"
    else
        bindir="$(find_pg_bin_dir)" || no_postgres_binaries
        private_pg_initdb "$bindir"
    fi
    printf '%s\n' "$PG_DATA" >"$PRIVATE_PG_RECORD"

    if private_pg_status "$bindir"; then
        if ! pg_answers "$LOCAL_HOST" "$PRIVATE_PG_PORT"; then
            # Running, but not where we want it (e.g. the port changed).
            say "restarting the private cluster on port $PRIVATE_PG_PORT ..."
            pg_run "$bindir/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
            private_pg_start "$bindir"
            started=1
        fi
    else
        private_pg_start "$bindir"
        started=1
    fi
    DB_URL="postgres://postgres@$LOCAL_HOST:$PRIVATE_PG_PORT/postgres"
    psql_connects "$DB_URL" || [[ -z $PSQL ]] ||
        die "the private cluster runs but psql cannot connect to $DB_URL (log: $PG_LOG)"
    if ((started)); then
        DB_DESC="private cluster $PG_DATA (PostgreSQL $(cat "$PG_DATA/PG_VERSION"), started)"
    else
        DB_DESC="private cluster $PG_DATA (already running)"
    fi
}

start_compose_postgres() {
    say "starting PostgreSQL with docker compose ..."
    compose up -d postgres
    record_docker_service postgres
    local deadline=$((SECONDS + PG_START_TIMEOUT))
    # Probe from inside the container over TCP: during first start the image
    # runs a temporary socket-only server that must not count as ready.
    until compose exec -T postgres pg_isready -q -h 127.0.0.1 -U postgres -d postgres >/dev/null 2>&1 &&
        pg_answers "$LOCAL_HOST" "$SYSTEM_PG_PORT"; do
        if ((SECONDS >= deadline)); then
            compose logs --tail 40 postgres >&2 || true
            die "the postgres container did not become ready within ${PG_START_TIMEOUT}s"
        fi
        sleep 1
    done
    DB_URL="postgres://postgres:postgres@$LOCAL_HOST:$SYSTEM_PG_PORT/postgres"
    DB_VIA_COMPOSE=1
    DB_DESC="postgres:15 (docker compose, started)"
}

ensure_postgres() {
    local url

    # 1. The user's own database (not merely a URL of ours sourced back from
    #    .stack/env).
    if [[ -n ${SLUICE_DATABASE_URL:-} ]] && ! grep -qxF -- "$SLUICE_DATABASE_URL" "$DB_URL_RECORD" 2>/dev/null; then
        DB_URL="$SLUICE_DATABASE_URL"
        if [[ -z $PSQL ]]; then
            warn "psql not found; cannot check that SLUICE_DATABASE_URL answers"
        elif ! psql_connects "$DB_URL"; then
            die "SLUICE_DATABASE_URL is set but psql cannot connect to it: $DB_URL"
        fi
        DB_DESC="SLUICE_DATABASE_URL from the environment"
        return 0
    fi

    if [[ ${SLUICE_STACK_FORCE_PRIVATE_PG:-0} == 1 ]]; then
        ensure_private_pg
        return 0
    fi

    # 2. Whatever answers on 5432 (system server, or our compose container).
    if pg_answers "$LOCAL_HOST" "$SYSTEM_PG_PORT"; then
        for url in "postgres://postgres@$LOCAL_HOST:$SYSTEM_PG_PORT/postgres" \
            "postgres://postgres:postgres@$LOCAL_HOST:$SYSTEM_PG_PORT/postgres"; do
            if [[ -z $PSQL ]] || psql_connects "$url"; then
                DB_URL="$url"
                break
            fi
        done
        if [[ -n $DB_URL ]]; then
            if docker_service_recorded postgres; then
                DB_VIA_COMPOSE=1
                DB_DESC="postgres:15 (docker compose, already running)"
            else
                DB_DESC="existing server on $LOCAL_HOST:$SYSTEM_PG_PORT, not managed by stack.sh"
            fi
            return 0
        fi
        warn "a server answers on $LOCAL_HOST:$SYSTEM_PG_PORT but rejects user postgres (with no password and with password 'postgres'); using a private cluster instead"
        ensure_private_pg
        return 0
    fi

    # 3. Docker, 4. private cluster.
    if docker_usable; then
        start_compose_postgres
    else
        ensure_private_pg
    fi
}

ensure_pgcrypto() {
    local out rc=0
    out="$(db_psql -q -v ON_ERROR_STOP=1 \
        -c 'SET client_min_messages = warning; CREATE EXTENSION IF NOT EXISTS pgcrypto' 2>&1)" || rc=$?
    if ((rc == 0)); then
        PGCRYPTO_DESC="available"
    elif ((rc == 127)); then
        PGCRYPTO_DESC="not checked (psql not found)"
        warn "psql not found; could not create the pgcrypto extension"
    else
        PGCRYPTO_DESC="NOT available"
        warn "CREATE EXTENSION pgcrypto failed (tests that use it will fail): ${out:-unknown error}"
        warn "Debian/Ubuntu: apt-get install -y postgresql-contrib (or postgresql-<version>)"
    fi
}

# ---------------------------------------------------------------------------
# env file

# Characters that need no quoting inside "${VAR:-...}".
plain_value() {
    local re='^[A-Za-z0-9@:/._%?=&+,~-]*$'
    [[ $1 =~ $re ]]
}

single_quoted() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# export NAME, keeping a value the environment already has.
export_default_line() {
    local name="$1" value="$2"
    # The ${...} below is meant literally: it is expanded when the file is sourced.
    # shellcheck disable=SC2016
    if plain_value "$value"; then
        printf 'export %s="${%s:-%s}"\n' "$name" "$name" "$value"
    else
        printf 'if [ -z "${%s:-}" ]; then %s=%s; fi; export %s\n' \
            "$name" "$name" "$(single_quoted "$value")" "$name"
    fi
}

write_env_file() {
    local tmp="$ENV_FILE.tmp.$$"
    {
        printf '# Written by scripts/stack.sh up; regenerated on every run.\n'
        printf '# Source it: . .stack/env\n'
        printf '# emulator: %s\n' "$EMULATOR_DESC"
        printf '# kinesis:  %s\n' "$KINESIS_DESC"
        printf '# database: %s\n' "$DB_DESC"
        printf 'export SLUICE_TEST_DATABASE_URL=%s\n' "$(single_quoted "$DB_URL")"
        printf 'export SLUICE_TEST_AWS_ENDPOINT=%s\n' "$(single_quoted "$AWS_ENDPOINT")"
        printf 'export SLUICE_TEST_KINESIS_ENDPOINT=%s\n' "$(single_quoted "$KINESIS_ENDPOINT")"
        export_default_line AWS_ACCESS_KEY_ID test
        export_default_line AWS_SECRET_ACCESS_KEY test
        export_default_line AWS_REGION us-east-1
        # Python/CLI tooling reads AWS_DEFAULT_REGION rather than AWS_REGION.
        # shellcheck disable=SC2016
        printf 'export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-$AWS_REGION}"\n'
        export_default_line SLUICE_DATABASE_URL "$DB_URL"
        export_default_line SLUICE_SQS_ENDPOINT_URL "$AWS_ENDPOINT"
        export_default_line SLUICE_KINESIS_ENDPOINT_URL "$KINESIS_ENDPOINT"
    } >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
    if [[ $DB_DESC != "SLUICE_DATABASE_URL from the environment" ]] &&
        ! grep -qxF -- "$DB_URL" "$DB_URL_RECORD" 2>/dev/null; then
        printf '%s\n' "$DB_URL" >>"$DB_URL_RECORD"
    fi
}

# ---------------------------------------------------------------------------
# Commands

cmd_up() {
    take_lock
    PGCRYPTO_DESC=""
    ensure_emulator
    ensure_kinesis
    ensure_postgres
    ensure_pgcrypto
    write_env_file
    say "emulator  $AWS_ENDPOINT  $EMULATOR_DESC"
    say "kinesis   $KINESIS_ENDPOINT  $KINESIS_DESC"
    say "postgres  $DB_URL  $DB_DESC"
    say "pgcrypto  $PGCRYPTO_DESC"
    say "env file  $ENV_FILE  (load with: . .stack/env)"
}

stop_private_pg() {
    local data version bindir
    [[ -f $PRIVATE_PG_RECORD ]] || return 0
    data="$(cat "$PRIVATE_PG_RECORD")"
    [[ -f $data/PG_VERSION ]] || return 0
    private_pg_layout
    PG_DATA="$data"
    version="$(cat "$PG_DATA/PG_VERSION")"
    bindir="$(find_pg_bin_dir "$version")" || {
        warn "no PostgreSQL $version binaries found; cannot stop the private cluster in $PG_DATA"
        return 0
    }
    if private_pg_status "$bindir"; then
        say "stopping the private PostgreSQL cluster ($PG_DATA) ..."
        pg_run "$bindir/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
    else
        say "private PostgreSQL cluster not running"
    fi
}

cmd_down() {
    take_lock
    local pid services=()
    if pid="$(our_moto_pid)"; then
        say "stopping moto_server (pid $pid) ..."
        stop_pid "$pid"
    fi
    rm -f "$MOTO_PID_FILE"
    if pid="$(our_kinesis_pid)"; then
        say "stopping kinesis-mock (pid $pid) ..."
        stop_pid "$pid"
    fi
    rm -f "$KINESIS_PID_FILE"

    if [[ -s $DOCKER_RECORD ]]; then
        mapfile -t services <"$DOCKER_RECORD"
        if have docker && docker info >/dev/null 2>&1; then
            say "stopping docker compose services: ${services[*]} ..."
            compose rm --stop --force "${services[@]}"
            # Remove the project network too once nothing else of it runs.
            if [[ -z "$(compose ps -q 2>/dev/null)" ]]; then
                compose down
            fi
        else
            warn "docker compose services ${services[*]} were started but Docker does not answer; skipping"
        fi
        rm -f "$DOCKER_RECORD"
    fi

    stop_private_pg
    rm -f "$ENV_FILE"
    say "down (servers stack.sh did not start were left alone)"
}

cmd_status() {
    local ok=1 pid url data version bindir port
    if http_answers "$AWS_ENDPOINT/"; then
        if pid="$(our_moto_pid)"; then
            say "emulator  $AWS_ENDPOINT  answers: moto started by stack.sh (pid $pid)"
        elif localstack_ready; then
            say "emulator  $AWS_ENDPOINT  answers: LocalStack$(docker_service_recorded localstack && printf ' (docker compose, started by stack.sh)')"
        else
            say "emulator  $AWS_ENDPOINT  answers: not managed by stack.sh"
        fi
    else
        say "emulator  $AWS_ENDPOINT  does NOT answer"
        ok=0
    fi

    if localstack_ready; then
        say "kinesis   $AWS_ENDPOINT  LocalStack"
    elif http_get "http://$LOCAL_HOST:$KINESIS_PORT/healthcheck" >/dev/null; then
        if pid="$(our_kinesis_pid)"; then
            say "kinesis   http://$LOCAL_HOST:$KINESIS_PORT  answers: kinesis-mock started by stack.sh (pid $pid)"
        else
            say "kinesis   http://$LOCAL_HOST:$KINESIS_PORT  answers: not managed by stack.sh"
        fi
    else
        say "kinesis   http://$LOCAL_HOST:$KINESIS_PORT  does NOT answer"
        ok=0
    fi

    if pg_answers "$LOCAL_HOST" "$SYSTEM_PG_PORT"; then
        say "postgres  $LOCAL_HOST:$SYSTEM_PG_PORT  answers$(docker_service_recorded postgres && printf ' (docker compose, started by stack.sh)')"
    else
        say "postgres  $LOCAL_HOST:$SYSTEM_PG_PORT  does not answer"
    fi
    if [[ -f $PRIVATE_PG_RECORD ]]; then
        data="$(cat "$PRIVATE_PG_RECORD")"
        if [[ -f $data/PG_VERSION ]]; then
            private_pg_layout
            PG_DATA="$data"
            version="$(cat "$PG_DATA/PG_VERSION")"
            if bindir="$(find_pg_bin_dir "$version")" && private_pg_status "$bindir"; then
                # Line 4 of postmaster.pid is the port the server listens on.
                port="$(sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null || true)"
                port="${port:-$PRIVATE_PG_PORT}"
                say "private   $LOCAL_HOST:$port  cluster $PG_DATA running$(pg_answers "$LOCAL_HOST" "$port" || printf ' but NOT answering')"
            else
                say "private   cluster $PG_DATA stopped"
            fi
        fi
    fi

    if [[ -f $ENV_FILE ]]; then
        url="$(sed -n "s/^export SLUICE_TEST_DATABASE_URL='\(.*\)'$/\1/p" "$ENV_FILE")"
        if [[ -z $PSQL ]]; then
            say "database  $url  (psql not found, not checked)"
        elif psql_connects "$url"; then
            say "database  $url  answers (from .stack/env)"
        else
            say "database  $url  does NOT answer (from .stack/env)"
            ok=0
        fi
        say "env file  $ENV_FILE"
    else
        say "env file  missing (run scripts/stack.sh up)"
        ok=0
    fi
    ((ok))
}

cmd_env() {
    if [[ -f $ENV_FILE ]]; then
        printf '%s\n' "$ENV_FILE"
    else
        printf 'stack: %s does not exist; run scripts/stack.sh up first\n' "$ENV_FILE" >&2
        exit 1
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac
