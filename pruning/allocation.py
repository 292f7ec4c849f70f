"""Allocating channels to a budget: rankings, the one bisection, trimming, rounding.

Every method and the finisher allocate through these: a ranking orders (group, channel) pairs from most to least
important, `fit_ranking` keeps the longest prefix that fits, `trim_masks` drops the weakest kept channels until a
configuration fits, `bisect_scalar` finds a threshold or ratio on a continuous axis. Costs are monotone in the
prefix length (or threshold), which is what makes one bisection enough.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from pruning.budget import BudgetError

Masks = list[torch.Tensor]
Fits = Callable[[list[int]], bool]
Ranking = list[tuple[int, int]]


def largest_true(n: int, ok: Callable[[int], bool]) -> int:
    """Largest k in [0, n] with ok(k), given ok(0) and ok monotone (true, then false)."""
    lo, hi = 0, n
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def bisect_scalar(ok: Callable[[float], bool], lo: float, hi: float, iterations: int = 40) -> float:
    """The boundary between `lo` (ok) and `hi` (not ok) to `iterations` halvings; returns the ok side. Works in
    either direction (lo > hi is allowed)."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def normalized_scores(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scores divided by their group's mean, so groups of different scale rank together."""
    return [s.detach().float() / s.detach().float().mean().clamp_min(1e-12) for s in scores]


def ranked_values(scores: Sequence[torch.Tensor], normalize: bool) -> list[torch.Tensor]:
    """The values a global ranking compares: normalized per group, or as they are (scores on one scale)."""
    return normalized_scores(scores) if normalize else [s.detach().float() for s in scores]


def global_ranking(scores: Sequence[torch.Tensor]) -> Ranking:
    """(group, channel) pairs from most to least important; every group's best channel comes first."""
    best = [(g, int(torch.argmax(s))) for g, s in enumerate(scores)]
    taken = set(best)
    rest = [(float(s[c]), g, c) for g, s in enumerate(scores) for c in range(len(s)) if (g, c) not in taken]
    rest.sort(key=lambda t: -t[0])
    return best + [(g, c) for _, g, c in rest]


def uniform_ranking(scores: Sequence[torch.Tensor], sizes: Sequence[int]) -> Ranking:
    """Channel order keeping about the same fraction of every group at every prefix (each group's best first)."""
    first, order = [], []
    for g, s in enumerate(scores):
        ranked = s.argsort(descending=True).tolist()
        first.append((g, ranked[0]))
        order += [((i + 0.5) / sizes[g], g, c) for i, c in enumerate(ranked[1:], start=1)]
    order.sort()
    return first + [(g, c) for _, g, c in order]


def counts_from_prefix(ranking: Sequence[tuple[int, int]], n_groups: int, k: int) -> list[int]:
    """Per-group kept counts when the first `k` channels of `ranking` are kept."""
    counts = [0] * n_groups
    for g, _ in ranking[:k]:
        counts[g] += 1
    return counts


def fit_ranking(ranking: Sequence[tuple[int, int]], n_groups: int, fits: Fits,
                round_to: Callable[[list[int]], list[int]] | None = None) -> list[int]:
    """Counts of the largest prefix of `ranking` whose (rounded) counts fit."""
    def counts(k: int) -> list[int]:
        c = counts_from_prefix(ranking, n_groups, k)
        return round_to(c) if round_to else c

    if not fits(counts(n_groups)):
        if round_to is not None:
            raise BudgetError(f"the budget is below the cost of the smallest rounded configuration "
                                  f"{counts(n_groups)} (one channel per group, rounded up to the channel multiple); "
                                  "raise the budget or lower round_to")
        raise BudgetError("the budget is below the cost of keeping one channel per group; raise it")
    extra = largest_true(len(ranking) - n_groups, lambda j: fits(counts(n_groups + j)))
    return counts(n_groups + extra)


def masks_from_counts(scores: Sequence[torch.Tensor], keep_counts: Sequence[int]) -> Masks:
    """Keep the `keep_counts[g]` highest-scoring channels of every group."""
    masks = []
    for score, count in zip(scores, keep_counts, strict=True):
        mask = torch.zeros(len(score), dtype=torch.bool)
        mask[torch.topk(score.detach().float(), int(count)).indices] = True
        masks.append(mask)
    return masks


def mask_counts(masks: Sequence[torch.Tensor]) -> list[int]:
    return [int(m.sum()) for m in masks]


def trim_masks(scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor], fits: Fits,
               normalize: bool = True) -> tuple[Masks, int]:
    """Drop the least important kept channels (>= 1 per group) until the cost fits; (masks, channels removed).

    `normalize`: rank scores divided by their group's mean; False ranks them as they are, for methods whose scores
    share one scale across groups (gate scores with a common threshold).
    """
    masks = [m.clone().bool() for m in keep_masks]
    if fits(mask_counts(masks)):
        return masks, 0
    values = ranked_values(scores, normalize)
    kept = sorted((float(values[g][c]), g, c) for g, m in enumerate(masks) for c in torch.nonzero(m).flatten().tolist())
    order = [(g, c) for _, g, c in kept]

    def after(k: int) -> Masks:
        out = [m.clone() for m in masks]
        left = mask_counts(out)
        for g, c in order[:k]:
            if left[g] > 1:
                out[g][c] = False
                left[g] -= 1
        return out

    if not fits(mask_counts(after(len(order)))):
        raise BudgetError("the budget is below the cost of keeping one channel per group; raise it")
    # Smallest k that fits = one more than the largest k that does not (cost is monotone in k).
    k = largest_true(len(order), lambda j: not fits(mask_counts(after(j)))) + 1
    final = after(k)
    return final, sum(mask_counts(masks)) - sum(mask_counts(final))


def round_counts(keep_counts: Sequence[int], sizes: Sequence[int], multiple: int, mode: str = "nearest") -> list[int]:
    """Counts rounded to multiples of `multiple` ('nearest' or 'down'), within [min(multiple, size), size]."""
    if multiple <= 1:
        return [int(c) for c in keep_counts]
    out = []
    for count, size in zip(keep_counts, sizes, strict=True):
        step = count / multiple
        units = math.floor(step + 0.5) if mode == "nearest" else math.floor(step)
        out.append(int(min(size, max(min(multiple, size), units * multiple))))
    return out


def fit_scores(scores: Sequence[torch.Tensor], sizes: Sequence[int], fits: Fits, round_to: int = 1,
               allocation: str = "global") -> list[int]:
    """Counts of the most important channels that fit, ranked globally (scores on one scale: normalize first) or
    uniformly (the same share of every group), rounded to multiples of `round_to`."""
    ranking = global_ranking(scores) if allocation == "global" else uniform_ranking(scores, sizes)

    def rounded(counts: list[int]) -> list[int]:
        return round_counts(counts, sizes, round_to)

    counts = fit_ranking(ranking, len(sizes), fits, rounded if round_to > 1 else None)
    if not fits(counts):
        raise BudgetError(f"no configuration rounded to multiples of {round_to} fits the budget")
    return counts
