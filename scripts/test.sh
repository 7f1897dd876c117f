#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, lint, then pytest (real-data and slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
