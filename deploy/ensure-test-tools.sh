#!/usr/bin/env bash
# Make sure the tools some tests drive are installed: Debian's Chromium (the usage page's browser
# test), and from PyPI openapi-spec-validator (validates /openapi.json) and schemathesis 4.x
# (tests/api/schemathesis.rs runs it against /openapi.json). Idempotent; quick when all are there.
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

if ! schemathesis --version 2>/dev/null | grep -q 'version 4\.'; then
  log "installing schemathesis 4.x"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore 'schemathesis>=4,<5'
  # pyenv puts new console scripts on PATH through its shims only after a rehash.
  if command -v pyenv >/dev/null; then pyenv rehash; fi
fi
schemathesis --version | grep -q 'version 4\.' ||
  { log "schemathesis 4.x is not on PATH after installing it"; exit 1; }
