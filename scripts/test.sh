#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, lint, then pytest (real-data and slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests use for real: a PostgreSQL server (the store tests start their own) and Chromium
# (the dashboard is tested in a real browser through Playwright). Installed only when missing.
if command -v apt-get >/dev/null 2>&1; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
