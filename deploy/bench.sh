#!/usr/bin/env bash
# Starts a release quotad on a spare port with its own key prefix and database, and a Redis of its
# own (so that the Redis CPU and commands per decision the bench reports are the bench's alone),
# runs `quotad bench` against them with the arguments given, then stops and removes them.
#   deploy/bench.sh -c 1 --runs 3 --duration 5          # sequential latency
#   deploy/bench.sh -c 50 --runs 3 --duration 10 --seed # throughput, against raw Redis and the seed design
#   deploy/bench.sh -c 50 --runs 3 --refused             # refused (near-cache) beside allowed
#   deploy/bench.sh -c 50 --runs 3 --accounts 100        # members of accounts (two levels) beside users without
#   deploy/bench.sh -c 50 --users 1000000 --preload      # growth: a million users, loaded straight into Redis
#   deploy/bench.sh --memory --users 1000000             # Redis bytes per active (user, month)
#   deploy/bench.sh -c 50 --users 1000000 --first-use --seed  # first requests, beside the seed design
#   deploy/bench.sh -c 50 --recovery --runs 3            # back to the hot rate after a FLUSHALL
#   deploy/bench.sh -c 50 --runs 3 --no-redis --gate --grpc 127.0.0.1:18182  # consume, the gate and gRPC side by side
# QUOTAD_BIN=path runs that daemon instead of this tree's (an older build, to compare), with this
# tree's load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/ensure-services.sh
cargo build --release --bin quotad --bin quotad-bench
bin="${CARGO_TARGET_DIR:-target}/release"

port=18181
grpc_port=18182
redis_port=18379
db="quotad_bench_$$"
pg="postgres://postgres@127.0.0.1:5432"
redis_dir=$(mktemp -d)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$redis_dir" \
  --maxmemory-policy noeviction --daemonize no --logfile "$redis_dir/redis.log" &
redis_pid=$!
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
export QUOTAD_DATABASE_URL="$pg/$db" QUOTAD_REDIS_URL="redis://127.0.0.1:$redis_port" QUOTAD_KEY_PREFIX="bench$$"
QUOTAD_LISTEN="127.0.0.1:$port" QUOTAD_GRPC_LISTEN="127.0.0.1:$grpc_port" QUOTAD_LOG=warn "${QUOTAD_BIN:-$bin/quotad}" serve &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  kill "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  rm -rf "$redis_dir"
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
"$bin/quotad" bench --url "http://127.0.0.1:$port" "$@"
