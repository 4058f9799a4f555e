#!/usr/bin/env bash
# Install the test extras (and Chromium for the browser tests), lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is not installed and this user cannot apt-get it: browser tests will skip" >&2
  fi
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
