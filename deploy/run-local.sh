#!/usr/bin/env bash
# Quick start: run quotad against the local Redis and Postgres (started if needed).
# Extra arguments go to `quotad serve`, e.g. `deploy/run-local.sh --listen 127.0.0.1:9090`.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/ensure-services.sh

# quotad creates the `quotad` database if it is missing. A caller's own values win.
export QUOTAD_DATABASE_URL="${QUOTAD_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/quotad}"
export QUOTAD_REDIS_URL="${QUOTAD_REDIS_URL:-redis://127.0.0.1:6379}"

# exec (and cargo run, which execs the binary on Unix) so Ctrl-C / SIGTERM / SIGHUP reach quotad
# itself: it flushes to Postgres on shutdown and reloads its plans file on SIGHUP.
exec cargo run --release --bin quotad -- serve "$@"
