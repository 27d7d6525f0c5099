#!/usr/bin/env bash
# The README's first command: set up a fresh machine (same environment as the tests) and run the
# offline demo on the tiny random model. Extra arguments go to `kontext-train demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_test_env.sh
exec .venv/bin/python -m kontext_train demo "$@"
