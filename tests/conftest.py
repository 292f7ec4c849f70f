"""Shared fixtures: tiny models and helpers used across packages."""

from __future__ import annotations

import os

# Keep torch from oversubscribing the 2-core CI machine when several test processes run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
