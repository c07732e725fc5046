#!/usr/bin/env bash
# Install everything cryosieve and its tests need on a fresh Debian/Ubuntu machine with Python >= 3.11:
# RELION 3.1 (Debian package, used by the tests as an independent reference and as an optional back-end),
# and, in a virtual environment of its own (.venv, or CRYOSIEVE_VENV), the CPU build of PyTorch and this package
# with its test extras. Nothing is installed into the Python that runs this script.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CRYOSIEVE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: making the virtual environment $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PYTHON="$VENV/bin/python"

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

# The CryoSPARC tests run the commands through both majors of cryosparc-tools: 5.x is installed above (the test
# extra); 4.x (CryoSPARC v4's client, same package name) goes into a folder of its own that the tests put first on
# the PYTHONPATH of the commands they start (tests/test_cryosparc.py, CRYOSPARC_TOOLS_4).
TOOLS4=${CRYOSIEVE_CRYOSPARC_TOOLS_4:-build/cryosparc-tools-4}
if ! PYTHONPATH="$TOOLS4" "$PYTHON" -c "import cryosparc, sys; sys.exit(cryosparc.__version__[:2] != '4.')" \
    >/dev/null 2>&1; then
  echo "setup: installing cryosparc-tools 4 into $TOOLS4 (for the tests)" >&2
  rm -rf "$TOOLS4"
  "$PYTHON" -m pip install -q --no-deps --target "$TOOLS4" "cryosparc-tools>=4.7,<5"
fi
echo "setup: done; the commands are in $VENV/bin (source $VENV/bin/activate to use them by name)" >&2
