"""Fit and evaluate a device's LPNet from the samples stored in a latprune home."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from latency.device import EnvironmentFingerprint
from latency.evaluation import (
    LatencyData,
    baseline_predictions,
    both_spaces,
    build_data,
    lpnet_relative,
    split_keys,
)
from latency.lpnet import FitConfig, LPNet, PredictorError, Target, WidthFeatures, fit_lpnet
from latency.lpnet_io import PredictorMeta, library_versions, load_predictor, save_predictor
from latency.profiler import repeatability
from latency.samples import LatencySample
from latency.store import LatencyHome

LEARNING_CURVE = (250, 500, 1000)
SPACES = ("relative", "absolute_ms", "relative_clean")
SPACE_TITLES = {"relative": "relative to the interleaved dense reference",
                "absolute_ms": "absolute ms (relative x training median reference)",
                "relative_clean": "relative, only labels whose IQR/median passed the 10% check"}
ROWS = (("lpnet", "LPNet"), ("flops_linear", "FLOPs-linear"), ("lookup_table", "lookup table"),
        ("repeatability_floor", "repeatability floor"))


def one_environment(samples: Sequence[LatencySample],
                    fingerprint: EnvironmentFingerprint | None = None) -> tuple[list[LatencySample], int]:
    """Samples of one environment (the given one, else that of the latest sample), and how many were left out."""
    if not samples:
        return [], 0
    if fingerprint is None:
        latest = max(samples, key=lambda s: s.measured_at)
        fingerprint = latest.fingerprint
        shape = (latest.num_classes, latest.in_channels)
    else:
        shape = None
    kept = [s for s in samples if s.fingerprint == fingerprint
            and (shape is None or (s.num_classes, s.in_channels) == shape)]
    return kept, len(samples) - len(kept)


def cost_models(arch: str, resolutions: Sequence[int], num_classes: int, in_channels: int) -> dict[int, object]:
    """pruning.cost.CostModel of the dense architecture at every resolution."""
    from latency.profiler import ProfileTarget

    return {r: ProfileTarget.build(arch, r, num_classes, in_channels).cost for r in resolutions}


def targets(data: LatencyData, target: Target) -> torch.Tensor:
    """Training targets: log(latency / interleaved reference) or log(latency ms)."""
    values = data.ratio if target == "log_ratio" else data.latency_ms
    return torch.as_tensor(np.log(values), dtype=torch.float32)


def fit_on(features: WidthFeatures, train: LatencyData, target: Target,
           config: FitConfig | None = None) -> tuple[LPNet, dict]:
    """LPNet fitted on `train`."""
    return fit_lpnet(features, train.keep_ratios, train.res_index, targets(train, target),
                     train.reference_by_resolution(), target, config)


def load_data(home: LatencyHome, device: str, arch: str, resolutions: Sequence[int] | None,
              fingerprint: EnvironmentFingerprint | None = None):
    """(samples of one environment, how many were left out, cost models by resolution, LatencyData)."""
    resolutions = sorted(resolutions) if resolutions else home.profiled_resolutions(device, arch)
    if not resolutions:
        raise PredictorError(f"no profile of {arch} on device {device!r}; run `latprune profile` first")
    samples, dropped = one_environment(home.samples(device, arch, list(resolutions)), fingerprint)
    if not samples:
        raise PredictorError(f"no samples of {arch} at resolutions {list(resolutions)} on device {device!r}"
                             + (" from the predictor's environment" if fingerprint else ""))
    models = cost_models(arch, resolutions, samples[0].num_classes, samples[0].in_channels)
    data = build_data(samples, models)
    missing = sorted(set(resolutions) - set(data.resolutions))
    if missing:
        raise PredictorError(f"no usable samples at resolutions {missing}")
    return samples, dropped, models, data


def split_by_keys(data: LatencyData, test_keys: Sequence[str]) -> tuple[LatencyData, LatencyData]:
    """(training samples, held-out samples) of `data`."""
    held = set(test_keys)
    return (data.subset([i for i, k in enumerate(data.keys) if k not in held]),
            data.subset([i for i, k in enumerate(data.keys) if k in held]))


def held_out_points(relative: np.ndarray, data: LatencyData, reference_ms: Sequence[float]) -> dict:
    """Predicted and measured ms of every held-out configuration (4 significant digits): what a predicted-vs-
    measured plot of the predictor needs, kept because the metrics alone do not show where it errs."""
    ref = np.asarray(reference_ms)[data.res_index.numpy()]
    return {"predicted_ms": [float(f"{v:.4g}") for v in np.asarray(relative) * ref],
            "measured_ms": [float(f"{v:.4g}") for v in np.asarray(data.latency_ms)],
            "resolution": [int(data.resolutions[i]) for i in data.res_index.tolist()]}


def fit_predictor(home: LatencyHome, device: str, arch: str, resolutions: Sequence[int] | None = None,
                  target: Target = "log_ratio", test_share: float = 0.2, seed: int = 0,
                  config: FitConfig | None = None) -> tuple[Path, PredictorMeta]:
    """Fit LPNet on the stored samples (a held-out share kept for evaluation) and save it in `home`."""
    spec = home.device(device)
    samples, dropped, models, data = load_data(home, device, arch, resolutions)
    if len(data) < 10:
        raise PredictorError(f"only {len(data)} distinct configurations profiled; fitting needs at least 10")
    test_keys = split_keys(data.keys, test_share, seed)
    train, test = split_by_keys(data, test_keys)
    features = WidthFeatures.from_cost_models([models[r] for r in data.resolutions], data.resolutions)
    started = time.perf_counter()
    net, info = fit_on(features, train, target, config or FitConfig(seed=seed))
    info.update(fit_seconds=time.perf_counter() - started, samples_other_environments=dropped)
    relative = lpnet_relative(net, test)
    scores = both_spaces(relative, test, net.reference_ms.tolist())
    info["held_out"] = held_out_points(relative, test, net.reference_ms.tolist())
    meta = PredictorMeta(
        arch=arch, device=spec, fingerprint=samples[0].fingerprint, resolutions=data.resolutions,
        group_sizes=[int(s) for s in features.group_sizes.tolist()], n_layers=int(features.a_out.shape[0]),
        target=target, hidden=net.hidden, members=len(net.members), reference_ms=net.reference_ms.tolist(),
        training_samples=len(train), validation_samples=info["val_samples"], test_keys=test_keys,
        metrics=scores, fit_info=info, library_versions=library_versions())
    stem = home.predictor_stem(device, arch, data.resolutions)
    save_predictor(net, meta, stem)
    return stem, meta


def evaluate_predictor(home: LatencyHome, device: str, arch: str, resolution: int | None = None,
                       learning_curve: Sequence[int] = LEARNING_CURVE, config: FitConfig | None = None) -> dict:
    """Held-out metrics of the saved LPNet, FLOPs-linear and lookup table, the repeatability floor, and
    LPNet's learning curve (refitted on growing subsets of the same training set)."""
    if resolution is None:
        resolutions = home.profiled_resolutions(device, arch)
        if not resolutions:
            raise PredictorError(f"no profile of {arch} on device {device!r}; run `latprune profile` first")
        stem = home.predictor_stem(device, arch, resolutions)
        if not stem.with_name(stem.name + ".json").exists():
            raise PredictorError(f"no latency predictor for {arch} at resolutions {resolutions} on device "
                                 f"{device!r}; run `latprune predictor fit` first")
    else:
        stem = home.find_predictor(device, arch, resolution)
    net, meta = load_predictor(stem)
    samples, _, models, data = load_data(home, device, arch, meta.resolutions, meta.fingerprint)
    train, test = split_by_keys(data, meta.test_keys)
    if len(test) == 0:
        raise PredictorError("the predictor's held-out configurations are no longer in the profile")
    reference = net.reference_ms.tolist()
    rows = {"lpnet": both_spaces(lpnet_relative(net, test), test, reference)}
    for name, predicted in baseline_predictions(train, test).items():
        rows[name] = both_spaces(predicted, test, reference)
    floor = repeatability(samples)
    if floor is not None:
        rows["repeatability_floor"] = {k: floor[k] for k in SPACES if k in floor}
    curve = []
    features = WidthFeatures.from_cost_models([models[r] for r in data.resolutions], data.resolutions)
    sizes = sorted({k for k in learning_curve if k < len(train)} | ({len(train)} if learning_curve else set()))
    order = np.random.default_rng(0).permutation(len(train))
    for k in sizes:
        subset = train.subset(order[:k])
        sub_net, _ = fit_on(features, subset, meta.target, config or FitConfig())
        curve.append({"train_samples": k, **both_spaces(lpnet_relative(sub_net, test), test, reference)})
    return {"device": device, "arch": arch, "resolutions": meta.resolutions, "target": meta.target,
            "train_samples": len(train), "test_samples": len(test), "predictors": rows,
            "repeatability": floor, "learning_curve": curve, "predictor": str(stem)}


def markdown_tables(report: dict) -> str:
    """The evaluation report as markdown tables (relative and absolute), then the learning curve."""
    lines = []
    for space, title in SPACE_TITLES.items():
        if "lpnet" not in report["predictors"] or space not in report["predictors"]["lpnet"]:
            continue
        lines += [f"{report['arch']} @ {report['resolutions']} on {report['device']}, {title}; "
                  f"train {report['train_samples']}, test {report['test_samples']}:", "",
                  "| predictor | MAPE % | within 5% | within 10% | Spearman rho | n |", "|---|---|---|---|---|---|"]
        for key, label in ROWS:
            m = report["predictors"].get(key, {}).get(space)
            if m:
                lines.append(f"| {label} | {m['mape']:.2f} | {m['within_5']:.1%} | {m['within_10']:.1%} | "
                             f"{m['spearman']:.4f} | {m['n']} |")
        lines.append("")
    if report.get("learning_curve"):
        lines += ["LPNet learning curve (held-out set fixed):", "",
                  "| train samples | MAPE % (rel) | within 10% (rel) | rho (rel) | MAPE % (ms) | within 10% (ms) |",
                  "|---|---|---|---|---|---|"]
        for point in report["learning_curve"]:
            r, a = point["relative"], point["absolute_ms"]
            lines.append(f"| {point['train_samples']} | {r['mape']:.2f} | {r['within_10']:.1%} | {r['spearman']:.4f} | "
                         f"{a['mape']:.2f} | {a['within_10']:.1%} |")
        lines.append("")
    return "\n".join(lines)
