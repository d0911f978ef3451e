#!/usr/bin/env bash
# Starts a release quotad on a spare port with its own key prefix and database, runs
# `quotad bench` against it with the arguments given, then stops it and removes both.
#   deploy/bench.sh -c 1 --runs 3 --duration 5          # sequential latency
#   deploy/bench.sh -c 50 --runs 3 --duration 10 --seed # throughput, against raw Redis and the seed design
#   deploy/bench.sh -c 50 --runs 3 --refused             # refused (near-cache) beside allowed
#   deploy/bench.sh -c 50 --users 1000000 --preload      # growth: a million users, loaded straight into Redis
#   deploy/bench.sh --memory --users 1000000             # Redis bytes per active (user, month)
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/ensure-services.sh
cargo build --release --bin quotad --bin quotad-bench

port=18181
db="quotad_bench_$$"
pg="postgres://postgres@127.0.0.1:5432"
export QUOTAD_DATABASE_URL="$pg/$db" QUOTAD_REDIS_URL="redis://127.0.0.1:6379" QUOTAD_KEY_PREFIX="bench$$"
QUOTAD_LISTEN="127.0.0.1:$port" QUOTAD_LOG=warn target/release/quotad serve &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  redis-cli -h 127.0.0.1 --scan --pattern "bench$$:*" | xargs -r redis-cli -h 127.0.0.1 unlink >/dev/null
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
target/release/quotad bench --url "http://127.0.0.1:$port" "$@"
