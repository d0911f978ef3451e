#!/usr/bin/env bash
# quotad on a Redis Cluster beside quotad on a single Redis, in the same run:
#   deploy/bench-cluster.sh [--rounds N] [quotad bench arguments, e.g. -c 50 --duration 10]
#
# Starts a single redis-server and a six-node Redis Cluster (three masters, three replicas) of
# its own on loopback ports, and three release quotads (own key prefixes and databases): one on
# the single Redis, one on the cluster, one on the cluster with QUOTAD_REDIS_WAIT_REPLICAS=1.
# Runs `quotad bench` against the three in turn, --rounds times (default 3), so all see the same
# machine. The cluster run reads each node's INFO cpu before and after: its "by node" figures
# are each master's and replica's Redis CPU time per decision. Prints every round, then the
# median per setup. Everything it started is stopped and removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/ensure-services.sh
cargo build --release --bin quotad --bin quotad-bench
bin="${CARGO_TARGET_DIR:-target}/release"

rounds=3
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ ${#args[@]} -gt 0 ] || args=(-c 50 --duration 10)

pg="postgres://postgres@127.0.0.1:5432"
work=$(mktemp -d)
single=18479
cluster_base=18501
nodes=()
for i in 0 1 2 3 4 5; do nodes+=($((cluster_base + i))); done
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  redis-cli -p "$single" shutdown nosave >/dev/null 2>&1 || true
  for p in "${nodes[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  for db in quotad_bench_single_$$ quotad_bench_cluster_$$ quotad_bench_wait_$$; do
    psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

redis_opts=(--bind 127.0.0.1 --save "" --appendonly no --maxmemory-policy noeviction --daemonize yes)
mkdir -p "$work/$single"
redis-server --port "$single" "${redis_opts[@]}" --dir "$work/$single" --logfile "$work/$single/log"
for p in "${nodes[@]}"; do
  mkdir -p "$work/$p"
  redis-server --port "$p" "${redis_opts[@]}" --dir "$work/$p" --logfile "$work/$p/log" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
    --cluster-require-full-coverage no
done
for p in "$single" "${nodes[@]}"; do
  until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.05; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${nodes[@]}") --cluster-replicas 1 --cluster-yes >/dev/null
until [ "$(redis-cli -p "${nodes[0]}" cluster info | tr -d '\r' | grep cluster_state)" = "cluster_state:ok" ]; do
  sleep 0.2
done
sleep 2 # replicas finish their first sync
node_urls=$(printf 'redis://127.0.0.1:%s,' "${nodes[@]}")
node_urls=${node_urls%,}
seeds="redis://127.0.0.1:${nodes[0]},redis://127.0.0.1:${nodes[1]},redis://127.0.0.1:${nodes[2]}"

start_quotad() { # name port redis_url wait_replicas
  QUOTAD_DATABASE_URL="$pg/quotad_bench_$1_$$" QUOTAD_REDIS_URL="$3" QUOTAD_KEY_PREFIX="b$1$$" \
    QUOTAD_REDIS_WAIT_REPLICAS="$4" QUOTAD_LISTEN="127.0.0.1:$2" QUOTAD_LOG=warn "$bin/quotad" serve &
  pids+=($!)
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$2/readyz" >/dev/null && return
    sleep 0.1
  done
  echo "quotad ($1) did not become ready" >&2
  exit 1
}
start_quotad single 18281 "redis://127.0.0.1:$single" 0
start_quotad cluster 18282 "$seeds" 0
start_quotad wait 18283 "$seeds" 1
curl -fs http://127.0.0.1:18282/readyz
echo

out="$work/rounds.txt"
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds: single Redis"
  "$bin/quotad" bench --url http://127.0.0.1:18281 --redis-url "redis://127.0.0.1:$single" \
    --no-redis "${args[@]}" | tee -a "$out.single"
  echo "== round $r/$rounds: Redis Cluster (3 masters, 3 replicas)"
  "$bin/quotad" bench --url http://127.0.0.1:18282 --redis-url "$node_urls" \
    --no-redis "${args[@]}" | tee -a "$out.cluster"
  echo "== round $r/$rounds: Redis Cluster, QUOTAD_REDIS_WAIT_REPLICAS=1"
  "$bin/quotad" bench --url http://127.0.0.1:18283 --redis-url "$node_urls" \
    --no-redis "${args[@]}" | tee -a "$out.wait"
done

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
echo
echo "== medians of $rounds rounds (${args[*]})"
for setup in single cluster wait; do
  rate=$(grep -o '[0-9.]* req/s' "$out.$setup" | awk '{print $1}' | median)
  p50=$(grep -o 'p50 *[0-9.]* ms' "$out.$setup" | awk '{print $2}' | median)
  p99=$(grep -o 'p99 *[0-9.]* ms' "$out.$setup" | awk '{print $2}' | median)
  redis=$(grep -o 'redis [0-9.]* µs' "$out.$setup" | awk '{print $2}' | median)
  quotad=$(grep -o 'quotad [0-9.]* µs' "$out.$setup" | awk '{print $2}' | median)
  errors=$(grep -o 'errors [0-9]*' "$out.$setup" | awk '{s += $2} END {print s + 0}')
  printf '  %-8s %s req/s  p50 %s ms  p99 %s ms  quotad %s µs/decision  redis %s µs/decision (all nodes)  errors %s in all\n' \
    "$setup" "$rate" "$p50" "$p99" "$quotad" "$redis" "$errors"
done
echo "  wait: $(curl -fs http://127.0.0.1:18283/metrics | grep -E '^quotad_redis_unreplicated_decisions_total' || echo 'quotad_redis_unreplicated_decisions_total 0')"
echo "  cluster, by node (µs/decision, each round):"
grep -o '(by node: [^)]*)' "$out.cluster" | sed 's/^/    /'
