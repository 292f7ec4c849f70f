#!/usr/bin/env bash
# Creates .venv (if missing) and installs latprune with the service and dev extras into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision are pinned in pyproject.toml (torch==2.14.1, torchvision==0.29.1).
.venv/bin/python -m pip install --quiet -e ".[service,dev]"
