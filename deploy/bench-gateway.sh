#!/usr/bin/env bash
# What the quota check costs behind a real nginx: requests/s and p50/p99 through the shipped
# nginx configuration (deploy/nginx/quotad.conf.template) on an unmetered path (nginx proxies
# straight to the upstream) and on a metered one (nginx asks quotad's /v1/gate first, then
# proxies), in front of the same upstream, measured alternately in one run with wrk. Also the
# CPU each process spent per request (from /proc/<pid>/stat; Redis from INFO cpu).
#   deploy/bench-gateway.sh                    # 3 runs of 10 s, 50 connections, then 1 connection
#   RUNS=5 DURATION=5 CONNECTIONS=100 deploy/bench-gateway.sh
#   TEMPLATE=/tmp/other.conf.template deploy/bench-gateway.sh   # another nginx configuration
# It starts everything it measures on spare ports (a release quotad with its own Redis, key prefix
# and database; the upstream, an nginx answering 200 itself; the gateway nginx) and stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3} DURATION=${DURATION:-10} CONNECTIONS=${CONNECTIONS:-50} USERS=${USERS:-1000}
TEMPLATE=${TEMPLATE:-deploy/nginx/quotad.conf.template}
for tool in nginx wrk envsubst redis-server psql curl; do
  command -v "$tool" >/dev/null || { echo "bench-gateway: $tool is missing (apt-get install nginx wrk gettext-base)" >&2; exit 1; }
done
deploy/ensure-services.sh
cargo build --release --bin quotad
bin="${CARGO_TARGET_DIR:-target}/release"

quotad_port=18281 redis_port=18379 upstream_port=18282 gateway_port=18283
db="quotad_benchgw_$$"
pg="postgres://postgres@127.0.0.1:5432"
work=$(mktemp -d)
pids=()
cleanup() {
  # Last started first: quotad's final flush still has its Redis and Postgres.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_http() { for _ in $(seq 1 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "bench-gateway: $1 did not answer" >&2; exit 1; }

# Redis and quotad. Every type unlimited on the default plan: every metered request is allowed
# and counted (a refusal would be cheaper, and not what is measured).
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --maxmemory-policy noeviction --daemonize no --logfile "$work/redis.log" &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
sed -e 's/^ai_generation = 50$/ai_generation = -1/' -e 's/^export = 10$/export = -1/' \
  <(awk '/^pub const BUILT_IN: &str = r#"/{on=1; sub(/.*r#"/, ""); } on && /^"#;/{exit} on' src/plans.rs) > "$work/plans.toml"
grep -q '^ai_generation = -1' "$work/plans.toml" || { echo "bench-gateway: could not write the plans file" >&2; exit 1; }
QUOTAD_LISTEN="127.0.0.1:$quotad_port" QUOTAD_REDIS_URL="redis://127.0.0.1:$redis_port" \
  QUOTAD_DATABASE_URL="$pg/$db" QUOTAD_KEY_PREFIX="benchgw$$" QUOTAD_PLANS="$work/plans.toml" \
  QUOTAD_LOG=warn "$bin/quotad" serve &
quotad_pid=$!
pids+=("$quotad_pid")
wait_http "http://127.0.0.1:$quotad_port/readyz"

# start_nginx NAME WORKERS HTTP_BODY: an nginx of its own in $work/NAME, in the foreground
# (so the script can stop it), with HTTP_BODY inside its http block; its pid in $nginx_pid.
start_nginx() {
  local dir="$work/$1"
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<EOF
worker_processes $2;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp;
  fastcgi_temp_path $dir/tmp; uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;
  keepalive_requests 1000000;
  $3
}
EOF
  nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' &
  nginx_pid=$!
  pids+=("$nginx_pid")
}

# The upstream: nginx answering 200 itself, one worker.
start_nginx upstream 1 "server { listen 127.0.0.1:$upstream_port; location / { return 200 'ok'; } }"
wait_http "http://127.0.0.1:$upstream_port/"

# The gateway: the shipped template, rendered as its header says, two workers (one per core).
mkdir -p "$work/conf.d"
QUOTAD_ADDR="127.0.0.1:$quotad_port" UPSTREAM_ADDR="127.0.0.1:$upstream_port" LISTEN_PORT="127.0.0.1:$gateway_port" \
  envsubst '${QUOTAD_ADDR} ${UPSTREAM_ADDR} ${LISTEN_PORT}' < "$TEMPLATE" > "$work/conf.d/quotad.conf"
start_nginx gateway 2 "include $work/conf.d/*.conf;"
gateway_pid=$nginx_pid
wait_http "http://127.0.0.1:$gateway_port/"

# The users, taken in turn by wrk's connections; each one's first request (and its load from
# Postgres) is made before anything is measured.
users=()
for _ in $(seq 1 "$USERS"); do users+=("$(cat /proc/sys/kernel/random/uuid)"); done
{
  printf 'local users = {'
  printf '"%s",' "${users[@]}"
  printf '}\nlocal n = 0\n'
  cat <<'EOF'
function setup(thread) thread:set("offset", math.random(#users)) end
request = function()
  n = n + 1
  local user = users[(n + offset) % #users + 1]
  return wrk.format("GET", nil, {["X-User-Id"] = user})
end
EOF
} > "$work/users.lua"
printf '%s\n' "${users[@]}" | xargs -P 8 -I{} curl -fs -o /dev/null -H "X-User-Id: {}" "http://127.0.0.1:$gateway_port/generate" ||
  { echo "bench-gateway: warm-up through the gateway failed" >&2; exit 1; }
first=$(curl -s -o /dev/null -w '%{http_code}' -H "X-User-Id: ${users[0]}" "http://127.0.0.1:$gateway_port/generate")
[[ $first == 200 ]] || { echo "bench-gateway: a metered request answered $first" >&2; exit 1; }

# CPU ticks of a process and its children (nginx's workers), and Redis' own CPU seconds.
ticks() { local total=0 p; for p in "$1" $(pgrep -P "$1" || true); do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$total"; }
# TCP connections accepted on this machine (all of them: wrk's, nginx's to the upstream and to quotad).
accepted() { awk '/^Tcp:/ {if (!h) {for (i = 1; i <= NF; i++) if ($i == "PassiveOpens") c = i; h = 1} else print $c}' /proc/net/snmp; }
redis_cpu() { redis-cli -p "$redis_port" info cpu | awk -F: '/^used_cpu_(sys|user):/{s += $2} END {printf "%.6f", s}'; }
hz=$(getconf CLK_TCK)

# One wrk measurement of $1 (a path) with $2 connections: "req/s p50_ms p99_ms requests errors
# gateway_cpu_us quotad_cpu_us redis_cpu_us accepted_per_1000" (CPU per request; TCP connections
# accepted per 1,000 requests, wrk's own included).
measure() {
  local path=$1 conns=$2 threads=$(( $2 < 2 ? 1 : 2 ))
  local g0 q0 r0 a0 g1 q1 r1 a1 out
  g0=$(ticks "$gateway_pid") q0=$(ticks "$quotad_pid") r0=$(redis_cpu) a0=$(accepted)
  out=$(wrk -t"$threads" -c"$conns" -d"${DURATION}s" --latency -s "$work/users.lua" "http://127.0.0.1:$gateway_port$path")
  g1=$(ticks "$gateway_pid") q1=$(ticks "$quotad_pid") r1=$(redis_cpu) a1=$(accepted)
  echo "$out" | awk -v g="$((g1 - g0))" -v q="$((q1 - q0))" -v r0="$r0" -v r1="$r1" -v hz="$hz" -v a="$((a1 - a0))" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /requests in/ { n = $1 } /Requests\/sec/ { rate = $2 }
    /Non-2xx or 3xx responses/ { errors = $NF } /Socket errors/ { errors += 1 }
    END { per = (n > 0) ? 1e6 / n : 0;
          printf "%.0f %.3f %.3f %d %d %.1f %.1f %.1f %.2f\n", rate, p50, p99, n, errors + 0, g / hz * per, q / hz * per, (r1 - r0) * per, a * 1000 / n }'
}

median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), wrk, $USERS users, ${DURATION} s per measurement, $RUNS runs, alternating"
for conns in "$CONNECTIONS" 1; do
  : > "$work/plain" ; : > "$work/gated"
  for run in $(seq 1 "$RUNS"); do
    measure /plain "$conns" >> "$work/plain"
    measure /generate "$conns" >> "$work/gated"
    echo "  run $run, $conns connections: without gate $(tail -1 "$work/plain" | awk '{printf "%s req/s p50 %s ms p99 %s ms", $1, $2, $3}'); with gate $(tail -1 "$work/gated" | awk '{printf "%s req/s p50 %s ms p99 %s ms (errors %s)", $1, $2, $3, $5}')"
  done
  col() { awk -v c="$2" '{print $c}' "$work/$1" | median; }
  echo "median of $RUNS runs, $conns connection(s):"
  printf '  %-30s %8s req/s  p50 %6s ms  p99 %6s ms  nginx CPU %6s us/req\n' "without gate (/plain)" "$(col plain 1)" "$(col plain 2)" "$(col plain 3)" "$(col plain 6)"
  printf '  %-30s %8s req/s  p50 %6s ms  p99 %6s ms  nginx CPU %6s us/req  quotad %6s us/req  redis %6s us/req\n' "with gate (/generate)" "$(col gated 1)" "$(col gated 2)" "$(col gated 3)" "$(col gated 6)" "$(col gated 7)" "$(col gated 8)"
  printf '  TCP connections accepted per 1,000 requests: without %s, with %s\n' "$(col plain 9)" "$(col gated 9)"
  paste "$work/plain" "$work/gated" | awk '{print $10 / $1}' | median | awk '{printf "  rate with / without: %.2fx (median of the per-run ratios)\n", $1}'
  paste "$work/plain" "$work/gated" | awk '{print $11 - $2}' | median | awk '{printf "  p50 added by the gate: %.3f ms\n", $1}'
  paste "$work/plain" "$work/gated" | awk '{print $12 - $3}' | median | awk '{printf "  p99 added by the gate: %.3f ms\n", $1}'
done
used=$(curl -s "http://127.0.0.1:$quotad_port/v1/users/${users[0]}/usage" | sed -n 's/.*"ai_generation":{[^}]*"used":\([0-9]*\).*/\1/p')
echo "(the first user's ai_generation count after the runs: $used)"
