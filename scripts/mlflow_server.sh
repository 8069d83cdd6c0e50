#!/usr/bin/env bash
# A shared MLflow tracking server: runs in PostgreSQL, artifacts uploaded and downloaded through it.
#
#   bash scripts/mlflow_server.sh start    (make mlflow-server)       start both; print the tracking URI
#   bash scripts/mlflow_server.sh stop     (make mlflow-server-stop)  stop both; runs and artifacts stay
#   bash scripts/mlflow_server.sh status
#
# Everything lives in MLFLOW_SERVER_DIR (default: .mlflow-server/ at the repository root, gitignored):
#   pg/          the PostgreSQL cluster, made by initdb on the first start and kept
#   socket/      its unix socket: the database listens on no TCP port at all
#   artifacts/   the artifact store; clients reach it through the server (mlflow-artifacts:/), not the disk
#   mlflow.pid, mlflow.uri, mlflow.log, postgres.log
#
# MLFLOW_SERVER_HOST (default 127.0.0.1: this machine only; 0.0.0.0 for a team's LAN),
# MLFLOW_SERVER_PORT (5000), MLFLOW_SERVER_WORKERS (2), MLFLOW_SERVER_START_TIMEOUT (180 s).
# A team's managed services instead of the local ones: MLFLOW_BACKEND_STORE_URI
# (postgresql://user:password@host:5432/db; no local cluster is made) and MLFLOW_ARTIFACTS_DESTINATION
# (s3://bucket/prefix; credentials from the usual AWS_* variables).
#
# PostgreSQL refuses to run as root: as root, the cluster runs as MLFLOW_SERVER_PG_USER (default
# postgres, made by Debian's package), which must be able to reach MLFLOW_SERVER_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/postgres_bin.sh"

# Absolute: the unix socket is named by its path, and PostgreSQL wants an absolute one.
DIR=$(realpath -m "${MLFLOW_SERVER_DIR:-$ROOT/.mlflow-server}")
HOST=${MLFLOW_SERVER_HOST:-127.0.0.1}
PORT=${MLFLOW_SERVER_PORT:-5000}
WORKERS=${MLFLOW_SERVER_WORKERS:-2}
START_TIMEOUT=${MLFLOW_SERVER_START_TIMEOUT:-180}
PG_USER=${MLFLOW_SERVER_PG_USER:-postgres}

say() { echo "mlflow-server: $*"; }
die() { echo "mlflow-server: ERROR: $*" >&2; exit 1; }

# The cluster's programs run as an unprivileged user when this script runs as root.
as_pg() {
    if [[ "$(id -u)" -eq 0 ]]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

mlflow_pid() {
    local pid
    [[ -f "$DIR/mlflow.pid" ]] || return 1
    pid=$(cat "$DIR/mlflow.pid")
    # A pid file left by a reboot may name an unrelated process now.
    [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q mlflow || return 1
    echo "$pid"
}

cluster_running() {
    [[ -f "$DIR/pg/PG_VERSION" ]] && as_pg "$BIN/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1
}

# Prints the SQLAlchemy URI of the local cluster's `mlflow` database (and nothing else on stdout),
# making and starting the cluster as needed.
local_backend() {
    local socket="$DIR/socket"
    # A unix socket path has at most 107 bytes; the server's own socket file adds 17.
    (( ${#socket} + 17 <= 107 )) \
        || die "$socket is too long a path for a unix socket; set MLFLOW_SERVER_DIR to a shorter folder"
    BIN=$(postgres_bin_dir) || die "no PostgreSQL server programs (initdb); run: bash scripts/install_postgres.sh"
    if [[ "$(id -u)" -eq 0 ]]; then
        id -u "$PG_USER" >/dev/null 2>&1 \
            || die "running as root, and user $PG_USER (to run PostgreSQL as) does not exist; set MLFLOW_SERVER_PG_USER"
        runuser -u "$PG_USER" -- test -x "$DIR" \
            || die "user $PG_USER cannot reach $DIR (a parent folder is private); set MLFLOW_SERVER_DIR to one it can"
    fi
    if [[ ! -f "$DIR/pg/PG_VERSION" ]]; then
        say "making a PostgreSQL cluster in $DIR/pg" >&2
        mkdir -p "$DIR/pg" "$DIR/socket"
        touch "$DIR/postgres.log"
        [[ "$(id -u)" -ne 0 ]] || chown "$PG_USER" "$DIR/pg" "$DIR/socket" "$DIR/postgres.log"
        chmod 700 "$DIR/pg" "$DIR/socket"
        # trust: only this socket's folder (mode 700) can reach the database.
        as_pg "$BIN/initdb" -D "$DIR/pg" -U mlflow --auth=trust -E UTF8 >>"$DIR/postgres.log" 2>&1 \
            || die "initdb failed; see $DIR/postgres.log"
    fi
    if ! cluster_running; then
        as_pg "$BIN/pg_ctl" -D "$DIR/pg" -l "$DIR/postgres.log" -w -t 60 \
            -o "-c listen_addresses='' -c unix_socket_directories='$socket'" start >/dev/null \
            || die "PostgreSQL did not start; see $DIR/postgres.log"
    fi
    local query="SELECT 1 FROM pg_database WHERE datname = 'mlflow'"
    if [[ -z "$("$BIN/psql" -h "$socket" -U mlflow -d postgres -tAc "$query")" ]]; then
        "$BIN/createdb" -h "$socket" -U mlflow mlflow
    fi
    echo "postgresql+psycopg2://mlflow@/mlflow?host=$socket"
}

healthy() {
    python3 - "$1" <<'PY'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

start() {
    local pid uri backend store store_args artifacts uri_host waited=0
    mkdir -p "$DIR"
    if pid=$(mlflow_pid); then
        say "already running (pid $pid)"
        say "tracking URI $(cat "$DIR/mlflow.uri")"
        return 0
    fi
    command -v mlflow >/dev/null || die "mlflow not on PATH; run make setup and source .venv/bin/activate"
    # Else the health check below could be answered by whatever holds the port.
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        die "port $PORT is taken (another server?); set MLFLOW_SERVER_PORT, or stop it"
    fi
    if [[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
        # mlflow server reads it from the environment: its password stays out of ps and of this output.
        store="the database of MLFLOW_BACKEND_STORE_URI"
        store_args=()
    else
        backend=$(local_backend)
        store="PostgreSQL ($DIR/pg)"
        store_args=(--backend-store-uri "$backend")
    fi
    artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$DIR/artifacts}
    [[ -n "${MLFLOW_ARTIFACTS_DESTINATION:-}" ]] || mkdir -p "$artifacts"
    uri_host=$HOST
    [[ "$HOST" != "0.0.0.0" ]] || uri_host=$(hostname)
    uri="http://$uri_host:$PORT"
    # The runs of a pipeline need no GenAI job runner (eight more processes); true turns it back on.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
    # Its own session, so that stop can end the server with every worker it forked.
    setsid mlflow server ${store_args[@]+"${store_args[@]}"} --serve-artifacts --artifacts-destination "$artifacts" \
        --host "$HOST" --port "$PORT" --workers "$WORKERS" >>"$DIR/mlflow.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$DIR/mlflow.pid"
    echo "$uri" >"$DIR/mlflow.uri"
    until healthy "http://127.0.0.1:$PORT" 2>/dev/null || healthy "$uri"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$DIR/mlflow.log" >&2
            die "mlflow server exited; see $DIR/mlflow.log"
        fi
        (( waited < START_TIMEOUT )) || die "mlflow server not answering after $START_TIMEOUT s; see $DIR/mlflow.log"
        sleep 1
        waited=$((waited + 1))
    done
    say "running (pid $pid): runs in $store, artifacts in $artifacts"
    say "tracking URI $uri"
    say "use it: dvc exp run -S mlflow.tracking_uri=$uri   (or set mlflow.tracking_uri in params.yaml)"
}

stop() {
    local pid waited=0
    if pid=$(mlflow_pid); then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
        while kill -0 "$pid" 2>/dev/null && (( waited < 30 )); do sleep 1; waited=$((waited + 1)); done
        kill -KILL -- "-$pid" 2>/dev/null || true
        say "mlflow server (pid $pid) stopped"
    else
        say "no mlflow server running from $DIR"
    fi
    rm -f "$DIR/mlflow.pid"
    if [[ -f "$DIR/pg/PG_VERSION" ]] && BIN=$(postgres_bin_dir) && cluster_running; then
        as_pg "$BIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null
        say "PostgreSQL ($DIR/pg) stopped; runs and artifacts are kept in $DIR"
    fi
}

status() {
    local pid
    if pid=$(mlflow_pid); then
        say "running (pid $pid), tracking URI $(cat "$DIR/mlflow.uri")"
    else
        say "not running"
        return 3
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
