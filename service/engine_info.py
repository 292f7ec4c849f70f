"""What the API needs to know about the engine, without importing torch into the API process.

Architecture facts come from `python -m service.archspec` in a subprocess (one per architecture, its answer
kept in a bounded cache), latency predictions for cohort members from `python -m workers.predict_members`; at
most MAX_HELPERS such helpers run at once. Method schemas come from torch-free engine modules, imported lazily.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

ARCHSPEC_TIMEOUT_S = 300
# Each helper is a Python process that imports torch (about 0.8 GiB); more than two at once would starve the
# API's cores and memory, and requests simply wait for a slot.
MAX_HELPERS = 2
CACHE_ENTRIES = 64
_helpers = threading.BoundedSemaphore(MAX_HELPERS)
_lock = threading.Lock()
_archs: dict[str, dict[str, Any]] = {}
# Helper answers, least recently used first: templates keyed by architecture, exact layouts by
# (architecture, classes, channels) for the rare architecture whose template is not exact.
_states: OrderedDict[Any, dict[str, Any]] = OrderedDict()
_pending: dict[Any, threading.Lock] = {}


class EngineInputError(ValueError):
    """A request names something the engine does not accept; the message says what to fix."""


def _helper_env() -> dict[str, str]:
    # One compute thread unless told otherwise: the helpers are small, and the API's cores serve requests.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "1"}


def _run_archspec(args: list[str]) -> dict:
    with _helpers:
        return _spawn(args)


def _spawn(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "service.archspec", *args], capture_output=True, text=True,
        timeout=ARCHSPEC_TIMEOUT_S, cwd=str(Path(__file__).resolve().parent.parent), env=_helper_env(),
    )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"architecture lookup failed: {proc.stderr.strip()[-500:]}") from None


def predict_member_latency(request: dict[str, Any]) -> dict[str, Any]:
    """Predicted latency of cohort members on a device, from `python -m workers.predict_members` in a subprocess
    (the request and answer are described there); RuntimeError if the subprocess fails."""
    with _helpers:
        proc = subprocess.run(
            [sys.executable, "-m", "workers.predict_members"], input=json.dumps(request), capture_output=True,
            text=True, timeout=ARCHSPEC_TIMEOUT_S, cwd=str(Path(__file__).resolve().parent.parent),
            env=_helper_env(),
        )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"latency prediction failed: {proc.stderr.strip()[-500:]}") from None


def known_archs() -> dict[str, dict[str, Any]]:
    """Architecture name -> facts (default_resolution), asked once from a subprocess."""
    with _lock:
        if _archs:
            return dict(_archs)
    answer = _run_archspec(["--list"])
    with _lock:
        _archs.update(answer["archs"])
        return dict(_archs)


def check_arch(arch: str) -> dict[str, Any]:
    """Facts of a known architecture, or EngineInputError listing a few known names."""
    archs = known_archs()
    if arch not in archs:
        sample = ", ".join(list(archs)[:12])
        raise EngineInputError(f"unknown architecture {arch!r}; known include: {sample}, ...")
    return archs[arch]


def _cached(key: Any, args: list[str]) -> dict[str, Any]:
    """The helper's answer to `args`, asked once however many requests want it at the same time."""
    with _lock:
        if key in _states:
            _states.move_to_end(key)
            return _states[key]
        gate = _pending.setdefault(key, threading.Lock())
    with gate:
        try:
            with _lock:
                if key in _states:
                    return _states[key]
            answer = _run_archspec(args)
            with _lock:
                _states[key] = answer
                while len(_states) > CACHE_ENTRIES:
                    _states.popitem(last=False)
            return answer
        finally:
            with _lock:
                _pending.pop(key, None)


def expected_state(arch: str, num_classes: int, in_channels: int) -> dict[str, dict]:
    """The architecture's state-dict layout {key: {shape, is_float}}: one helper per architecture, whose
    template marks the classifier and stem dimensions that follow `num_classes` and `in_channels`."""
    answer = _cached(arch, ["--template", arch])
    if answer.get("exact"):
        sizes = {"num_classes": num_classes, "in_channels": in_channels}
        state = {}
        for key, entry in answer["state"].items():
            shape = list(entry["shape"])
            for dim, name in entry.get("vary", ()):
                shape[dim] = sizes[name]
            state[key] = {"shape": shape, "is_float": entry["is_float"]}
        return state
    if "error" not in answer:
        answer = _cached((arch, num_classes, in_channels), [arch, str(num_classes), str(in_channels)])
    if "error" in answer:
        raise EngineInputError(answer["error"])
    return answer["state"]


def check_arch_size(arch: str, num_classes: int, in_channels: int, limit: int) -> None:
    """EngineInputError if the architecture holds more than `limit` values in its state dict."""
    count = sum(math.prod(entry["shape"]) for entry in expected_state(arch, num_classes, in_channels).values())
    if count > limit:
        raise EngineInputError(f"{arch} has {count:,} parameters, over this server's limit of {limit:,} "
                               "(LATPRUNE_MAX_ARCH_PARAMS); pick a smaller architecture")


def list_methods() -> list[dict[str, Any]]:
    """Every registered method: name, description, params JSON schema."""
    from pruning.registry import METHODS

    return [{"name": info.name, "description": info.description,
             "params_schema": info.params_model.model_json_schema()} for info in METHODS.values()]


def validate_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The method's params with defaults filled in; EngineInputError for an unknown method,
    pydantic.ValidationError naming the wrong field otherwise."""
    from pruning.registry import UnknownMethodError, get_method

    try:
        info = get_method(method)
    except UnknownMethodError as exc:
        raise EngineInputError(str(exc)) from None
    return info.params_model.model_validate(params).model_dump(mode="json")
