# Sourced by scripts that start background processes (bench/tunnel.sh, tests/autobahn/run.sh):
#   source scripts/lib/processes.sh NAME
# makes a scratch directory $SCRATCH (/tmp/NAME.XXXXXX), and on exit stops every process id
# added to the array `pids` and removes $SCRATCH. Also: free_port prints a free loopback TCP
# port; wait_port PORT waits up to 15 s for something to listen there.
SCRATCH=$(mktemp -d "/tmp/$1.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 150); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
