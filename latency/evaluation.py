"""Latency datasets from stored samples, the two baselines, and the metrics every predictor is judged by.

Every predictor (LPNet and the baselines) is fitted on the same training samples and compared in two
spaces: relative (latency / the dense reference timed interleaved with the sample: drift-free) and
absolute ms (relative prediction x the training set's median reference latency).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from latency.samples import LatencySample, best_measurements


@dataclass
class LatencyData:
    """Samples as arrays: keep ratios, resolution index, measured ms, reference ms, ratio, cost features."""

    keys: list[str]
    resolutions: list[int]
    keep_ratios: torch.Tensor  # [N, G] float32
    res_index: torch.Tensor  # [N] long
    latency_ms: np.ndarray
    reference_ms: np.ndarray
    ratio: np.ndarray
    macs_ratio: np.ndarray  # MACs / dense MACs at the sample's resolution
    layer_terms: np.ndarray  # [N, K] per-layer terms of the lookup-table baseline
    noise: np.ndarray  # IQR/median of the label's measurement (sample or reference, the larger)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: Sequence[int] | np.ndarray) -> LatencyData:
        """The samples at `index`, in that order."""
        idx = np.asarray(index, dtype=np.int64)
        t = torch.as_tensor(idx)
        return LatencyData([self.keys[i] for i in idx], self.resolutions, self.keep_ratios[t], self.res_index[t],
                           self.latency_ms[idx], self.reference_ms[idx], self.ratio[idx], self.macs_ratio[idx],
                           self.layer_terms[idx], self.noise[idx])

    def reference_by_resolution(self) -> list[float]:
        """Median reference latency (ms) per resolution: converts relative predictions to ms."""
        out = []
        for i, res in enumerate(self.resolutions):
            values = self.reference_ms[(self.res_index == i).numpy()]
            if len(values) == 0:
                raise ValueError(f"no sample at resolution {res}")
            out.append(float(np.median(values)))
        return out


def layer_terms(cost_model, keep_counts: Sequence[int]) -> np.ndarray:
    """Per conv/linear layer: MACs, MACs when a width is off 16-channel blocks, output activations; / dense MACs."""
    counts = torch.as_tensor([float(c) for c in keep_counts], dtype=torch.float64)
    cin, out = cost_model.widths(counts)
    in_per_group = torch.where(cost_model.depthwise, torch.ones_like(cin), cin / cost_model.conv_groups)
    macs = (cost_model.mac_factor * out * in_per_group).numpy()
    cin_i, out_i = np.rint(cin.numpy()), np.rint(out.numpy())
    misaligned = ((cin_i % 16 != 0) | (out_i % 16 != 0)).astype(np.float64)
    area = (cost_model.mac_factor / cost_model.kernel_area).numpy()
    dense = float(cost_model.dense_macs)
    return np.concatenate([macs, macs * misaligned, out_i * area]) / dense


def build_data(samples: Sequence[LatencySample], cost_models: Mapping[int, object]) -> LatencyData:
    """Least noisy measurement of every configuration (repeats left out), features from `cost_models[res]`."""
    rows = [s for s in best_measurements(samples).values()
            if s.ratio is not None and s.reference_ms is not None and s.resolution in cost_models]
    if not rows:
        raise ValueError("no usable samples (each needs an interleaved reference measurement)")
    resolutions = sorted({s.resolution for s in rows})
    sizes = {r: cost_models[r].group_sizes.numpy() for r in resolutions}
    ratios, macs, terms = [], [], []
    for s in rows:
        cm = cost_models[s.resolution]
        if len(s.keep_counts) != len(sizes[s.resolution]):
            raise ValueError(f"sample {s.key} has {len(s.keep_counts)} groups; the architecture has "
                             f"{len(sizes[s.resolution])}")
        ratios.append(np.asarray(s.keep_counts, dtype=np.float64) / sizes[s.resolution])
        with torch.no_grad():
            macs.append(float(cm.macs(s.keep_counts)) / cm.dense_macs)
        terms.append(layer_terms(cm, s.keep_counts))
    return LatencyData(
        keys=[s.key for s in rows], resolutions=resolutions,
        keep_ratios=torch.as_tensor(np.stack(ratios), dtype=torch.float32),
        res_index=torch.as_tensor([resolutions.index(s.resolution) for s in rows], dtype=torch.long),
        latency_ms=np.asarray([s.latency_ms for s in rows]), reference_ms=np.asarray([s.reference_ms for s in rows]),
        ratio=np.asarray([s.ratio for s in rows]), macs_ratio=np.asarray(macs), layer_terms=np.stack(terms),
        noise=np.asarray([s.noise for s in rows]))


def split_keys(keys: Sequence[str], test_share: float, seed: int = 0) -> list[str]:
    """A reproducible held-out subset of `keys` (at least one key, never all)."""
    if not 0 < test_share < 1:
        raise ValueError(f"test share must be in (0, 1), got {test_share}")
    if len(keys) < 2:
        raise ValueError("need at least 2 samples to hold some out")
    n_test = min(len(keys) - 1, max(1, int(round(test_share * len(keys)))))
    order = np.random.default_rng(seed).permutation(len(keys))
    return sorted(keys[i] for i in order[:n_test])


def metrics(predicted: np.ndarray, measured: np.ndarray) -> dict:
    """MAPE (%), share within +-5% and +-10% of measured, Spearman rank correlation."""
    from scipy.stats import spearmanr

    predicted, measured = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    err = np.abs(predicted - measured) / measured
    rho = float(spearmanr(predicted, measured).statistic) if len(measured) > 2 else float("nan")
    return {"n": int(len(measured)), "mape": float(err.mean() * 100), "within_5": float((err <= 0.05).mean()),
            "within_10": float((err <= 0.10).mean()), "spearman": rho}


class FlopsLinear:
    """Baseline: latency = a * MACs + b (on relative latency, MACs relative to dense: the same thing scaled)."""

    def fit(self, data: LatencyData, y: np.ndarray, weights: np.ndarray | None = None) -> FlopsLinear:
        design = np.stack([data.macs_ratio, np.ones(len(data))], axis=1)
        root_w = np.sqrt(np.ones(len(data)) if weights is None else weights)
        self.coef = np.linalg.lstsq(design * root_w[:, None], y * root_w, rcond=None)[0]
        return self

    def predict(self, data: LatencyData) -> np.ndarray:
        return self.coef[0] * data.macs_ratio + self.coef[1]


class LayerTable:
    """Baseline: sum over layers of a per-layer latency table, fitted by non-negative least squares.

    A layer's entry is linear in its MACs, its MACs when a width is off 16-channel blocks, and its output
    activation count: the per-(layer, in, out) table a lookup-table predictor would hold, with its entries
    learned from whole-network measurements instead of timing every layer alone.
    """

    def fit(self, data: LatencyData, y: np.ndarray, weights: np.ndarray | None = None) -> LayerTable:
        from scipy.optimize import nnls

        design = np.concatenate([data.layer_terms, np.ones((len(data), 1))], axis=1)
        self.scale = np.maximum(np.abs(design).max(0), 1e-12)
        root_w = np.sqrt(np.ones(len(data)) if weights is None else weights)
        self.coef = nnls(design / self.scale * root_w[:, None], y * root_w, maxiter=50 * design.shape[1])[0]
        return self

    def predict(self, data: LatencyData) -> np.ndarray:
        design = np.concatenate([data.layer_terms, np.ones((len(data), 1))], axis=1)
        return (design / self.scale) @ self.coef


def both_spaces(relative: np.ndarray, data: LatencyData, reference_ms: Sequence[float],
                max_noise: float = 0.10) -> dict:
    """Metrics of relative predictions against measured ratios, and (x reference ms) against measured ms;
    `relative_clean`: only against labels whose measurement passed the noise check (IQR/median <= max_noise)."""
    ref = np.asarray(reference_ms)[data.res_index.numpy()]
    out = {"relative": metrics(relative, data.ratio), "absolute_ms": metrics(relative * ref, data.latency_ms)}
    clean = data.noise <= max_noise
    if clean.sum() > 2:
        out["relative_clean"] = metrics(relative[clean], data.ratio[clean])
    return out


def baseline_predictions(train: LatencyData, test: LatencyData) -> dict[str, np.ndarray]:
    """Relative-latency predictions on `test` of FLOPs-linear and the lookup table, fitted on `train`."""
    return {"flops_linear": FlopsLinear().fit(train, train.ratio).predict(test),
            "lookup_table": LayerTable().fit(train, train.ratio).predict(test)}


def lpnet_relative(net, data: LatencyData) -> np.ndarray:
    """LPNet's relative-latency predictions for every sample of `data`."""
    with torch.no_grad():
        y = net(data.keep_ratios, data.res_index)
        if net.target == "log_ratio":
            return torch.exp(y).numpy().astype(np.float64)
        return (torch.exp(y) / net.reference_ms[data.res_index]).numpy().astype(np.float64)
