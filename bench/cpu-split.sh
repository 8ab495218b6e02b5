#!/usr/bin/env bash
# Where a round trip's CPU goes, Burrow (plain agent link) against bore, and the phases of a new
# connection through each. One edge and agent pair and one bore pair stay up for the whole run;
# the targets alternate, BENCH_ROUNDS times (4), so a slow spell of the machine hits both.
#
#   bench/cpu-split.sh                       # 20,000 round trips per measurement
#   BENCH_RTT=5000 BENCH_ROUNDS=2 bench/cpu-split.sh
#   BENCH_TOOLS=DIR keeps the bore install between runs (as bench/tunnel.sh)
#
# Per round and target it prints the user and system CPU time of the two tunnel processes per
# round trip (from /proc/PID/stat, so at the kernel's tick resolution: use many round trips),
# their thread context switches per round trip, and the round trip p50 (burrow-bench), then the
# connection phases (bench/connect_phases.py: TCP connect, upgrade → 101, first echo).
set -euo pipefail
cd "$(dirname "$0")/.."

RTT=${BENCH_RTT:-20000}
ROUNDS=${BENCH_ROUNDS:-4}
CONNECTS=${BENCH_CONNECTS:-400}
for v in RTT ROUNDS CONNECTS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_$v must be a whole number, 1 or more (got '${!v}')" >&2; exit 64; }
done
source scripts/lib/processes.sh burrow-cpu-split
TOOLS=${BENCH_TOOLS:-$SCRATCH/tools}

source bench/lib.sh
find_bore
start_echo
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SCRATCH/agent.token"

HTTP=$(free_port); AGENT=$(free_port)
RUST_LOG=warn "$BIN/burrow-edge" --name split --domain localhost \
  --standalone-token-file "$SCRATCH/agent.token" --http "127.0.0.1:$HTTP" \
  --agent-listen "127.0.0.1:$AGENT" --agent-plaintext --admin-addr off >"$SCRATCH/edge.log" 2>&1 &
EDGE_PID=$!; pids+=("$EDGE_PID")
wait_port "$AGENT" || { cat "$SCRATCH/edge.log" >&2; exit 1; }
RUST_LOG=warn "$BIN/burrow" http "$ECHO_PORT" --subdomain bench --edge "127.0.0.1:$AGENT" \
  --edge-plaintext --token-file "$SCRATCH/agent.token" --no-inspect >"$SCRATCH/agent.log" 2>&1 </dev/null &
AGENT_PID=$!; pids+=("$AGENT_PID")
wait_tunnel "$HTTP" || { cat "$SCRATCH/agent.log" >&2; exit 1; }

if (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null; then
  echo "port 7835 (bore's control port) is taken; stop what holds it" >&2; exit 1
fi
"$BORE" server --bind-addr 127.0.0.1 --min-port 30000 --max-port 39999 >"$SCRATCH/bore-server.log" 2>&1 &
BS_PID=$!; pids+=("$BS_PID")
wait_port 7835
"$BORE" local "$ECHO_PORT" --local-host 127.0.0.1 --to 127.0.0.1 >"$SCRATCH/bore-local.log" 2>&1 &
BL_PID=$!; pids+=("$BL_PID")
for _ in $(seq 1 100); do grep -q 'listening at' "$SCRATCH/bore-local.log" && break; sleep 0.1; done
BORE_PORT=$(grep -o 'listening at [^ ]*' "$SCRATCH/bore-local.log" | sed 's/\x1b\[[0-9;]*m//g; s/.*://' | tr -dc 0-9)
[ -n "$BORE_PORT" ] || { cat "$SCRATCH/bore-local.log" >&2; exit 1; }

# ticks PID...: user and system clock ticks of each process, in order.
ticks() { for p in "$@"; do awk '{printf "%s %s ", $14, $15}' "/proc/$p/stat"; done; }
# switches PID...: context switches of every thread of the processes together.
switches() {
  cat $(for p in "$@"; do echo /proc/"$p"/task/*/status; done) 2>/dev/null |
    awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s}'
}

# measure LABEL URL HOST PID PID
measure() {
  local label=$1 url=$2 host=$3; shift 3
  local run=("$BIN/burrow-bench" run --url "$url" --host "$host" --only-rtt --settle-ms 0)
  "${run[@]}" --rtt-count 500 >/dev/null
  local c0 t0 out c1 t1
  c0=$(switches "$@"); t0=$(ticks "$@")
  out=$("${run[@]}" --rtt-count "$RTT")
  c1=$(switches "$@"); t1=$(ticks "$@")
  python3 - "$label" "$((RTT + 100))" "$(getconf CLK_TCK)" "$t0" "$t1" "$c0" "$c1" "$out" <<'PY'
import json, sys
label, n, hz, t0, t1, c0, c1, out = sys.argv[1:]
n, hz = int(n), int(hz)
d = [(int(b) - int(a)) * 1e6 / hz / n for a, b in zip(t0.split(), t1.split())]
user, system = d[0] + d[2], d[1] + d[3]
p50 = json.loads(out.strip().splitlines()[-1])["rtt_p50_us"]
print(f"{label:8} user {user:5.1f} + system {system:5.1f} = {user + system:5.1f} µs CPU per round trip, "
      f"{(int(c1) - int(c0)) / n:4.2f} switches, p50 {p50:.0f} µs")
PY
}

for round in $(seq 1 "$ROUNDS"); do
  echo "==> round $round of $ROUNDS" >&2
  measure burrow "ws://127.0.0.1:$HTTP/" "bench.localhost:$HTTP" "$EDGE_PID" "$AGENT_PID"
  measure bore "ws://127.0.0.1:$BORE_PORT/" "127.0.0.1:$BORE_PORT" "$BS_PID" "$BL_PID"
  python3 bench/connect_phases.py "$HTTP" "bench.localhost:$HTTP" "$CONNECTS" burrow
  python3 bench/connect_phases.py "$BORE_PORT" "127.0.0.1:$BORE_PORT" "$CONNECTS" bore
  python3 bench/connect_phases.py "$ECHO_PORT" "127.0.0.1:$ECHO_PORT" "$CONNECTS" direct
done
