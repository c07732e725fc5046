#!/usr/bin/env bash
# Install everything cryosieve and its tests need on a fresh Debian/Ubuntu machine with Python >= 3.11:
# RELION 3.1 (Debian package, used by the tests as an independent reference and as an optional back-end),
# the CPU build of PyTorch, and this package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v relion_reconstruct >/dev/null 2>&1 || ! command -v relion_postprocess >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "setup: installing RELION (Debian package relion)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq relion openmpi-bin >/dev/null
  else
    echo "setup: RELION not found and no apt-get; the RELION comparisons in the tests will fail" >&2
  fi
fi

# The CPU build of PyTorch first: an unpinned torch would pull several GB of CUDA libraries.
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q "torch==2.13.0" \
    || "$PYTHON" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PYTHON" -m pip install -q -e ".[test]"
echo "setup: done" >&2
