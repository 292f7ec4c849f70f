#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (lint first). Needs PostgreSQL and Redis on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The console's browser test drives Debian's headless Chromium; install it when it is missing and apt can.
install_browser() {
  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
}
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    install_browser || echo "could not install chromium; the console's browser test will be skipped" >&2
  fi
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
