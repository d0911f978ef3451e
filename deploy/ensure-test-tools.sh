#!/usr/bin/env bash
# Make sure the tools some tests drive are installed: Debian's Chromium (the usage page's browser
# test), nginx, Caddy and envsubst (the gateway tests), and from PyPI openapi-spec-validator
# (validates /openapi.json) and schemathesis 4.x (tests/api/schemathesis.rs runs it against
# /openapi.json). Idempotent; quick when all are there.
set -euo pipefail
log() { echo "ensure-test-tools: $*" >&2; }

# Debian packages, each by a program it provides: Chromium (the usage page's browser test), nginx
# and Caddy (tests/api/gateways.rs runs both in front of quotad) and envsubst (gettext-base; it
# renders the nginx template). One apt-get update for all of them, and none when all are there.
apt_missing=()
command -v chromium >/dev/null || apt_missing+=(chromium)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || apt_missing+=(nginx)
command -v caddy >/dev/null || apt_missing+=(caddy)
command -v envsubst >/dev/null || apt_missing+=(gettext-base)
if ((${#apt_missing[@]})); then
  ((EUID == 0)) || { log "${apt_missing[*]} missing; install (needs root): apt-get install ${apt_missing[*]}"; exit 1; }
  log "installing ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi
chromium --version >/dev/null
# Debian puts nginx in /usr/sbin, which a non-root PATH may lack (the tests look there too).
"$(command -v nginx || echo /usr/sbin/nginx)" -v 2>/dev/null
caddy version >/dev/null
command -v envsubst >/dev/null

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
