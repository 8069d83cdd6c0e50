#!/usr/bin/env bash
# Install the PostgreSQL server used by `make mlflow-server` (scripts/mlflow_server.sh) and
# tests/e2e/test_mlflow_server.py.
#
# Idempotent: installs Debian's `postgresql` package with apt-get only when no initdb is found,
# on PATH or under /usr/lib/postgresql/*/bin (running `apt-get update` first in that case). Uses
# sudo only when not root. The Python side (psycopg2-binary) is a dependency: pip install -e .
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/postgres_bin.sh"

if bindir=$(postgres_bin_dir); then
    echo "install_postgres: initdb and pg_ctl found in $bindir; nothing to do."
else
    echo "install_postgres: no initdb on PATH or under /usr/lib/postgresql/*/bin; installing postgresql with apt-get."

    if [[ "$(id -u)" -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
        echo "install_postgres: not root, using sudo."
    else
        echo "install_postgres: ERROR: not root and sudo is not available; run this script as root." >&2
        exit 1
    fi

    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_postgres: ERROR: apt-get not found; install the PostgreSQL server (initdb, pg_ctl) by hand." >&2
        exit 1
    fi

    echo "install_postgres: running apt-get update"
    ${SUDO[@]+"${SUDO[@]}"} apt-get update
    echo "install_postgres: running apt-get install -y postgresql"
    ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
    if ! bindir=$(postgres_bin_dir); then
        echo "install_postgres: ERROR: initdb still missing after install." >&2
        exit 1
    fi
    echo "install_postgres: installed."
fi

echo "install_postgres: $("$bindir/initdb" --version)"
