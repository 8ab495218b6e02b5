#!/usr/bin/env bash
# Runs the whole Burrow platform on this machine: PostgreSQL (found or started), the control
# plane and one edge serving *.localhost, with a platform admin, a `dev` team and an agent
# token created on first run. Prints the `burrow http` line to paste. Ctrl-C stops it.
#
# Settings (environment):
#   DATABASE_URL        PostgreSQL to use (default: local 127.0.0.1:5432, database `burrow`,
#                       else a private cluster under .dev/postgres)
#   BURROW_STATE_DIR    where tokens, logs and the private cluster live (default .dev)
#   BURROW_API_ADDR     control-plane gRPC listener (default 127.0.0.1:7070)
#   BURROW_HTTP_ADDR    edge visitor listener (default 127.0.0.1:8080)
#   BURROW_AGENT_ADDR   edge agent listener (default 127.0.0.1:4443)
#   BURROW_EDGE_ADMIN_ADDR     edge /metrics, /healthz, /readyz (default 127.0.0.1:9090)
#   BURROW_CONTROL_ADMIN_ADDR  control-plane /metrics, /healthz, /readyz (default 127.0.0.1:9091)
#   BURROW_PROFILE      cargo profile: release (default) or dev (faster to build)
# Options:
#   --stop-postgres     stop the private PostgreSQL cluster started by an earlier run, and exit
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/postgres.sh

STATE=${BURROW_STATE_DIR:-$PWD/.dev}
API_ADDR=${BURROW_API_ADDR:-127.0.0.1:7070}
HTTP_ADDR=${BURROW_HTTP_ADDR:-127.0.0.1:8080}
AGENT_ADDR=${BURROW_AGENT_ADDR:-127.0.0.1:4443}
EDGE_ADMIN_ADDR=${BURROW_EDGE_ADMIN_ADDR:-127.0.0.1:9090}
CONTROL_ADMIN_ADDR=${BURROW_CONTROL_ADMIN_ADDR:-127.0.0.1:9091}
PROFILE=${BURROW_PROFILE:-release}

if [ "${1:-}" = "--stop-postgres" ]; then
  if [ -f "$STATE/postgres/data/postmaster.pid" ]; then
    as_pg_user "$(pg_bin pg_ctl)" -D "$STATE/postgres/data" -m fast stop
  else
    echo "no private PostgreSQL cluster is running under $STATE/postgres"
  fi
  exit 0
fi

port_busy() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for addr in "$API_ADDR" "$HTTP_ADDR" "$AGENT_ADDR" "$EDGE_ADMIN_ADDR" "$CONTROL_ADMIN_ADDR"; do
  if port_busy "$addr"; then
    echo "error: $addr is already in use (is Burrow already running?). Stop that process or set BURROW_API_ADDR / BURROW_HTTP_ADDR / BURROW_AGENT_ADDR / BURROW_EDGE_ADMIN_ADDR / BURROW_CONTROL_ADMIN_ADDR." >&2
    exit 1
  fi
done

echo "==> building (cargo --profile $PROFILE)"
# Two builds: built in one, the control plane's sqlx turns on tracing's `log` feature in the
# edge and the agent too, which costs their data path about 8 % more instructions per
# WebSocket round trip (BENCHMARKS.md, "Build the data path on its own").
cargo build --profile "$PROFILE" -p burrow-control
cargo build --profile "$PROFILE" -p burrow-edge -p burrow-cli
# Where cargo put them: CARGO_TARGET_DIR when set (a shared target directory), else ./target.
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
case $PROFILE in dev) BIN=$TARGET/debug ;; *) BIN=$TARGET/$PROFILE ;; esac

mkdir -p "$STATE"
chmod 700 "$STATE"
umask 077

ensure_database burrow
echo "==> database ${DATABASE_URL%%\?*}"
"$BIN/burrow-control" migrate

# The tokens go straight to files; what the commands say about them (meant for a person who
# copies the token off the terminal) is shown only when they fail.
if [ ! -s "$STATE/admin.token" ]; then
  if ! "$BIN/burrow-control" bootstrap --email admin@localhost >"$STATE/admin.token.new" 2>"$STATE/bootstrap.err"; then
    rm -f "$STATE/admin.token.new"
    cat "$STATE/bootstrap.err" >&2
    echo "error: cannot create the platform admin (see above). When this database already has one" >&2
    echo "       but $STATE/admin.token is gone, point DATABASE_URL at a fresh database, or drop" >&2
    echo "       the \`burrow\` database and run again." >&2
    exit 1
  fi
  mv "$STATE/admin.token.new" "$STATE/admin.token"
  echo "==> platform admin admin@localhost created; its API token is in $STATE/admin.token"
fi
if [ ! -s "$STATE/edge.token" ]; then
  if ! "$BIN/burrow-control" edge-token create --name local-edge >"$STATE/edge.token.new" 2>"$STATE/bootstrap.err"; then
    rm -f "$STATE/edge.token.new"
    cat "$STATE/bootstrap.err" >&2
    echo "error: cannot create the edge token (see above)" >&2
    exit 1
  fi
  mv "$STATE/edge.token.new" "$STATE/edge.token"
  echo "==> edge token local-edge created; it is in $STATE/edge.token"
fi
rm -f "$STATE/bootstrap.err"

pids=()
cleanup() {
  trap - EXIT INT TERM
  echo
  echo "==> stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
# Ctrl-C (or a TERM) is how this script is meant to stop: clean up and exit 0, rather than fall
# through to the "a process exited" error below.
trap 'cleanup; exit 0' INT TERM

wait_for() { # what, check command...
  local what=$1; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "error: $what did not start; see its log in $STATE/" >&2
  exit 1
}

echo "==> control plane on $API_ADDR (log: $STATE/control.log)"
"$BIN/burrow-control" serve --listen "$API_ADDR" --admin-addr "$CONTROL_ADMIN_ADDR" >>"$STATE/control.log" 2>&1 &
pids+=($!)
export BURROW_API="http://$API_ADDR"
wait_for "the control plane" "$BIN/burrow" whoami --token-file "$STATE/admin.token"

if [ ! -s "$STATE/agent.token" ]; then
  "$BIN/burrow" team create dev --token-file "$STATE/admin.token" >/dev/null 2>&1 || true
  "$BIN/burrow" token create dev-agent --kind agent --team dev --output json \
    --token-file "$STATE/admin.token" 2>/dev/null \
    | sed -n 's/.*"secret": *"\([^"]*\)".*/\1/p' >"$STATE/agent.token.new"
  [ -s "$STATE/agent.token.new" ] || { echo "error: could not create the dev agent token" >&2; exit 1; }
  mv "$STATE/agent.token.new" "$STATE/agent.token"
fi

echo "==> edge: visitors on $HTTP_ADDR, agents on $AGENT_ADDR (log: $STATE/edge.log)"
"$BIN/burrow-edge" --name local-edge --domain localhost --control "http://$API_ADDR" \
  --edge-token-file "$STATE/edge.token" --http "$HTTP_ADDR" --agent-listen "$AGENT_ADDR" \
  --admin-addr "$EDGE_ADMIN_ADDR" \
  --self-signed --self-signed-out "$STATE/edge-ca.pem" >>"$STATE/edge.log" 2>&1 &
pids+=($!)
wait_for "the edge" port_busy "$AGENT_ADDR"

cat <<MSG

Burrow is running.
  control plane  http://$API_ADDR   (admin token: $STATE/admin.token)
  edge           http://*.localhost:${HTTP_ADDR##*:}   agents connect to $AGENT_ADDR
  metrics        edge http://$EDGE_ADMIN_ADDR/metrics   control plane http://$CONTROL_ADMIN_ADDR/metrics
                 (and /healthz, /readyz on both)

Open a tunnel to a server on port 3000 (in another terminal):

  $BIN/burrow http 3000 --subdomain hello --edge $AGENT_ADDR --edge-ca $STATE/edge-ca.pem --token-file $STATE/agent.token

then visit http://hello.localhost:${HTTP_ADDR##*:}/ (browsers and curl resolve *.localhost to this machine).
Admin commands: BURROW_API=http://$API_ADDR $BIN/burrow whoami --token-file $STATE/admin.token

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true
echo "error: a Burrow process exited; see $STATE/control.log and $STATE/edge.log" >&2
exit 1
