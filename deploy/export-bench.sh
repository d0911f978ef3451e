#!/usr/bin/env bash
# What the usage export costs: rows a second, and the memory of the process that streams it,
# for GET /v1/admin/usage/export and for `quotad export`, over ROWS rows of one month.
#
#   deploy/export-bench.sh QUOTAD [ROWS] [RUNS]
#
# QUOTAD is a release build (`cargo build --release`; target/release/quotad). ROWS (default
# 1,000,000) rows are inserted in one statement into a database of their own (a user each, with
# metadata; one user in ten with a stored plan), then each way is run RUNS times (default 3):
#   http  the daemon (QUOTAD_LOG=warn) streams the export to curl, which writes it to /dev/null;
#         the daemon's VmRSS is sampled every 20 ms from /proc while it streams.
#   cli   `quotad export` to stdout, redirected to /dev/null; its peak resident size from GNU
#         time (%M).
# Prints per run the rows a second, the bytes and the peak RSS, then the median rows a second and
# the daemon's RSS before, at its peak (VmHWM) and after; last, untimed, it counts the lines each
# way writes (the header and every row) and fails unless both have them all. Needs curl, psql, GNU time, and the
# Redis and Postgres of deploy/ensure-services.sh (the daemon is only ready with both).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
rows=${2:-1000000}
runs=${3:-3}
[[ -x $bin ]] || { sed -n '2,15p' "$0"; exit 2; }
bin=$(realpath "$bin")

deploy/ensure-services.sh >/dev/null
pg="postgres://postgres@127.0.0.1:5432"
db="quotad_export_bench_$$"
port=18491
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

export QUOTAD_DATABASE_URL="$pg/$db" QUOTAD_LOG=warn
"$bin" migrate
start=$(date -u +%Y-%m-01)
period=${start:0:7}
echo "inserting $rows rows of $period …"
psql -q -v ON_ERROR_STOP=1 "$pg/$db" <<SQL
INSERT INTO usage_tracking (user_id, type, count, overage, period_start, period_end, metadata, version)
SELECT md5(i::text)::uuid, 'ai_generation', i % 5000, i % 7,
       '$start'::timestamptz, '$start'::timestamptz + interval '1 month',
       jsonb_build_object('prompt_tokens', i * 3, 'completion_tokens', i, 'model', 'm-1'), 1
FROM generate_series(1, $rows) AS i;
INSERT INTO user_plans (user_id, plan) SELECT md5(i::text)::uuid, 'PRO' FROM generate_series(10, $rows, 10) AS i;
ANALYZE usage_tracking;
ANALYZE user_plans;
SQL

rss() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; } # kB

QUOTAD_LISTEN="127.0.0.1:$port" QUOTAD_KEY_PREFIX="eb$$" "$bin" serve &
qpid=$!
pids=("$qpid")
for _ in $(seq 1 200); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
curl -fs "http://127.0.0.1:$port/readyz" >/dev/null || { echo "quotad did not become ready" >&2; exit 1; }
before=$(rss "$qpid" VmRSS)

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "http: GET /v1/admin/usage/export?period=$period&format=csv, $runs runs"
for run in $(seq 1 "$runs"); do
  (
    peak=0
    while kill -0 "$qpid" 2>/dev/null; do
      r=$(rss "$qpid" VmRSS)
      ((r > peak)) && peak=$r && echo "$peak" >"$dir/peak"
      sleep 0.02
    done
  ) &
  sampler=$!
  read -r code bytes secs < <(curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' \
    "http://127.0.0.1:$port/v1/admin/usage/export?period=$period&format=csv")
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  [[ $code == 200 ]] || { echo "export answered $code" >&2; exit 1; }
  awk -v r="$rows" -v s="$secs" -v b="$bytes" -v p="$(cat "$dir/peak")" -v n="$run" \
    'BEGIN { printf "  run %d: %.0f rows/s (%.2f s, %.1f MB), daemon VmRSS peak while streaming %.1f MB\n", n, r / s, s, b / 1e6, p / 1024 }'
  awk -v r="$rows" -v s="$secs" 'BEGIN { printf "%.0f\n", r / s }' >>"$dir/http"
done
after=$(rss "$qpid" VmRSS)
hwm=$(rss "$qpid" VmHWM)
echo "  median $(median <"$dir/http") rows/s; daemon VmRSS before $((before / 1024)) MB, after $((after / 1024)) MB, VmHWM (peak of its life) $((hwm / 1024)) MB"
kill "$qpid"
wait "$qpid" 2>/dev/null || true
pids=()

echo "cli: quotad export --period $period --format csv >/dev/null, $runs runs"
for run in $(seq 1 "$runs"); do
  /usr/bin/time -f '%e %M' -o "$dir/time" "$bin" export --period "$period" --format csv >/dev/null
  read -r secs maxrss <"$dir/time"
  awk -v r="$rows" -v s="$secs" -v m="$maxrss" -v n="$run" \
    'BEGIN { printf "  run %d: %.0f rows/s (%.2f s), peak RSS %.1f MB\n", n, r / s, s, m / 1024 }'
  awk -v r="$rows" -v s="$secs" 'BEGIN { printf "%.0f\n", r / s }' >>"$dir/cli"
done
echo "  median $(median <"$dir/cli") rows/s"

# Not timed: both ways write the header and every row.
http_lines=$(QUOTAD_LISTEN="127.0.0.1:$port" QUOTAD_KEY_PREFIX="eb$$" "$bin" serve >/dev/null & qpid=$!
  pids=("$qpid")
  for _ in $(seq 1 200); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  curl -fsS "http://127.0.0.1:$port/v1/admin/usage/export?period=$period" | wc -l
  kill "$qpid"; wait "$qpid" 2>/dev/null || true)
cli_lines=$("$bin" export --period "$period" | wc -l)
echo "lines: http $http_lines, cli $cli_lines (expected $((rows + 1)))"
[[ $http_lines == $((rows + 1)) && $cli_lines == $((rows + 1)) ]]
