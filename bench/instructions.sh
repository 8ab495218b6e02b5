#!/usr/bin/env bash
# Instructions per WebSocket round trip in the edge and in the agent, counted by valgrind's
# callgrind: unlike times, the count repeats to within a few per mille from run to run and
# does not depend on what else the machine does, so a change that saves 3 % shows as 3 %.
# Each process is measured in a run of its own (the other one runs at full speed), with
# counting switched on only around the round trips (`burrow-bench run --only-rtt`).
#
#   bench/instructions.sh                      # this build, 3,000 round trips
#   BENCH_RTT=5000 bench/instructions.sh
#   BENCH_PROCESSES=edge bench/instructions.sh # one process only (edge or agent)
#   BENCH_PROCESSES="bore-server bore-local" bench/instructions.sh
#                                              # bore's two processes, the same way
#                                              # (bore-cli: BENCH_TOOLS as in tunnel.sh)
#   BENCH_BASE_BIN=DIR bench/instructions.sh   # also the burrow-edge and burrow binaries in
#                                              # DIR (another build), for a before/after
#   BENCH_OP=connect bench/instructions.sh     # per new connection instead (TCP connect,
#                                              # upgrade, one 64-byte echo, close), over
#                                              # BENCH_CONNECTS (500) of them
#   BENCH_KEEP=DIR bench/instructions.sh       # also keep callgrind's files in DIR, for
#                                              # callgrind_annotate (callgrind.LABEL.PROCESS)
#
# Callgrind counts each byte a `rep movsb`/`rep stosb` moves as one instruction, so libc's
# memcpy and memset of large blocks (moving a task's future into Tokio, calloc) weigh far more
# here than on the CPU; `callgrind_annotate` on the output shows them apart.
#
# Prints one line per build and process: instructions per round trip (or connection). Needs
# valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."

RTT=${BENCH_RTT:-3000}
CONNECTS=${BENCH_CONNECTS:-500}
OP=${BENCH_OP:-rtt}
case "$OP" in
  rtt) UNIT="round trip" ;;
  connect) UNIT=connection ;;
  *) echo "BENCH_OP must be rtt or connect (got '$OP')" >&2; exit 64 ;;
esac
PROCESSES=${BENCH_PROCESSES:-edge agent}
for which in $PROCESSES; do
  case "$which" in
    edge|agent|bore-server|bore-local) ;;
    *) echo "BENCH_PROCESSES takes edge, agent, bore-server and bore-local (got '$which')" >&2; exit 64 ;;
  esac
done
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
source scripts/lib/processes.sh burrow-instructions

TOOLS=${BENCH_TOOLS:-$SCRATCH/tools}
source bench/lib.sh
start_echo
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SCRATCH/agent.token"

# measure PID PORT HOST LABEL WHICH OUT: with PID running under callgrind (counting off), warms
# the tunnel at 127.0.0.1:PORT (Host HOST) up, counts $OP over it, prints one line.
measure() {
  local pid=$1 port=$2 host=$3 label=$4 which=$5 out=$6 n
  local run=("$BIN/burrow-bench" run --url "ws://127.0.0.1:$port/" --host "$host" --only-rtt --settle-ms 0)
  local connect=(python3 bench/connect_phases.py "$port" "$host")
  # Warm up (first connection, lanes, allocator), then count the operations alone.
  "${run[@]}" --rtt-count 200 >/dev/null
  [ "$OP" = connect ] && "${connect[@]}" 50 >/dev/null
  callgrind_control -i on "$pid" >/dev/null 2>&1
  if [ "$OP" = connect ]; then
    "${connect[@]}" "$CONNECTS" >/dev/null
    n=$CONNECTS
  else
    "${run[@]}" --rtt-count "$RTT" >/dev/null
    # Each burrow-bench run adds 100 warm-up round trips of its own.
    n=$((RTT + 100))
  fi
  callgrind_control -i off "$pid" >/dev/null 2>&1
  # The numbers come when the process ends (the caller stops it first).
  stop_counted "$pid"
  if [ -n "${BENCH_KEEP:-}" ]; then mkdir -p "$BENCH_KEEP" && cp "$out"* "$BENCH_KEEP/"; fi
  awk -v n="$n" -v l="$label" -v w="$which" -v u="$UNIT" \
    '/^(summary|totals):/ {s += $2} END {printf "%-6s %-11s %8.0f instructions per %s\n", l, w, s / n, u}' "$out"*
}

# The processes of the target being counted; measure stops them so callgrind writes its file.
running=()
stop_counted() {
  kill "${running[@]}" 2>/dev/null || true
  wait "${running[@]}" 2>/dev/null || true
}

# count BINDIR LABEL edge|agent: prints LABEL PROCESS instructions per operation.
count() {
  local bin=$1 label=$2 which=$3 http agent out edge_pid agent_pid
  http=$(free_port); agent=$(free_port); out="$SCRATCH/callgrind.$label.$which"
  local edge_cmd=("$bin/burrow-edge" --name "count-$label" --domain localhost
    --standalone-token-file "$SCRATCH/agent.token" --http "127.0.0.1:$http"
    --agent-listen "127.0.0.1:$agent" --agent-plaintext --admin-addr off)
  local agent_cmd=("$bin/burrow" http "$ECHO_PORT" --subdomain bench --edge "127.0.0.1:$agent"
    --edge-plaintext --token-file "$SCRATCH/agent.token" --no-inspect)
  local grind=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out")
  if [ "$which" = edge ]; then edge_cmd=("${grind[@]}" "${edge_cmd[@]}"); else agent_cmd=("${grind[@]}" "${agent_cmd[@]}"); fi
  RUST_LOG=warn "${edge_cmd[@]}" >"$SCRATCH/edge.log" 2>&1 &
  edge_pid=$!; pids+=("$edge_pid")
  wait_port "$agent" || { cat "$SCRATCH/edge.log" >&2; exit 1; }
  RUST_LOG=warn "${agent_cmd[@]}" >"$SCRATCH/agent.log" 2>&1 </dev/null &
  agent_pid=$!; pids+=("$agent_pid")
  wait_tunnel "$http" || { cat "$SCRATCH/agent.log" >&2; exit 1; }
  running=("$edge_pid" "$agent_pid")
  if [ "$which" = edge ]; then
    measure "$edge_pid" "$http" "bench.localhost:$http" "$label" "$which" "$out"
  else
    measure "$agent_pid" "$http" "bench.localhost:$http" "$label" "$which" "$out"
  fi
}

# count_bore server|local: the same for bore's server or its client (bore-cli, see find_bore).
count_bore() {
  local which=$1 out="$SCRATCH/callgrind.bore.$1" server_pid local_pid port
  if (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null; then
    echo "port 7835 (bore's control port) is taken; stop what holds it" >&2; exit 1
  fi
  local server_cmd=("$BORE" server --bind-addr 127.0.0.1 --min-port 30000 --max-port 39999)
  local local_cmd=("$BORE" local "$ECHO_PORT" --local-host 127.0.0.1 --to 127.0.0.1)
  local grind=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out")
  if [ "$which" = server ]; then server_cmd=("${grind[@]}" "${server_cmd[@]}"); else local_cmd=("${grind[@]}" "${local_cmd[@]}"); fi
  "${server_cmd[@]}" >"$SCRATCH/bore-server.log" 2>&1 &
  server_pid=$!; pids+=("$server_pid")
  wait_port 7835 || { cat "$SCRATCH/bore-server.log" >&2; exit 1; }
  "${local_cmd[@]}" >"$SCRATCH/bore-local.log" 2>&1 </dev/null &
  local_pid=$!; pids+=("$local_pid")
  for _ in $(seq 1 300); do grep -q 'listening at' "$SCRATCH/bore-local.log" && break; sleep 0.1; done
  port=$(grep -o 'listening at [^ ]*' "$SCRATCH/bore-local.log" | sed 's/\x1b\[[0-9;]*m//g; s/.*://' | tr -dc 0-9)
  [ -n "$port" ] || { cat "$SCRATCH/bore-local.log" >&2; exit 1; }
  running=("$server_pid" "$local_pid")
  if [ "$which" = server ]; then
    measure "$server_pid" "$port" "127.0.0.1:$port" bore "$which" "$out"
  else
    measure "$local_pid" "$port" "127.0.0.1:$port" bore "$which" "$out"
  fi
}

for which in $PROCESSES; do
  case "$which" in
    edge|agent)
      [ -n "${BENCH_BASE_BIN:-}" ] && count "$BENCH_BASE_BIN" base "$which"
      count "$BIN" this "$which" ;;
    *)
      [ -n "${BORE:-}" ] || find_bore
      count_bore "${which#bore-}" ;;
  esac
done
