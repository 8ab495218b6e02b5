# shellcheck shell=bash
# Finds a PostgreSQL server for Burrow, or starts a private one, and exports DATABASE_URL.
#
# Order: 1) $DATABASE_URL when its server answers (the database created if missing); 2) the local server on 127.0.0.1:5432 when it
# answers (database $1, created if missing); 3) a private cluster under $BURROW_STATE_DIR
# (default .dev/) made with the system's initdb and started with pg_ctl on
# $BURROW_PG_PORT (default 55432). The private cluster keeps running after the script ends;
# stop it with `scripts/run-platform.sh --stop-postgres`.

pg_bin() {
  local name=$1 dir
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/$name" ]; then echo "$dir/$name"; return 0; fi
  done
  return 1
}

pg_answers() { # URL
  local isready
  isready=$(pg_bin pg_isready) || return 1
  "$isready" -q -d "$1" -t 2 >/dev/null 2>&1
}

# Runs a command as an unprivileged user when we are root (PostgreSQL refuses to run as root).
as_pg_user() {
  if [ "$(id -u)" = 0 ]; then
    local user=postgres
    id "$user" >/dev/null 2>&1 || user=nobody
    runuser -u "$user" -- "$@"
  else
    "$@"
  fi
}

start_private_postgres() {
  local state=${BURROW_STATE_DIR:-$PWD/.dev}
  local port=${BURROW_PG_PORT:-55432}
  local data=$state/postgres/data sock=$state/postgres/run
  local initdb pg_ctl
  initdb=$(pg_bin initdb) || { echo "error: no PostgreSQL answers and initdb is not installed (apt-get install postgresql)" >&2; return 1; }
  pg_ctl=$(pg_bin pg_ctl) || { echo "error: pg_ctl is not installed (apt-get install postgresql)" >&2; return 1; }
  mkdir -p "$state/postgres" "$sock"
  if [ "$(id -u)" = 0 ]; then
    local user=postgres
    id "$user" >/dev/null 2>&1 || user=nobody
    chown -R "$user" "$state/postgres"
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    echo "==> creating a private PostgreSQL cluster in $data" >&2
    as_pg_user "$initdb" -D "$data" -U postgres -A trust -E UTF8 >"$state/postgres/initdb.log" 2>&1 \
      || { echo "error: initdb failed; see $state/postgres/initdb.log" >&2; return 1; }
  fi
  if ! pg_answers "postgres://postgres@127.0.0.1:$port/postgres"; then
    echo "==> starting the private PostgreSQL on 127.0.0.1:$port" >&2
    as_pg_user "$pg_ctl" -D "$data" -l "$state/postgres/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $sock" start >/dev/null \
      || { echo "error: PostgreSQL did not start; see $state/postgres/server.log" >&2; return 1; }
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/${1:-postgres}"
}

# create_missing_database URL: creates the database URL names when its server answers but
# has no such database yet (connecting to the server's `postgres` database to do it).
create_missing_database() {
  local url=$1 psql
  # Plain names only (letters, digits, _ and -); anything else is left to the user.
  [[ "$url" =~ ^([a-z]+://[^/]*)/([A-Za-z0-9_-]+)(\?.*)?$ ]] || return 0
  local server=${BASH_REMATCH[1]} name=${BASH_REMATCH[2]} query=${BASH_REMATCH[3]}
  psql=$(pg_bin psql) || return 0
  "$psql" -q -d "$url" -c 'select 1' >/dev/null 2>&1 && return 0
  if [ "$("$psql" -d "$server/postgres$query" -tAc "select 1 from pg_database where datname = '$name'" 2>/dev/null)" = 1 ]; then
    return 0 # it exists; whatever else is wrong, the program that connects will say
  fi
  echo "==> creating the database $name" >&2
  "$psql" -q -d "$server/postgres$query" -c "create database \"$name\"" >/dev/null \
    || { echo "error: the database $name does not exist and cannot be created on $server" >&2; return 1; }
}

# ensure_database DBNAME: exports DATABASE_URL for a server that answers.
ensure_database() {
  local db=${1:-burrow}
  if [ -n "${DATABASE_URL:-}" ]; then
    if pg_answers "$DATABASE_URL"; then
      create_missing_database "$DATABASE_URL"
      return
    fi
    echo "==> DATABASE_URL does not answer; falling back to a local server" >&2
  fi
  local base="postgres://postgres@127.0.0.1:5432"
  if ! pg_answers "$base/postgres"; then
    start_private_postgres postgres || return 1
    base=${DATABASE_URL%/*}
  fi
  if [ "$db" != postgres ]; then
    local psql
    psql=$(pg_bin psql) || { echo "error: psql is not installed" >&2; return 1; }
    if [ "$("$psql" -d "$base/postgres" -tAc "select 1 from pg_database where datname = '$db'")" != 1 ]; then
      "$psql" -q -d "$base/postgres" -c "create database \"$db\"" >/dev/null
    fi
  fi
  export DATABASE_URL="$base/$db"
}
