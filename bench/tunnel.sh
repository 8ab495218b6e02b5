#!/usr/bin/env bash
# WebSocket through a Burrow tunnel, measured against a direct connection and against bore
# (crate bore-cli, installed into a scratch directory) in the same run. Prints one JSON line
# per target and a table of ratios to direct (see BENCHMARKS.md).
#
#   bench/tunnel.sh                 # everything, 10,000 idle connections for the memory figure
#   BENCH_IDLE=2000 bench/tunnel.sh # smaller memory run
#   BENCH_REPEAT=3 runs that many rounds, each measuring every target once with processes of
#   its own, in the opposite order every other round (a slow spell of the machine is spread
#   over the targets); the table shows the median of each figure. Each measurement pauses
#   BENCH_SETTLE_MS=1000 before its round trips; the round trip right after bulk is a figure
#   of its own; the idle-memory figure is taken in the last round only;
#   BENCH_IDLE_BURST=262144 makes each idle connection echo one message that big first (what a
#   connection keeps after a burst); BENCH_RTT=5000 BENCH_MIB=256 BENCH_CONNECTS=200 are the
#   other knobs;
#   BENCH_TARGETS="burrow-tls burrow-plain bore" picks targets (direct always runs);
#   burrow-pool (not run by default) is burrow-plain with --worker-threads 0 on both ends;
#   BENCH_TOOLS=DIR keeps the bore install between runs;
#   BENCH_BASE_BIN=DIR also measures the burrow-edge and burrow binaries in DIR (another build,
#   e.g. the last release) as targets base-tls and base-plain, for a before/after in one run.
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE=${BENCH_IDLE:-10000}
RTT=${BENCH_RTT:-5000}
MIB=${BENCH_MIB:-256}
CONNECTS=${BENCH_CONNECTS:-200}
REPEAT=${BENCH_REPEAT:-3}
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_REPEAT must be a whole number of rounds, 1 or more (got '$REPEAT')" >&2; exit 64; }
TARGETS=${BENCH_TARGETS:-burrow-tls burrow-plain bore}
wants() { [[ " $TARGETS " == *" $1 "* ]]; }
source scripts/lib/processes.sh burrow-bench
TOOLS=${BENCH_TOOLS:-$SCRATCH/tools}

source bench/lib.sh
find_bore

# One repetition of one target (the idle-memory figure in the last round only); a target that
# fails is reported and left out, the others still run.
bench() {
  local out idle=0
  [ "$ROUND" = "$REPEAT" ] && idle=${BENCH_TARGET_IDLE:-$IDLE}
  if out=$("$BIN/burrow-bench" run --rtt-count "$RTT" --mib-messages "$MIB" --connects "$CONNECTS" --idle "$idle" --idle-burst-bytes "${BENCH_IDLE_BURST:-0}" --settle-ms "${BENCH_SETTLE_MS:-1000}" "$@"); then
    echo "$out" >&2
    results+=("$out")
  else
    echo "warning: target $* failed; left out of the table" >&2
  fi
}

# The local server every target ends at.
start_echo

results=()

# Burrow: a standalone edge (no control plane: the data path is what is measured, and the
# control plane's per-tunnel plan limits would refuse 10,000 WebSockets) and one agent, once
# with a TLS agent connection and once with plain TCP.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SCRATCH/agent.token"
burrow_target() { # LABEL TLS|PLAIN [BINDIR [FLAG...]] (flags given to both edge and agent)
  local label=$1 mode=$2 bin=${3:-$BIN} http agent edge_flags agent_flags
  local both=("${@:4}")
  http=$(free_port); agent=$(free_port)
  if [ "$mode" = TLS ]; then
    edge_flags=(--self-signed --self-signed-out "$SCRATCH/edge-ca-$label.pem")
    agent_flags=(--edge-ca "$SCRATCH/edge-ca-$label.pem")
  else
    edge_flags=(--agent-plaintext)
    agent_flags=(--edge-plaintext)
  fi
  RUST_LOG=warn "$bin/burrow-edge" --name "bench-$label" --domain localhost \
    --standalone-token-file "$SCRATCH/agent.token" \
    --http "127.0.0.1:$http" --agent-listen "127.0.0.1:$agent" --admin-addr off "${edge_flags[@]}" \
    --max-visitor-connections $((IDLE + 1000)) "${both[@]}" >"$SCRATCH/edge-$label.log" 2>&1 &
  pids+=($!); local edge_pid=$!
  wait_port "$agent" || { cat "$SCRATCH/edge-$label.log" >&2; return 1; }
  RUST_LOG=warn "$bin/burrow" http "$ECHO_PORT" --subdomain bench --edge "127.0.0.1:$agent" \
    "${agent_flags[@]}" --token-file "$SCRATCH/agent.token" --no-inspect "${both[@]}" \
    >"$SCRATCH/agent-$label.log" 2>&1 </dev/null &
  pids+=($!); local agent_pid=$!
  wait_tunnel "$http" || { cat "$SCRATCH/agent-$label.log" >&2; return 1; }
  echo "==> $label" >&2
  bench --url "ws://127.0.0.1:$http/" --host "bench.localhost:$http" --label "$label" --pids "$edge_pid,$agent_pid"
  # Stop this pair so it does not share the CPUs with the next target.
  kill "$edge_pid" "$agent_pid" 2>/dev/null || true
  wait "$edge_pid" "$agent_pid" 2>/dev/null || true
}

# bore: server + local client, same echo server.
bore_target() {
  if (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null; then
    echo "warning: port 7835 (bore's control port) is taken; skipping bore" >&2
    return 0
  fi
  "$BORE" server --bind-addr 127.0.0.1 --min-port 30000 --max-port 39999 >"$SCRATCH/bore-server.log" 2>&1 &
  pids+=($!); local server_pid=$!
  wait_port 7835
  "$BORE" local "$ECHO_PORT" --local-host 127.0.0.1 --to 127.0.0.1 >"$SCRATCH/bore-local.log" 2>&1 &
  pids+=($!); local local_pid=$!
  for _ in $(seq 1 100); do grep -q 'listening at' "$SCRATCH/bore-local.log" && break; sleep 0.1; done
  local port
  port=$(grep -o 'listening at [^ ]*' "$SCRATCH/bore-local.log" | sed 's/\x1b\[[0-9;]*m//g; s/.*://' | tr -dc 0-9)
  echo "==> bore" >&2
  # bore holds two sockets per visitor in each of its processes, so under this shell's
  # open-file limit it can hold only about half as many idle connections.
  local bore_idle=$(( IDLE < ($(ulimit -n) - 200) / 2 ? IDLE : ($(ulimit -n) - 200) / 2 ))
  if [ "$bore_idle" -lt "$IDLE" ] && [ "$ROUND" = "$REPEAT" ]; then
    echo "note: bore measured with $bore_idle idle connections (open-file limit $(ulimit -n))" >&2
  fi
  BENCH_TARGET_IDLE=$bore_idle bench --url "ws://127.0.0.1:$port/" --label bore --pids "$server_pid,$local_pid"
  kill "$server_pid" "$local_pid" 2>/dev/null || true
  wait "$server_pid" "$local_pid" 2>/dev/null || true
}

# One repetition of target $1, each with processes of its own.
run_target() {
  case $1 in
    direct) echo "==> direct" >&2
      bench --url "ws://127.0.0.1:$ECHO_PORT/" --label direct --pids "$ECHO_PID" ;;
    burrow-tls) burrow_target burrow-tls TLS ;;
    burrow-plain) burrow_target burrow-plain PLAIN ;;
    # Plain, with one shared pool of Tokio workers per process instead of threads of their own.
    burrow-pool) burrow_target burrow-pool PLAIN "$BIN" --worker-threads 0 ;;
    base-tls) burrow_target base-tls TLS "$BENCH_BASE_BIN" ;;
    base-plain) burrow_target base-plain PLAIN "$BENCH_BASE_BIN" ;;
    bore) bore_target ;;
  esac
}

# A target whose processes do not come up is reported and left out; the others still run.
try_target() { run_target "$1" || echo "warning: target $1 did not come up; left out of this round" >&2; }

order=(direct)
for t in burrow-tls burrow-plain burrow-pool; do wants "$t" && order+=("$t"); done
[ -n "${BENCH_BASE_BIN:-}" ] && order+=(base-tls base-plain)
wants bore && order+=(bore)
# Rounds: every target once per round, in the opposite order every other round, so a slow
# spell of the machine (this kind of machine's speed drifts by tens of per cent over minutes)
# is spread over the targets instead of landing on whichever one runs then.
for ROUND in $(seq 1 "$REPEAT"); do
  echo "==> round $ROUND of $REPEAT" >&2
  if [ $((ROUND % 2)) = 1 ]; then
    for t in "${order[@]}"; do try_target "$t"; done
  else
    for ((i = ${#order[@]} - 1; i >= 0; i--)); do try_target "${order[i]}"; done
  fi
done

printf '%s\n' "${results[@]}"
printf '%s\n' "${results[@]}" | python3 bench/ratios.py
