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
#   BENCH_BASE_BIN=DIR bench/instructions.sh   # also the burrow-edge and burrow binaries in
#                                              # DIR (another build), for a before/after
#
# Prints one line per build and process: instructions per round trip. Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."

RTT=${BENCH_RTT:-3000}
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
source scripts/lib/processes.sh burrow-instructions

source bench/lib.sh
start_echo
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SCRATCH/agent.token"

# count BINDIR LABEL edge|agent: prints LABEL PROCESS instructions-per-round-trip.
count() {
  local bin=$1 label=$2 which=$3 http agent out edge_pid agent_pid pid
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
  local run=("$BIN/burrow-bench" run --url "ws://127.0.0.1:$http/" --host "bench.localhost:$http" --only-rtt --settle-ms 0)
  # Warm up (first connection, lanes, allocator), then count the round trips alone.
  "${run[@]}" --rtt-count 200 >/dev/null
  pid=$edge_pid; [ "$which" = agent ] && pid=$agent_pid
  callgrind_control -i on "$pid" >/dev/null 2>&1
  "${run[@]}" --rtt-count "$RTT" >/dev/null
  callgrind_control -i off "$pid" >/dev/null 2>&1
  kill "$edge_pid" "$agent_pid" 2>/dev/null || true
  wait "$edge_pid" "$agent_pid" 2>/dev/null || true
  # Each burrow-bench run adds 100 warm-up round trips of its own.
  awk -v n=$((RTT + 100)) -v l="$label" -v w="$which" \
    '/^(summary|totals):/ {s += $2} END {printf "%-6s %-5s %8.0f instructions per round trip\n", l, w, s / n}' "$out"*
}

for which in ${BENCH_PROCESSES:-edge agent}; do
  [ -n "${BENCH_BASE_BIN:-}" ] && count "$BENCH_BASE_BIN" base "$which"
  count "$BIN" this "$which"
done
