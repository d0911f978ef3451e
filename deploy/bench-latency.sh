#!/usr/bin/env bash
# Sequential consume latency over loopback: starts a release quotad on a spare port with its own
# key prefix and database, runs examples/consume_latency.rs against it (which also measures the
# raw-Redis floor in the same run), then stops it and drops the database.
#   deploy/bench-latency.sh [CALLS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/ensure-services.sh
cargo build --release --bin quotad --example consume_latency

port=18181
db="quotad_bench_$$"
export QUOTAD_LISTEN="127.0.0.1:$port" QUOTAD_KEY_PREFIX="bench$$" QUOTAD_LOG=warn
export QUOTAD_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db" QUOTAD_REDIS_URL="redis://127.0.0.1:6379"
target/release/quotad serve &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  psql -q "postgres://postgres@127.0.0.1:5432/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  redis-cli -h 127.0.0.1 --scan --pattern "bench$$:*" | xargs -r redis-cli -h 127.0.0.1 del >/dev/null
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
target/release/examples/consume_latency "http://127.0.0.1:$port" "$QUOTAD_REDIS_URL" "${1:-3000}" "${2:-3}"
