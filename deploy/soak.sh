#!/usr/bin/env bash
# The chaos soak (tests/api/soak.rs) for a given number of seconds (default 300): two quotad
# daemons under consume load while Redis is restarted (with and without its data) and paused,
# Postgres is restarted, a daemon is SIGKILLed, and the month ends halfway through. Prints the
# test's `soak:` summary line. The test binary is the debug build, as in `deploy/test.sh`.
#   deploy/soak.sh          # 300 s
#   deploy/soak.sh 120
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-300}"
deploy/ensure-services.sh >/dev/null
export QUOTAD_TEST_REDIS_URL="${QUOTAD_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export QUOTAD_TEST_DATABASE_URL="${QUOTAD_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
export QUOTAD_SOAK_SECS="$secs"
log="$(mktemp -t quotad-soak.XXXXXX.log)"
status=0
cargo nextest run --test api 'soak::chaos_soak' --no-capture >"$log" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then
  tail -n 60 "$log"
fi
grep '^soak:' "$log" || echo "soak: no summary line (see $log)"
[ "$status" -eq 0 ] && rm -f "$log"
exit "$status"
