# Sourced by the bench scripts after scripts/lib/processes.sh (which gives SCRATCH, pids,
# free_port and wait_port). Builds the release binaries and defines:
#   BIN                          the release binaries' directory
#   start_echo                   starts the WebSocket echo server every target ends at; sets
#                                ECHO_PORT and ECHO_PID
#   wait_tunnel PORT             waits (up to 30 s) until the edge's HTTP listener on PORT
#                                routes bench.localhost to a live tunnel: any answer but 404
#                                (no such tunnel yet) and 503 (tunnel offline) comes from the
#                                agent, a 502 too (the echo server drops a plain GET)
#   find_bore                    sets BORE: bore on PATH, or in $TOOLS (bench/tunnel.sh's
#                                BENCH_TOOLS), installed there from crates.io when missing
echo "==> building (release)" >&2
# Without the control plane in the same build (see scripts/run-platform.sh: its sqlx would
# turn on tracing's `log` feature in the edge and the agent).
cargo build --release -q -p burrow-edge -p burrow-cli -p burrow-bench
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release

start_echo() {
  "$BIN/burrow-bench" echo-server --listen 127.0.0.1:0 >"$SCRATCH/echo.out" &
  ECHO_PID=$!; pids+=("$ECHO_PID")
  for _ in $(seq 1 50); do [ -s "$SCRATCH/echo.out" ] && break; sleep 0.1; done
  ECHO_PORT=$(sed 's/.*://' "$SCRATCH/echo.out")
}

wait_tunnel() {
  local code
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: bench.localhost:$1" "http://127.0.0.1:$1/" || true)
    [ "$code" != 404 ] && [ "$code" != 503 ] && [ "$code" != 000 ] && return 0
    sleep 0.1
  done
  echo "the tunnel behind port $1 never came up" >&2
  return 1
}

find_bore() {
  if command -v bore >/dev/null 2>&1; then BORE=$(command -v bore)
  elif [ -x "$TOOLS/bin/bore" ]; then BORE=$TOOLS/bin/bore
  else
    echo "==> installing bore-cli into $TOOLS" >&2
    cargo install -q --locked bore-cli --root "$TOOLS"
    BORE=$TOOLS/bin/bore
  fi
}
