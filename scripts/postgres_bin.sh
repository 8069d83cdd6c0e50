# Sourced by install_postgres.sh and mlflow_server.sh: where the PostgreSQL server programs are.
#
# Debian's `postgresql` package puts initdb, pg_ctl and postgres in /usr/lib/postgresql/<version>/bin,
# not on PATH; other systems (Homebrew, the postgres image) put them on PATH.

# Prints the folder holding initdb and pg_ctl (PATH first, then the newest Debian version); fails if none.
postgres_bin_dir() {
    local initdb dir
    if initdb=$(command -v initdb 2>/dev/null) && [[ -x "$(dirname "$initdb")/pg_ctl" ]]; then
        dirname "$(readlink -f "$initdb")"
        return 0
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}
