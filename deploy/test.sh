#!/usr/bin/env bash
# The project's test command: `deploy/test.sh [extra args for the test runner]`.
# Integration tests need a real Redis and Postgres, so make sure both are up first, then run
# every test target; all tests run even after a failure, and any failure makes this exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/ensure-services.sh
# Chromium for the usage page's browser test; nginx, Caddy and envsubst for the gateway tests;
# openapi-spec-validator for /openapi.json.
deploy/ensure-test-tools.sh

# Tests read these; keep a caller's own values (e.g. a different Redis in CI).
export QUOTAD_TEST_REDIS_URL="${QUOTAD_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export QUOTAD_TEST_DATABASE_URL="${QUOTAD_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"

# `quotad bench` runs the quotad-bench binary found beside quotad (a crate of its own, which the
# test build of the daemon's package does not produce): build it where the tests' quotad lives.
cargo build --quiet -p quotad-bench --bin quotad-bench

# nextest when installed (faster, clearer output), else cargo's own runner.
if cargo nextest --version >/dev/null 2>&1; then runner=(cargo nextest run); else runner=(cargo test); fi

# The runner's own summary is the last thing printed: CI reads it. (quotad has no doc-tests;
# examples in docs are `text` blocks.)
exec "${runner[@]}" --all-targets --no-fail-fast "$@"
