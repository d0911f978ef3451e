#!/usr/bin/env bash
# What an idle quotad costs its Redis: the commands a second its background tasks send (the
# flusher's scans, the reservation sweeper's) and Redis' CPU time, with no request at all.
#
#   deploy/idle-cost.sh QUOTAD [QUOTAD …] [-- SECONDS]
#
# Each build runs in turn against a Redis server of its own (fresh, no persistence) and a
# database of its own, with the default settings (QUOTAD_FLUSH_INTERVAL_MS 1000). After it is
# ready and SECONDS/3 more (its first passes done), `INFO commandstats` and `INFO cpu` are read,
# then again SECONDS later (default 60). Prints per build the commands a second by command and
# Redis' CPU in ms a second (user + sys).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=()
while [[ $# -gt 0 && $1 != "--" ]]; do bins+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift
secs=${1:-60}
[[ ${#bins[@]} -gt 0 ]] || { sed -n '2,11p' "$0"; exit 2; }

deploy/ensure-services.sh >/dev/null
pg="postgres://postgres@127.0.0.1:5432"
tag="ic$$"
rp=18391
port=18291
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  redis-cli -p "$rp" shutdown nosave >/dev/null 2>&1 || true
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $tag WITH (FORCE)" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

stats() { # "cmd calls" per line, then "cpu <seconds>"
  redis-cli -p "$rp" info commandstats | tr -d '\r' |
    sed -nE 's/^cmdstat_([a-z|]+):calls=([0-9]+).*/\1 \2/p'
  redis-cli -p "$rp" info cpu | tr -d '\r' |
    awk -F: '/^used_cpu_(sys|user):/ {t += $2} END {printf "cpu %.6f\n", t}'
}

for bin in "${bins[@]}"; do
  redis-server --port "$rp" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --daemonize no --logfile "$dir/redis.log" &
  rpid=$!
  for _ in $(seq 1 100); do redis-cli -p "$rp" ping >/dev/null 2>&1 && break; sleep 0.05; done
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $tag WITH (FORCE)" 2>/dev/null || true
  QUOTAD_LISTEN="127.0.0.1:$port" QUOTAD_LOG=warn QUOTAD_DATABASE_URL="$pg/$tag" \
    QUOTAD_REDIS_URL="redis://127.0.0.1:$rp" "$bin" serve &
  qpid=$!
  pids=("$qpid" "$rpid")
  ready=
  for _ in $(seq 1 200); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && { ready=1; break; }
    sleep 0.1
  done
  [[ -n $ready ]] || { echo "$bin did not become ready" >&2; exit 1; }
  sleep $((secs / 3))
  stats | sort >"$dir/before"
  sleep "$secs"
  stats | sort >"$dir/after"
  echo "$bin, idle for $secs s:"
  join -a 2 "$dir/before" "$dir/after" | awk -v s="$secs" '
    $1 == "cpu" { cpu = (NF == 3 ? $3 - $2 : $2); next }
    { d = (NF == 3 ? $3 - $2 : $2); if (d > 0) { printf "  %-16s %10.1f /s\n", $1, d / s; total += d } }
    END { printf "  %-16s %10.1f /s\n  redis cpu        %10.2f ms/s\n", "all commands", total / s, cpu * 1000 / s }'
  kill "$qpid" "$rpid" 2>/dev/null || true
  wait "$qpid" "$rpid" 2>/dev/null || true
  pids=()
done
