#!/usr/bin/env bash
# Runs every client/server pair in this directory directly, without Burrow: each client dials
# the server on 127.0.0.1 while sending `Host: x.localhost:PORT`, exactly as the Rust tests in
# cli/tests/clients.rs do through a tunnel. Use it to tell a broken script from a broken tunnel.
#
#   tests/clients/check-direct.sh        (after scripts/install-test-clients.sh)
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# start NAME CMD...: runs a server, waits (10 s at most) for its `LISTENING <port>` line,
# and sets PORT.
start() {
  local name=$1; shift
  mkfifo "$TMP/$name"
  "$@" >"$TMP/$name" &
  PIDS+=("$!")
  exec {fd}<"$TMP/$name"
  local line
  if ! read -r -t 10 -u "$fd" line || [[ $line != LISTENING\ * ]]; then
    echo "FAIL $name did not announce its port (got: ${line:-nothing})" >&2
    exit 1
  fi
  PORT=${line#LISTENING }
}

failures=0
check() {
  if ! "$@"; then failures=$((failures + 1)); fi
}

start ws-echo node ws-echo-server.js
check node ws-echo-client.js "ws://x.localhost:$PORT/" --prefix 'Echo: '
check $PY websockets_echo_client.py "ws://x.localhost:$PORT/" --prefix 'Echo: '

start websockets-echo $PY websockets_echo_server.py
check $PY websockets_echo_client.py "ws://x.localhost:$PORT/" --binary --expect-extension permessage-deflate
check node ws-echo-client.js "ws://x.localhost:$PORT/" --binary --expect-extension permessage-deflate

start socketio node socketio-server.js
check node socketio-client.js "http://x.localhost:$PORT/"
check node socketio-client.js "http://x.localhost:$PORT/" --transports websocket

start express-ws node express-ws-server.js
check node chromium-page.js "http://x.localhost:$PORT/"

start subprotocol node subprotocol-server.js
check node subprotocol-client.js "ws://x.localhost:$PORT/"

start broadcast node broadcast-server.js
check node broadcast-client.js "ws://x.localhost:$PORT/"

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed" >&2
  exit 1
fi
echo "all direct checks passed"
