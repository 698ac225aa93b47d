#!/usr/bin/env bash
# Download, on a machine with network, the wheels a fresh GPU machine lacks for scripts/gpu_check.sh.
#
#   scripts/fetch_gpu_wheels.sh [DEST]        (default DEST: .whl/ in the repository root, git-ignored)
#
# A typical GPU machine has Python 3.12 with the CUDA build of torch, numpy, OpenCV and aiohttp, and no
# network. What the GPU check needs beyond that: PyAV (the default avatar's video, audio resampling),
# webrtcvad (the sessions' voice activity detection) and pytest (the CUDA tests). Only these are
# fetched (torch, numpy, OpenCV and aiohttp never), for CPython 3.12 on manylinux x86-64, without
# dependencies (the list is complete), and only those not already in DEST. Versions are the ones this
# repository is developed and tested with. Fails if DEST ends up over 60 MB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && PYTHON="${PYTHON_FOR_PIP:-$ROOT/.venv/bin/python}"
MAX_BYTES=$((60 * 1024 * 1024))

# name==version, one per package (pure-Python wheels are py3-none-any).
WHEELS=(
  "av==18.1.0"                      # ~36 MB: FFmpeg is bundled
  "webrtcvad-wheels==2.0.14.post1"
  "pytest==9.2.0"
  "pluggy==1.7.0"
  "iniconfig==2.3.1"
  "packaging==26.4"
  "pytest-timeout==2.4.0"
  "pygments==2.21.0"                # pytest needs it
)

mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"
  version="${spec##*==}"
  stem="$(echo "$name" | tr '-' '_')"   # wheel file names use underscores
  if compgen -G "$DEST/${stem}-${version}-*.whl" > /dev/null; then
    echo "have  $spec"
    continue
  fi
  echo "fetch $spec"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any \
    -d "$DEST" "$spec"
done

total=$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
echo "$(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l) wheels, $((total / 1024 / 1024)) MB in $DEST"
if [ "$total" -gt "$MAX_BYTES" ]; then
  echo "error: the wheels exceed 60 MB" >&2
  exit 1
fi
