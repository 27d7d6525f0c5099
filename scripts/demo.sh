#!/usr/bin/env bash
# The README's first command: set up a fresh machine (the newest test host's environment) and run
# the offline demo on the pretrained stand-in model. Extra arguments go to `kontext-train demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_test_env.sh 0.33.0
COMFYUI_PATH="$PWD/.host/0.33.0/ComfyUI" exec .host/0.33.0/venv/bin/python -m kontext_train demo "$@"
