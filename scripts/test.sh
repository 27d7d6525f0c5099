#!/usr/bin/env bash
# The project's one test command (README, CI): build the test environment if needed, lint, test.
#   bash scripts/test.sh                 everything
#   bash scripts/test.sh -k trainer      extra arguments go to pytest
# COMFYUI_PATH=/path/to/ComfyUI runs the suite against another ComfyUI checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_test_env.sh
PY=.venv/bin/python
$PY -m ruff check .
$PY -m ruff format --check .
$PY -m pytest -p no:cacheprovider -q "$@"
