#!/usr/bin/env bash
# Runs Burrow's whole test suite: Rust unit and integration tests against a real PostgreSQL
# (found or started by scripts/lib/postgres.sh), plus the tests with outside clients.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/postgres.sh

ensure_database test
echo "==> using PostgreSQL at ${DATABASE_URL%%\?*}"

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "==> installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

if [ -x scripts/install-test-clients.sh ]; then
  scripts/install-test-clients.sh
fi

# The outside clients were just installed: a test that cannot find one fails instead of skipping.
export BURROW_REQUIRE_TEST_CLIENTS=${BURROW_REQUIRE_TEST_CLIENTS:-1}

cargo nextest run --workspace --no-fail-fast "$@"

# Autobahn|Testsuite through a tunnel against the same suite run directly (skipped with a
# warning where no Python 2.7 exists); only for a whole-suite run, not a filtered one.
# Twice: against the Python `websockets` server, which closes with its own code on a bad frame,
# and against a tokio-tungstenite one, which drops the connection (the edge then sends the
# visitor the close frame an endpoint would have: 1002 or 1007).
if [ $# -eq 0 ]; then
  tests/autobahn/run.sh
  AUTOBAHN_ECHO=tungstenite tests/autobahn/run.sh
fi
