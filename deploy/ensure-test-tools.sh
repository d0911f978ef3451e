#!/usr/bin/env bash
# Make sure the tools some tests drive are installed: Debian's Chromium (the usage page's browser
# test) and openapi-spec-validator from PyPI (validates /openapi.json). Idempotent; quick when
# both are there.
set -euo pipefail
log() { echo "ensure-test-tools: $*" >&2; }

if ! command -v chromium >/dev/null; then
  ((EUID == 0)) || { log "chromium is missing; install it (needs root): apt-get install chromium"; exit 1; }
  log "installing chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
chromium --version >/dev/null

if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
  log "installing openapi-spec-validator"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore openapi-spec-validator
fi
python3 -c 'import openapi_spec_validator'
