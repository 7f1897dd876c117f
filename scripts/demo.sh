#!/usr/bin/env bash
# The main job on a fresh machine: install, then train, evaluate and report on the real ELPV images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/defectscope demo "$@"
