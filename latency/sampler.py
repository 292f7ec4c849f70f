"""Width configurations to profile: random per-group ratios, uniform sweeps, single-group sweeps.

Of every 10 configurations: 1 uniform-width sweep point; 2 single-group sweeps (one group off the
8-channel grid); 3 random (every group's ratio uniform in [min_ratio, 1]); 2 "levelled" random (a
per-configuration level drawn uniformly, the groups scattered around it), which covers the very small and
the nearly dense models that independent uniform ratios almost never produce (their MACs concentrate
around a third of the dense model's) and the uneven allocations pruning methods produce; 2 levelled random
with every count rounded to a multiple of 8 or 16, the fast configurations that a device's channel
rounding produces.

Configuration i depends only on (seed, i), so the first n configurations of a larger request are the same
n configurations: a profile can be extended later and every sample already measured stays valid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GOLDEN = 0.6180339887498949
KIND_BY_SLOT = ("uniform", "single", "single", "random", "random", "random", "levelled", "levelled", "aligned",
                "aligned")
SINGLE_GROUP_BASES = (1.0, 0.75, 0.5)


@dataclass(frozen=True)
class WidthConfig:
    """Kept channels per group, and how the sampler chose them."""

    kind: str  # dense | uniform | single | random | levelled | aligned
    keep_counts: tuple[int, ...]


def config_key(keep_counts: Sequence[int], resolution: int) -> str:
    """Stable id of (widths, resolution): what the sample store uses to skip measured configurations."""
    text = f"{int(resolution)}:" + ",".join(str(int(c)) for c in keep_counts)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _counts(ratios: np.ndarray, sizes: np.ndarray) -> tuple[int, ...]:
    return tuple(int(c) for c in np.clip(np.rint(ratios * sizes), 1, sizes))


def _config(i: int, sizes: np.ndarray, seed: int, min_ratio: float, attempt: int) -> WidthConfig:
    if i == 0 and attempt == 0:
        return WidthConfig("dense", tuple(int(s) for s in sizes))
    rng = np.random.default_rng([seed, i, attempt])
    kind = KIND_BY_SLOT[i % len(KIND_BY_SLOT)]
    if kind == "uniform":
        # Golden-ratio sequence: successive sweep points fill [min_ratio, 1] evenly at any prefix length.
        k = i // len(KIND_BY_SLOT) + attempt
        ratio = min_ratio + (1 - min_ratio) * ((0.5 + k * GOLDEN) % 1.0)
        return WidthConfig(kind, _counts(np.full(len(sizes), ratio), sizes))
    if kind == "single":
        base = SINGLE_GROUP_BASES[int(rng.integers(len(SINGLE_GROUP_BASES)))]
        counts = list(_counts(np.full(len(sizes), base), sizes))
        g = int(rng.integers(len(sizes)))
        size = int(sizes[g])
        low = max(1, int(np.ceil(min_ratio * size)))
        count = int(rng.integers(low, size + 1))
        if count % 8 == 0 and size > 8:
            # Single-group sweeps exist to show the predictor counts off onnxruntime's 8/16 channel blocks.
            count = max(1, count - int(rng.integers(1, 8)))
        counts[g] = count
        return WidthConfig(kind, tuple(counts))
    if kind == "random":
        return WidthConfig(kind, _counts(rng.uniform(min_ratio, 1.0, len(sizes)), sizes))
    level = rng.uniform(min_ratio, 1.0)
    spread = rng.uniform(0.05, 0.5)
    ratios = np.clip(level + spread * rng.uniform(-1.0, 1.0, len(sizes)), min_ratio, 1.0)
    if kind == "levelled":
        return WidthConfig(kind, _counts(ratios, sizes))
    multiple = int(rng.choice([8, 16]))
    counts = np.rint(ratios * sizes / multiple) * multiple
    # Groups smaller than the multiple keep their size; the others keep at least one block.
    counts = np.where(sizes < multiple, sizes, np.clip(counts, multiple, sizes))
    return WidthConfig(kind, tuple(int(c) for c in counts))


def sample_configs(group_sizes: Sequence[int], n: int, seed: int = 0, min_ratio: float = 0.1) -> list[WidthConfig]:
    """The first `n` distinct configurations for groups of `group_sizes` (the first one is the dense model)."""
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
    sizes = np.asarray(group_sizes, dtype=np.int64)
    if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 1).any():
        raise ValueError("group sizes must be a non-empty list of positive integers")
    seen: set[tuple[int, ...]] = set()
    out = []
    for i in range(n):
        for attempt in range(50):
            config = _config(i, sizes, seed, min_ratio, attempt)
            if config.keep_counts not in seen:
                break
        else:  # tiny architectures have few distinct configurations
            continue
        seen.add(config.keep_counts)
        out.append(config)
    return out
