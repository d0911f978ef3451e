#!/usr/bin/env bash
# Two builds of quotad side by side, in one sitting: each daemon on a port, key prefix, database
# and Redis server of its own (the same Postgres), measured in turn (A, B, A, B, …) so that the
# machine's noise falls on both alike. Prints each round's figures, then the medians and the
# ratios B / A of requests/s, of quotad CPU per decision (utime + stime of the daemon, read from
# /proc/<pid>/stat around each measurement, divided by the requests answered) and of Redis CPU
# and commands per decision (that side's Redis alone: `INFO cpu` and `INFO commandstats`, as the
# load generator reports them).
#
#   deploy/bench-versions.sh OLD_QUOTAD NEW_QUOTAD [ROUNDS] [-- quotad-bench args]
#
# The load generator of both is target/release/quotad-bench unless A_BENCH / B_BENCH name
# another command (e.g. A_BENCH="old/quotad bench" to compare two load generators against the
# same daemon, with OLD_QUOTAD = NEW_QUOTAD).
#   deploy/bench-versions.sh /tmp/quotad-before target/release/quotad 3 -- -c 50 --duration 5
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n '2,13p' "$0"; exit 2; }
a_bin=$1 b_bin=$2
shift 2
rounds=3
if [[ $# -gt 0 && $1 != "--" ]]; then rounds=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
bench_args=("$@")
[[ ${#bench_args[@]} -gt 0 ]] || bench_args=(-c 50 --duration 5)
a_bench=${A_BENCH:-${CARGO_TARGET_DIR:-target}/release/quotad-bench}
b_bench=${B_BENCH:-${CARGO_TARGET_DIR:-target}/release/quotad-bench}

deploy/ensure-services.sh >/dev/null
pg="postgres://postgres@127.0.0.1:5432"
tag="bv$$"
pids=()
redis_dir=$(mktemp -d)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for side in a b; do
    psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS ${tag}_$side WITH (FORCE)" 2>/dev/null || true
  done
  rm -rf "$redis_dir"
}
trap cleanup EXIT

redis_port() { [[ $1 == a ]] && echo 18381 || echo 18382; }
start() { # side binary port
  local rp
  rp=$(redis_port "$1")
  redis-server --port "$rp" --bind 127.0.0.1 --save "" --appendonly no --dir "$redis_dir" \
    --maxmemory-policy noeviction --daemonize no --logfile "$redis_dir/redis-$1.log" &
  pids+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$rp" ping >/dev/null 2>&1 && break; sleep 0.05; done
  QUOTAD_LISTEN="127.0.0.1:$3" QUOTAD_LOG=warn QUOTAD_DATABASE_URL="$pg/${tag}_$1" \
    QUOTAD_REDIS_URL="redis://127.0.0.1:$rp" QUOTAD_KEY_PREFIX="${tag}$1" "$2" serve &
  pids+=($!)
  for _ in $(seq 1 200); do curl -fs "http://127.0.0.1:$3/readyz" >/dev/null && return; sleep 0.1; done
  echo "quotad ($2) did not become ready on port $3" >&2; exit 1
}
start a "$a_bin" 18191; a_pid=${pids[1]}
start b "$b_bin" 18192; b_pid=${pids[3]}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# One measurement: prints "req/s p99_ms cpu_us_per_decision redis_cpu_us redis_cmds". Users are
# loaded straight into the daemon's Redis (--preload), so the daemon's CPU is all spent on the
# measured decisions.
measure() { # bench port pid prefix redis_port
  local before after out rate p99 secs rcpu rcmds
  before=$(ticks "$3")
  out=$($1 --url "http://127.0.0.1:$2" --no-redis --runs 1 --preload --key-prefix "$4" \
    --redis-url "redis://127.0.0.1:$5" "${bench_args[@]}") ||
    { echo "the load generator failed ($1):" >&2; echo "$out" >&2; return 1; }
  after=$(ticks "$3")
  rate=$(grep -m1 '^quotad HTTP consume' <<<"$out" | awk '{print $4}')
  [[ -n $rate ]] || { echo "no consume figure in the load generator's output:" >&2; echo "$out" >&2; return 1; }
  p99=$(grep -m1 '^quotad HTTP consume' <<<"$out" | sed -E 's/.* p99 +([0-9.]+) ms.*/\1/')
  secs=$(grep -oE '[0-9.]+ s each' <<<"$out" | awk '{print $1}')
  # "    per decision: quotad X µs  redis Y µs  Z redis cmds", the first after the consume line.
  read -r rcpu rcmds < <(grep -m1 'per decision:' <<<"$out" |
    sed -E 's/.*redis ([0-9.]+) µs +([0-9.]+) redis cmds.*/\1 \2/')
  awk -v r="$rate" -v p="$p99" -v t=$((after - before)) -v hz="$hz" -v s="$secs" \
    -v rc="${rcpu:-0}" -v rn="${rcmds:-0}" \
    'BEGIN { n = r * s; printf "%s %s %.1f %s %s\n", r, p, (n > 0 ? t / hz * 1e6 / n : 0), rc, rn }'
}

median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
ra=() rb=() pa=() pb=() ca=() cb=() xa=() xb=() na=() nb=()
echo "A: $a_bin ($a_bench)"
echo "B: $b_bin ($b_bench)"
echo "bench args: ${bench_args[*]}; $rounds rounds, A then B each round"
for i in $(seq 1 "$rounds"); do
  line=$(measure "$a_bench" 18191 "$a_pid" "${tag}a" "$(redis_port a)") || exit 1
  read -r r p c x n <<<"$line"; ra+=("$r") pa+=("$p") ca+=("$c") xa+=("$x") na+=("$n")
  echo "round $i A: $r req/s, p99 $p ms, quotad CPU $c µs/decision, Redis CPU $x µs and $n commands/decision"
  line=$(measure "$b_bench" 18192 "$b_pid" "${tag}b" "$(redis_port b)") || exit 1
  read -r r p c x n <<<"$line"; rb+=("$r") pb+=("$p") cb+=("$c") xb+=("$x") nb+=("$n")
  echo "round $i B: $r req/s, p99 $p ms, quotad CPU $c µs/decision, Redis CPU $x µs and $n commands/decision"
done
mra=$(printf '%s\n' "${ra[@]}" | median) mrb=$(printf '%s\n' "${rb[@]}" | median)
mpa=$(printf '%s\n' "${pa[@]}" | median) mpb=$(printf '%s\n' "${pb[@]}" | median)
mca=$(printf '%s\n' "${ca[@]}" | median) mcb=$(printf '%s\n' "${cb[@]}" | median)
mxa=$(printf '%s\n' "${xa[@]}" | median) mxb=$(printf '%s\n' "${xb[@]}" | median)
mna=$(printf '%s\n' "${na[@]}" | median) mnb=$(printf '%s\n' "${nb[@]}" | median)
echo "median A: $mra req/s, p99 $mpa ms, quotad CPU $mca µs/decision, Redis CPU $mxa µs and $mna commands/decision"
echo "median B: $mrb req/s, p99 $mpb ms, quotad CPU $mcb µs/decision, Redis CPU $mxb µs and $mnb commands/decision"
awk -v a="$mra" -v b="$mrb" -v x="$mca" -v y="$mcb" -v u="$mxa" -v w="$mxb" \
  'BEGIN { printf "B / A: %.2fx the rate, %.2fx the quotad CPU and %.2fx the Redis CPU per decision\n",
    b / a, (x > 0 ? y / x : 0), (u > 0 ? w / u : 0) }'
