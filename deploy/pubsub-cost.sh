#!/usr/bin/env bash
# What one refusal-cache invalidation costs a Redis Cluster, plain PUBLISH against sharded
# SPUBLISH: `deploy/pubsub-cost.sh [publishes per round] [rounds]`.
#
# Starts its own six-node cluster (three masters, three replicas) on loopback ports, puts one
# subscriber on it the way a quotad replica would (plain: SUBSCRIBE on one node; sharded:
# SSUBSCRIBE on the master owning the channel's slot), publishes with redis-benchmark to one
# master, and reads every node's CPU time (INFO cpu, user + sys) before and after. Prints, per
# mode, the median over the rounds of the CPU time per publish summed over all six nodes, and
# on the nodes that neither published nor served the subscriber. Tears the cluster down.
set -euo pipefail

n="${1:-200000}"
rounds="${2:-3}"
base="${PUBSUB_COST_PORT:-7301}"
dir="$(mktemp -d)"
ports=()
for i in 0 1 2 3 4 5; do ports+=($((base + i))); done
subs=()

cleanup() {
  for p in "${subs[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${ports[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

for p in "${ports[@]}"; do
  mkdir -p "$dir/$p"
  redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-node-timeout 5000 --save "" --appendonly no --dir "$dir/$p" --daemonize yes \
    --logfile "$dir/$p/log"
done
for p in "${ports[@]}"; do
  until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.05; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 --cluster-yes >/dev/null
until [ "$(redis-cli -p "${ports[0]}" cluster info | tr -d '\r' | grep cluster_state)" = "cluster_state:ok" ]; do
  sleep 0.2
done
sleep 2 # replicas finish their first sync

# The publishing master: the first port's node, a master after `--cluster create`.
pub="${ports[0]}"
# A bucket whose slot that master owns: the shard channel quotad would use for it.
tag=""
for b in $(seq 0 1023); do
  slot=$(redis-cli -p "$pub" cluster keyslot "{$b}")
  owner=$(redis-cli -p "$pub" cluster nodes | awk -v s="$slot" '$3 ~ /master/ {
      for (i = 9; i <= NF; i++) { split($i, r, "-"); if (r[2] == "") r[2] = r[1];
        if (s >= r[1] && s <= r[2]) { split($2, a, "[:@]"); print a[2] } } }')
  if [ "$owner" = "$pub" ]; then tag="$b"; break; fi
done
[ -n "$tag" ] || { echo "no bucket on $pub" >&2; exit 1; }
plain_channel="q:1:changes"
shard_channel="q:1:{$tag}:changes"
# A plain subscriber on another master (any node delivers what any node publishes).
other="${ports[1]}"

cpu() { # total CPU seconds of node $1
  redis-cli -p "$1" info cpu | tr -d '\r' |
    awk -F: '/^used_cpu_sys:|^used_cpu_user:/ { s += $2 } END { printf "%.6f", s }'
}

measure() { # mode, command... -> "<all nodes us/publish> <bystanders us/publish>"
  local mode="$1" sub_port="$2"; shift 2
  local before=() after=() i
  for p in "${ports[@]}"; do before+=("$(cpu "$p")"); done
  redis-benchmark -p "$pub" -n "$n" -c 20 -P 16 -q "$@" >/dev/null
  sleep 0.5 # let the cluster bus deliver
  for p in "${ports[@]}"; do after+=("$(cpu "$p")"); done
  local all=0 bystanders=0
  for i in "${!ports[@]}"; do
    d=$(echo "${after[$i]} - ${before[$i]}" | bc -l)
    all=$(echo "$all + $d" | bc -l)
    if [ "${ports[$i]}" != "$pub" ] && [ "${ports[$i]}" != "$sub_port" ]; then
      bystanders=$(echo "$bystanders + $d" | bc -l)
    fi
  done
  printf '%s %.3f %.3f\n' "$mode" "$(echo "$all * 1000000 / $n" | bc -l)" \
    "$(echo "$bystanders * 1000000 / $n" | bc -l)"
}

redis-cli -p "$other" subscribe "$plain_channel" >/dev/null &
subs+=($!)
redis-cli -p "$pub" ssubscribe "$shard_channel" >/dev/null &
subs+=($!)
sleep 0.5

results=()
for r in $(seq 1 "$rounds"); do
  results+=("$(measure plain "$other" PUBLISH "$plain_channel" 1b4e28ba-2fa1-11d2-883f-0016d3cca427)")
  results+=("$(measure sharded "$pub" SPUBLISH "$shard_channel" 1b4e28ba-2fa1-11d2-883f-0016d3cca427)")
done

echo "redis-server $(redis-server --version | awk '{print $3}' | cut -d= -f2); $n publishes per round, $rounds rounds; six nodes"
echo "CPU time per publish (µs), median of the rounds:"
for mode in plain sharded; do
  printf '%s\n' "${results[@]}" | awk -v m="$mode" '$1 == m { a[++k] = $2; b[k] = $3 }
    END { n = asort(a); asort(b); i = int((n + 1) / 2);
      printf "  %-8s all six nodes %6.2f   nodes neither publishing nor subscribed %6.2f\n", m, a[i], b[i] }'
done
