#!/usr/bin/env bash
# Sets up .venv and runs the main job, `latprune demo`: start the one-machine stack, profile this machine,
# prune resnet20 on builtin:digits to half its measured latency, download the ONNX, compare dense and pruned.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/latprune demo "$@"
