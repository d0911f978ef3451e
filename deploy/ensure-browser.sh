#!/usr/bin/env bash
# Make sure Debian's Chromium is installed, for the usage page's browser test. Idempotent.
set -euo pipefail
if ! command -v chromium >/dev/null; then
  ((EUID == 0)) || { echo "ensure-browser: chromium is missing; install it (needs root): apt-get install chromium" >&2; exit 1; }
  echo "ensure-browser: installing chromium" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
chromium --version >/dev/null
