"""Saving and loading LPNet predictors: safetensors for the weights, JSON for the metadata (no pickle)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from latency.device import DeviceSpec, EnvironmentFingerprint
from latency.lpnet import FORMAT, FingerprintMismatchError, LPNet, PredictorError, Target, WidthFeatures


class PredictorMeta(BaseModel):
    """The JSON half of a saved predictor."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    arch: str
    device: DeviceSpec
    fingerprint: EnvironmentFingerprint
    resolutions: list[int]
    group_sizes: list[int]
    n_layers: int
    target: Target
    hidden: list[int]
    members: int = 1
    reference_ms: list[float]
    training_samples: int
    validation_samples: int
    test_keys: list[str] = []
    metrics: dict[str, Any] = {}
    fit_info: dict[str, Any] = {}
    library_versions: dict[str, str] = {}
    created_at: float = 0.0


def library_versions() -> dict[str, str]:
    """Versions of the libraries a predictor's numbers depend on."""
    import numpy
    import onnxruntime

    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    try:
        from importlib.metadata import version

        versions["latprune"] = version("latprune")
    except Exception:  # running from a source checkout without an installed distribution
        versions["latprune"] = "source"
    return versions


def predictor_paths(stem: str | Path) -> tuple[Path, Path]:
    """(weights, metadata) paths of a predictor saved under `stem`."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_predictor(net: LPNet, meta: PredictorMeta, stem: str | Path) -> tuple[Path, Path]:
    """Write `stem`.safetensors and `stem`.json (each via a temporary file, so no half-written file remains)."""
    from safetensors.torch import save_file

    weights, meta_path = predictor_paths(stem)
    weights.parent.mkdir(parents=True, exist_ok=True)
    meta = meta.model_copy(update={"created_at": meta.created_at or time.time()})
    tmp_w, tmp_m = weights.with_suffix(".tmp"), meta_path.with_suffix(".json.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp_w),
              metadata={"format": FORMAT})
    tmp_m.write_text(meta.model_dump_json(indent=1))
    tmp_w.replace(weights)
    tmp_m.replace(meta_path)
    return weights, meta_path


def read_meta(stem: str | Path) -> PredictorMeta:
    """Read and validate a predictor's JSON metadata."""
    _, meta_path = predictor_paths(stem)
    try:
        meta = PredictorMeta.model_validate(json.loads(meta_path.read_text()))
    except FileNotFoundError:
        raise PredictorError(f"no predictor metadata {meta_path}") from None
    except (json.JSONDecodeError, ValidationError) as exc:
        raise PredictorError(f"{meta_path} is not predictor metadata: {str(exc).splitlines()[0]}") from None
    if meta.format != FORMAT:
        raise PredictorError(f"{meta_path}: format {meta.format!r}, expected {FORMAT!r}")
    return meta


def check_fingerprint(meta: PredictorMeta, fingerprint: EnvironmentFingerprint, force: bool = False) -> None:
    """Raise FingerprintMismatchError if the predictor was fitted in another environment (unless forced)."""
    diffs = meta.fingerprint.mismatches(fingerprint)
    if diffs and not force:
        raise FingerprintMismatchError(
            f"predictor for {meta.arch} on device {meta.device.name!r} was fitted in another environment "
            f"({'; '.join(diffs[:3])}); re-profile this machine, or force its use")


def load_predictor(stem: str | Path, fingerprint: EnvironmentFingerprint | None = None,
                   force: bool = False) -> tuple[LPNet, PredictorMeta]:
    """Load a predictor; with `fingerprint`, refuse one fitted in another environment unless `force`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pruning.zoo import WeightsError, check_state

    meta = read_meta(stem)
    if fingerprint is not None:
        check_fingerprint(meta, fingerprint, force)
    weights, _ = predictor_paths(stem)
    features = WidthFeatures(len(meta.group_sizes), meta.n_layers, meta.resolutions)
    net = LPNet(features, meta.hidden, meta.target, meta.members)
    try:
        state = load_file(str(weights))
        check_state(net, state)
    except FileNotFoundError:
        raise PredictorError(f"no predictor weights {weights}") from None
    except (SafetensorError, OSError, WeightsError) as exc:
        raise PredictorError(f"{weights}: {exc}") from None
    net.load_state_dict(state)
    return net.eval(), meta
