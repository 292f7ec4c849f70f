#!/usr/bin/env bash
# Sets up .venv and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/latprune prune --arch resnet20 --dataset builtin:digits --method l1 --budget flops=0.5 \
  --epochs 3 --out out/demo "$@"
