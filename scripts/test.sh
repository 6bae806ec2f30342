#!/usr/bin/env bash
# The test command: installs everything (idempotent), then runs the whole suite, slow end-to-end
# tests with the real backends included. Extra arguments go to pytest (e.g. -k card).
#   scripts/test.sh
# For a quick run while coding, after one setup: .venv/bin/python -m pytest   (skips the slow tests)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_llamacpp.sh
exec .venv/bin/python -m pytest -m "slow or not slow" -p no:cacheprovider "$@"
