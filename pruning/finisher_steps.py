"""The finisher's steps on channel masks, each a pure function tested on its own: grow and round by importance,
interpolate between two measured configurations, cap groups at a latency cliff, and the aims (scaled, secant)
the measured-latency search moves to. A Probe is one measured configuration."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pruning.allocation import largest_true, mask_counts, masks_from_counts, ranked_values, round_counts

Masks = list[torch.Tensor]
Fits = Callable[[list[int]], bool]


@dataclass
class Probe:
    """One measured configuration: its masks, predicted and measured ms, and its entry in the fit's report."""

    masks: Masks
    predicted: float
    measured: float
    entry: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> list[int]:
        return mask_counts(self.masks)


def grow_masks(scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor], fits: Fits,
               normalize: bool = True, caps: dict[int, int] | None = None) -> tuple[Masks, int]:
    """Add back the most important removed channels while the cost still fits, no group past its count in
    `caps`, then each later one that still fits; (masks, channels added)."""
    masks = [m.clone().bool() for m in keep_masks]
    values = ranked_values(scores, normalize)
    removed = sorted(((-float(values[g][c]), g, c) for g, m in enumerate(masks)
                      for c in torch.nonzero(~m).flatten().tolist()))
    room = {g: max(0, cap - int(masks[g].sum())) for g, cap in (caps or {}).items()}
    order = []
    for _, g, c in removed:
        if g in room:
            if room[g] == 0:
                continue
            room[g] -= 1
        order.append((g, c))

    def after(k: int) -> Masks:
        out = [m.clone() for m in masks]
        for g, c in order[:k]:
            out[g][c] = True
        return out

    if not fits(mask_counts(masks)):
        return masks, 0
    k = largest_true(len(order), lambda j: fits(mask_counts(after(j))))
    grown = after(k)
    # (ours) A learned predictor can jump at one count, and a prefix stops at the first channel that does not fit,
    # which can leave most of the budget unused; the channels after it are still tried, in order, each kept if
    # it fits.
    counts = mask_counts(grown)
    added = k
    for g, c in order[k + 1:]:
        counts[g] += 1
        if fits(counts):
            grown[g][c] = True
            added += 1
        else:
            counts[g] -= 1
    return grown, added


def round_masks(scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor], multiple: int, fits: Fits,
                sizes: Sequence[int]) -> Masks:
    """Masks with counts rounded to `multiple`: to the nearest multiple if that fits, else down (unchanged if
    neither fits)."""
    counts = mask_counts(keep_masks)
    for mode in ("nearest", "down"):
        candidate = round_counts(counts, sizes, multiple, mode)
        if fits(candidate):
            return masks_from_counts(scores, candidate)
    return [m.clone().bool() for m in keep_masks]


def between_masks(scores: Sequence[torch.Tensor], start: Sequence[torch.Tensor], end: Sequence[torch.Tensor],
                  share: float, multiple: int = 1) -> Masks:
    """Masks `share` (0..1) of the way from `start` to `end` in kept counts: channels both keep come first, then
    those one of them keeps, each by score; with `multiple` 1 the total is the nearest whole count (the groups
    nearest their next channel get it), else each group is rounded to `multiple` where that stays between."""
    share = min(max(float(share), 0.0), 1.0)
    spans = [(int(a.sum()), int(b.sum())) for a, b in zip(start, end, strict=True)]
    exact = [a + share * (b - a) for a, b in spans]
    if multiple > 1:
        counts = []
        for (a, b), count in zip(spans, exact, strict=True):
            rounded = multiple * math.floor(count / multiple + 0.5)
            counts.append(rounded if min(a, b) <= rounded <= max(a, b) else math.floor(count + 0.5))
    else:
        # Rounding every group on its own can move all of them at once, or none: a step from 19 kept channels
        # to 24 went to 21, skipping the 20 that fit.
        counts = [math.floor(x) for x in exact]
        extra = math.floor(sum(exact) + 0.5) - sum(counts)
        for g in sorted(range(len(exact)), key=lambda g: exact[g] - counts[g], reverse=True)[:max(0, extra)]:
            counts[g] += 1
    out = []
    for score, a, b, count in zip(scores, start, end, counts, strict=True):
        # Rank by membership (kept by both > by one > by neither), ties by score.
        values = score.detach().float()
        spread = float(values.max() - values.min()) + 1.0
        rank = values - values.min() + spread * (a.bool().float() + b.bool().float())
        mask = torch.zeros(len(score), dtype=torch.bool)
        mask[torch.topk(rank, max(1, int(count))).indices] = True
        out.append(mask)
    return out


def capped_masks(scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor], caps: dict[int, int]) -> Masks:
    """Masks with every group in `caps` cut to at most that many kept channels, its best-scored kept ones."""
    out = []
    for g, (score, mask) in enumerate(zip(scores, keep_masks, strict=True)):
        mask = mask.clone().bool()
        cap = caps.get(g)
        if cap is not None and int(mask.sum()) > cap:
            values = torch.where(mask, score.detach().float(), torch.full_like(score.detach().float(), -math.inf))
            mask = torch.zeros_like(mask)
            mask[torch.topk(values, max(1, cap)).indices] = True
        out.append(mask)
    return out


def cliff_caps(probes: Sequence[Probe], limit: float, low: float, factor: float = 3.0,
               max_step: float = 0.1) -> tuple[Probe, dict[int, int]] | None:
    """(start, caps) where the slowest configuration within `limit` reads under `low` and growing it by at most
    `max_step` of its kept channels into a configuration over `limit` cost more than `factor` times the expected
    step (the predicted one scaled by the start's measured/predicted ratio, or the start's latency per kept
    channel, whichever is larger): a latency cliff. caps holds the start's counts of the groups that grew."""
    feasible = [p for p in probes if p.measured <= limit]
    if not feasible:
        return None
    start = max(feasible, key=lambda p: p.measured)
    if start.measured >= low:
        return None
    base = start.counts
    scale = start.measured / max(start.predicted, 1e-12)
    caps: dict[int, int] = {}
    for probe in probes:
        counts, predicted, measured = probe.counts, probe.predicted, probe.measured
        if measured <= limit or any(c < b for c, b in zip(counts, base, strict=True)):
            continue
        if sum(counts) - sum(base) > max_step * sum(base):
            continue  # a wide step: the bracket's interpolation can still find its inside
        # Either estimate alone misreads a smooth device: a predictor flat over a range of widths predicts no
        # step at all, and latency in proportion to the kept channels under-counts convolutions' growth.
        step_ms = max(max(predicted - start.predicted, 0.0) * scale,
                      start.measured * (sum(counts) - sum(base)) / max(sum(base), 1))
        if measured - start.measured > factor * step_ms:
            caps.update({g: b for g, (c, b) in enumerate(zip(counts, base, strict=True)) if c > b})
    return (start, caps) if caps else None


def brackets_from_below(probes: Sequence[Probe], limit: float, low: float) -> bool:
    """Whether some measured configuration is over `limit` and the slowest one within it is under `low`."""
    feasible = [p.measured for p in probes if p.measured <= limit]
    return bool(feasible) and max(feasible) < low and any(p.measured > limit for p in probes)


def tried(candidate: Masks, probes: Sequence[Probe]) -> bool:
    """Whether a configuration with `candidate`'s counts was measured already."""
    counts = mask_counts(candidate)
    return any(counts == p.counts for p in probes)


def scaled_aim(predicted: float, measured: float, target: float) -> float:
    """The predicted cost to aim for when only the current configuration is known: scaled by target/measured."""
    return predicted * target / measured


def secant_aim(feasible: Probe, too_slow: Probe, target: float) -> float | None:
    """The predicted cost between a configuration measured within the limit and one over it where the line
    through their (predicted, measured) points meets the target; None when they do not bracket it."""
    lo, hi = feasible, too_slow
    if not (hi.predicted > lo.predicted and hi.measured > lo.measured):
        return None
    aim = lo.predicted + (hi.predicted - lo.predicted) * (target - lo.measured) / (hi.measured - lo.measured)
    return min(max(aim, lo.predicted), hi.predicted - 1e-9 * hi.predicted)
