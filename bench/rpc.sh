#!/usr/bin/env bash
# Control-plane RPC benchmark: authenticated ListReservations over one connection with 32
# concurrent callers for 10 s, against an in-process control plane on a scratch database.
# Prints req/s, p50/p99 latency and the number of argon2 verifications (target: one per token).
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres bench/rpc.sh [--seconds 10] [--concurrency 32]
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
cargo build --release -q -p burrow-control --example rpc_bench
exec target/release/examples/rpc_bench "$@"
