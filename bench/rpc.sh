#!/usr/bin/env bash
# Control-plane RPC benchmark: authenticated ListReservations over one connection with 32
# concurrent callers for 10 s, against an in-process control plane on a scratch database
# (created and dropped on the server DATABASE_URL points at). Prints req/s, p50/p99 latency
# and the number of argon2 verifications (target: one per token).
#
#   bench/rpc.sh                              # the benchmark
#   bench/rpc.sh --rpc health --seconds 5     # gRPC stack alone, for comparison
#   bench/rpc.sh --rpc sql --seconds 5        # the same query straight on the pool
#   bench/rpc.sh --concurrency 64 --db-connections 8
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
cargo build --release -q -p burrow-control --example rpc_bench
exec target/release/examples/rpc_bench "$@"
