#!/usr/bin/env bash
# The project's one test command (README, CI): build the test hosts if needed, lint, then run the
# whole suite once on each ComfyUI host, each in its own environment.
#   bash scripts/test.sh                 everything, on ComfyUI 0.3.75 and 0.33.0
#   bash scripts/test.sh -k trainer      extra arguments go to pytest (on every host)
#   HOSTS=0.33.0 bash scripts/test.sh    one host only
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/test.sh   the suite against another ComfyUI checkout
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${COMFYUI_PATH:-}" ]; then
  bash scripts/setup_test_env.sh
  runs=("custom:$COMFYUI_PATH:.host/custom/venv")
else
  hosts=${HOSTS:-0.3.75 0.33.0}
  # shellcheck disable=SC2086
  bash scripts/setup_test_env.sh $hosts
  runs=()
  for h in $hosts; do runs+=("$h:.host/$h/ComfyUI:.host/$h/venv"); done
fi
first_venv=${runs[0]##*:}
"$first_venv/bin/python" -m ruff check .
"$first_venv/bin/python" -m ruff format --check .
failed=()
for run in "${runs[@]}"; do
  IFS=: read -r name comfy venv <<<"$run"
  echo "=== tests on ComfyUI $name ($comfy) ==="
  COMFYUI_PATH="$comfy" KONTEXT_TEST_HOST="$name" "$venv/bin/python" -m pytest -p no:cacheprovider -q "$@" \
    || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "tests failed on: ${failed[*]}" >&2
  exit 1
fi
