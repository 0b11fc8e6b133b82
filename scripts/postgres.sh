#!/usr/bin/env bash
# A throwaway PostgreSQL server for an MLflow tracking server (tests, CI, a first try of
# "Scaling out" in the README). Not for production: use your platform's managed PostgreSQL there.
#
#   scripts/postgres.sh start   [DATA_DIR] [PORT]   install if missing, init, start, create db + user;
#                                                    prints postgresql://USER:PASS@127.0.0.1:PORT/DB
#   scripts/postgres.sh uri     [DATA_DIR]          print that URI again (server must be set up)
#   scripts/postgres.sh status  [DATA_DIR]          exit 0 when it is running
#   scripts/postgres.sh stop    [DATA_DIR]          stop it (nothing to do if it is not running)
#   scripts/postgres.sh destroy [DATA_DIR]          stop it and delete DATA_DIR
#
# DATA_DIR defaults to $QSWEEP_PG_DATA or /tmp/qsweep-postgres, PORT to $QSWEEP_PG_PORT or 5433.
# The database, user and password come from QSWEEP_PG_DB (mlflow), QSWEEP_PG_USER (mlflow) and
# QSWEEP_PG_PASSWORD (random, generated on the first start and kept in DATA_DIR/qsweep.conf, so a
# second `start` prints the same URI). QSWEEP_PG_DRIVER=psycopg2 (or psycopg) names the driver in
# the URI, postgresql+psycopg2://...: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3 and
# 2.0 as psycopg2, so naming the one that is installed works with either. The server listens on
# 127.0.0.1 only, has no Unix socket, and asks every client for a password (scram-sha-256).
#
# Run it as root (it installs the Debian package `postgresql` when no initdb is found, and runs the
# server as the `postgres` OS user, since PostgreSQL refuses to run as root) or as an ordinary user
# on a machine where PostgreSQL is already installed (the server then runs as that user).
# Only the URI goes to stdout; errors go to stderr. Exit codes: 0 ok, 1 failed, 2 usage,
# 3 PostgreSQL is not installed and cannot be installed here.
set -euo pipefail

MODE=${1:-}
DATA=${2:-${QSWEEP_PG_DATA:-/tmp/qsweep-postgres}}
PORT_ARG=${3:-}
DB=${QSWEEP_PG_DB:-mlflow}
DB_USER=${QSWEEP_PG_USER:-mlflow}
CONF_NAME=qsweep.conf

die() { local code=$1; shift; echo "postgres.sh: $*" >&2; exit "$code"; }
usage() { sed -n "5,10p" "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

case "$MODE" in start|stop|status|uri|destroy) ;; *) usage ;; esac
[[ "$DATA" == /* ]] || DATA="$PWD/$DATA"
DATA=${DATA%/}
CONF="$DATA/$CONF_NAME"

# ---- who runs the server ----------------------------------------------------------------------
if [[ $EUID -eq 0 ]]; then
    PG_OS_USER=postgres
    as_pg() { runuser -u postgres -- "$@"; }
else
    PG_OS_USER=$(id -un)
    as_pg() { "$@"; }
fi

find_bindir() {
    if [[ -n "${PG_BINDIR:-}" && -x "$PG_BINDIR/initdb" ]]; then echo "$PG_BINDIR"; return; fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then echo "$dir"; return; fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"; return
    fi
    return 1
}

install_postgres() {
    [[ $EUID -eq 0 ]] || die 3 "PostgreSQL is not installed and only root can install it (apt-get install postgresql)"
    command -v apt-get >/dev/null 2>&1 || die 3 "PostgreSQL is not installed and there is no apt-get here"
    # Keep the package from starting its own `main` cluster during the install (Debian's
    # policy-rc.d mechanism); ours runs in DATA_DIR on its own port.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
    fi
    local log rc=0
    log=$(mktemp)
    {
        DEBIAN_FRONTEND=noninteractive apt-get -qq update &&
        DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends postgresql
    } >"$log" 2>&1 || rc=$?
    [[ -n $added_policy ]] && rm -f "$policy"
    if [[ $rc -ne 0 ]]; then
        tail -n 20 "$log" >&2; rm -f "$log"
        die 3 "apt-get install postgresql failed (exit $rc)"
    fi
    rm -f "$log"
}

random_secret() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }

# Percent-encode for the userinfo and path parts of a URI.
urlencode() {
    local s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case "$c" in [A-Za-z0-9._~-]) out+=$c ;; *) out+=$(printf '%%%02X' "'$c") ;; esac
    done
    printf '%s' "$out"
}

read_conf() {
    [[ -f "$CONF" ]] || die 1 "$DATA was not set up by this script (no $CONF_NAME); run: $0 start $DATA"
    # shellcheck disable=SC1090
    source "$CONF"
}

write_conf() {
    local tmp
    tmp=$(mktemp)
    printf 'PORT=%q\nDB=%q\nDB_USER=%q\nPASSWORD=%q\nADMIN_PASSWORD=%q\n' \
        "$PORT" "$DB" "$DB_USER" "$PASSWORD" "$ADMIN_PASSWORD" >"$tmp"
    chmod 600 "$tmp"
    chown "$PG_OS_USER" "$tmp"
    mv -f "$tmp" "$CONF"
}

print_uri() {
    echo "postgresql${QSWEEP_PG_DRIVER:+"+$QSWEEP_PG_DRIVER"}://$(urlencode "$DB_USER"):$(urlencode "$PASSWORD")@127.0.0.1:$PORT/$(urlencode "$DB")"
}

is_running() {
    [[ -n "${BIN:-}" && -f "$DATA/PG_VERSION" ]] || return 1
    clear_stale_pid
    as_pg "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

# A server killed with SIGKILL in a container whose PID 1 reaps no orphans stays a zombie: its PID
# still "exists", so pg_ctl would call it running and postgres would refuse to start beside it.
clear_stale_pid() {
    local pid state
    pid=$(head -n 1 "$DATA/postmaster.pid" 2>/dev/null || true)
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null || true)
    if [[ "$state" == Z ]]; then
        rm -f "$DATA/postmaster.pid"
    fi
}

# The port of the running server, from line 4 of postmaster.pid.
running_port() { sed -n 4p "$DATA/postmaster.pid" 2>/dev/null || true; }

stop_server() {
    if is_running; then
        as_pg "$BIN/pg_ctl" stop -D "$DATA" -m fast -w -t 60 >/dev/null || die 1 "could not stop the server in $DATA"
    fi
}

admin_psql() {
    PGPASSWORD=$ADMIN_PASSWORD PGCONNECT_TIMEOUT=10 "$BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"
}

port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

start_server() {
    local log="$DATA/postgres.log"
    if ! as_pg "$BIN/pg_ctl" start -D "$DATA" -l "$log" -w -t 60 -s \
        -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories='' -c max_connections=100" \
        >/dev/null 2>&1 9>&-; then
        tail -n 20 "$log" >&2 2>/dev/null || true
        die 1 "the server in $DATA did not start on port $PORT (log: $log)"
    fi
}

init_data_dir() {
    if [[ -e "$DATA" && ! -d "$DATA" ]]; then die 1 "$DATA exists and is not a folder"; fi
    if [[ -f "$DATA/PG_VERSION" ]]; then
        [[ -f "$CONF" ]] || die 1 "$DATA holds a PostgreSQL cluster this script did not create; pick another folder"
        return
    fi
    if [[ -d "$DATA" && -n "$(ls -A "$DATA")" ]]; then
        die 1 "$DATA is not empty and holds no PostgreSQL cluster; pick an empty or new folder"
    fi
    mkdir -p "$DATA"
    chown "$PG_OS_USER" "$DATA"
    chmod 700 "$DATA"
    as_pg test -w "$DATA" ||
        die 1 "the $PG_OS_USER user cannot write $DATA: is a parent folder private? (chmod o+x it, or use a new folder under /tmp)"
    # The superuser's password goes through a file only the server's user can read (initdb wants
    # an empty data folder, so not in there).
    local pwfile log
    pwfile=$(as_pg mktemp)
    log=$(mktemp)
    ADMIN_PASSWORD=$(random_secret)
    printf '%s\n' "$ADMIN_PASSWORD" | as_pg tee "$pwfile" >/dev/null
    if ! as_pg "$BIN/initdb" -D "$DATA" -U postgres --pwfile="$pwfile" --auth-local=scram-sha-256 \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >"$log" 2>&1; then
        rm -f "$pwfile"; tail -n 20 "$log" >&2; rm -f "$log"
        die 1 "initdb failed in $DATA"
    fi
    rm -f "$pwfile" "$log"
    PASSWORD=${QSWEEP_PG_PASSWORD:-$(random_secret)}
    PORT=${PORT_ARG:-${QSWEEP_PG_PORT:-5433}}
    write_conf
}

ensure_db_and_user() {
    admin_psql -v db="$DB" -v usr="$DB_USER" -v pw="$PASSWORD" >/dev/null <<'SQL' || die 1 "could not create the database and user"
SELECT format('CREATE ROLE %I LOGIN', :'usr') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'usr') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'usr', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'usr') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'usr') \gexec
SQL
}

# ---- main ---------------------------------------------------------------------------------------
BIN=$(find_bindir || true)

case "$MODE" in
status)
    is_running || exit 1
    exit 0
    ;;
uri)
    read_conf
    print_uri
    exit 0
    ;;
stop)
    stop_server
    exit 0
    ;;
destroy)
    stop_server
    rm -rf "$DATA" "$DATA.lock"
    exit 0
    ;;
esac

# start: one at a time per data dir.
if [[ -z "$BIN" ]]; then
    install_postgres
    BIN=$(find_bindir) || die 3 "installed postgresql but found no initdb under /usr/lib/postgresql"
fi
if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    die 1 "there is no \`postgres\` OS user to run the server (root may not); reinstall the postgresql package"
fi
mkdir -p "$(dirname "$DATA")"
exec 9>"$DATA.lock"
flock -w 120 9 || die 1 "another postgres.sh is still working on $DATA"

ADMIN_PASSWORD="" PASSWORD="" PORT=""
init_data_dir
read_conf
# Environment overrides of a later start win over what the first start stored.
DB=${QSWEEP_PG_DB:-$DB}
DB_USER=${QSWEEP_PG_USER:-$DB_USER}
PASSWORD=${QSWEEP_PG_PASSWORD:-$PASSWORD}
WANTED_PORT=${PORT_ARG:-${QSWEEP_PG_PORT:-$PORT}}

if is_running && [[ "$(running_port)" != "$WANTED_PORT" ]]; then
    stop_server
fi
PORT=$WANTED_PORT
if ! is_running; then
    port_in_use "$PORT" && die 1 "port $PORT is already in use on 127.0.0.1; pass another: $0 start $DATA PORT"
    start_server
fi
write_conf
ensure_db_and_user
print_uri
