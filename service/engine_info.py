"""What the API needs to know about the engine, without importing torch into the API process.

Architecture facts come from `python -m service.archspec` in a subprocess (cached for the process's
life), latency predictions for cohort members from `python -m workers.predict_members`; method schemas
and dataset-reference syntax come from torch-free engine modules, imported lazily.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ARCHSPEC_TIMEOUT_S = 300
_lock = threading.Lock()
_archs: dict[str, dict[str, Any]] = {}
_states: dict[tuple[str, int, int], dict[str, dict]] = {}


class EngineInputError(ValueError):
    """A request names something the engine does not accept; the message says what to fix."""


def _run_archspec(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "service.archspec", *args], capture_output=True, text=True,
        timeout=ARCHSPEC_TIMEOUT_S, cwd=str(Path(__file__).resolve().parent.parent),
    )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"architecture lookup failed: {proc.stderr.strip()[-500:]}") from None


def predict_member_latency(request: dict[str, Any]) -> dict[str, Any]:
    """Predicted latency of cohort members on a device, from `python -m workers.predict_members` in a subprocess
    (the request and answer are described there); RuntimeError if the subprocess fails."""
    # One compute thread unless told otherwise: the prediction is small, and the API's cores serve requests.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "workers.predict_members"], input=json.dumps(request), capture_output=True, text=True,
        timeout=ARCHSPEC_TIMEOUT_S, cwd=str(Path(__file__).resolve().parent.parent), env=env,
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


def expected_state(arch: str, num_classes: int, in_channels: int) -> dict[str, dict]:
    """The architecture's state-dict layout {key: {shape, is_float}} (subprocess, cached)."""
    key = (arch, num_classes, in_channels)
    with _lock:
        if key in _states:
            return _states[key]
    answer = _run_archspec([arch, str(num_classes), str(in_channels)])
    if "error" in answer:
        raise EngineInputError(answer["error"])
    with _lock:
        _states[key] = answer["state"]
    return answer["state"]


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


def check_dataset(ref: str, data_root: Path) -> str:
    """The canonical dataset reference; EngineInputError if malformed or a path leaves the data root."""
    from pruning.datarefs import DatasetRefError, parse_dataset_ref, resolve_under_root

    try:
        parsed = parse_dataset_ref(ref)
        if parsed.scheme == "imagefolder":
            resolve_under_root(parsed.name, data_root.resolve())
    except DatasetRefError as exc:
        raise EngineInputError(str(exc)) from None
    return str(parsed)
