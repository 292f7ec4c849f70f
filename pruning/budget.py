"""Budgets (FLOPs, MACs, params, latency) as hard and differentiable costs, and allocation to a budget."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from pruning.cost import CostModel

BudgetKind = Literal["flops", "macs", "params", "latency_ms"]
BUDGET_KINDS: tuple[str, ...] = ("flops", "macs", "params", "latency_ms")
BUDGET_FORMS = "flops=0.5 (fraction of dense MACs), macs=2e7, params=0.5 (fraction of dense params), " \
               "latency_ms=3.5@DEVICE"


class BudgetError(ValueError):
    """A budget that cannot be parsed or cannot be met."""


@dataclass(frozen=True)
class Budget:
    """What the pruned model must fit: kind, value (fraction or absolute), device for latency."""

    kind: BudgetKind
    value: float
    device: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, got {self.kind!r}")
        if not self.value > 0:
            raise BudgetError(f"budget value must be positive, got {self.value}")
        if self.kind in ("flops", "params") and self.value > 1:
            raise BudgetError(f"{self.kind}= is a fraction of the dense model in (0, 1], got {self.value}")
        if self.kind == "latency_ms" and not self.device:
            raise BudgetError("a latency budget needs a device: latency_ms=3.5@DEVICE")

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}" + (f"@{self.device}" if self.device else "")


def parse_budget(text: str) -> Budget:
    """Parse `flops=0.5`, `macs=2e7`, `params=0.3` or `latency_ms=3.5@device`."""
    match = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*(?:@\s*([\w.-]+))?\s*", text or "")
    if not match:
        raise BudgetError(f"cannot parse budget {text!r}; accepted forms: {BUDGET_FORMS}")
    kind, value, device = match.groups()
    try:
        number = float(value)
    except ValueError:
        raise BudgetError(f"budget value {value!r} is not a number; accepted forms: {BUDGET_FORMS}") from None
    if kind not in BUDGET_KINDS:
        raise BudgetError(f"unknown budget kind {kind!r}; accepted forms: {BUDGET_FORMS}")
    return Budget(kind, number, device)  # type: ignore[arg-type]


class LatencyPredictor(Protocol):
    """What the engine needs from a device's latency model."""

    def predict_ms(self, keep_ratios: torch.Tensor) -> torch.Tensor: ...

    def measure_ms(self, onnx_path: str) -> float: ...


class BudgetCost:
    """A budget's cost of a channel configuration: `hard` on integer counts, `soft` differentiable."""

    def __init__(self, budget: Budget, cost_model: CostModel, latency: LatencyPredictor | None = None):
        self.budget = budget
        self.cost_model = cost_model
        self.latency = latency
        if budget.kind == "latency_ms":
            if latency is None:
                raise BudgetError(f"budget {budget} needs the latency predictor of device {budget.device!r}")
            self.unit, self.target = "ms", float(budget.value)
        elif budget.kind == "macs":
            self.unit, self.target = "macs", float(budget.value)
        else:
            base = "params" if budget.kind == "params" else "macs"
            self.unit, self.target = base, float(budget.value) * cost_model.dense(base)

    def soft(self, keep_counts: torch.Tensor) -> torch.Tensor:
        """Differentiable cost of (soft) keep counts, in the budget's unit."""
        if self.latency is not None and self.budget.kind == "latency_ms":
            sizes = self.cost_model.group_sizes.to(keep_counts.device, torch.float32)
            return self.latency.predict_ms((keep_counts.float() / sizes).unsqueeze(0)).squeeze(0)
        return self.cost_model.cost("params" if self.unit == "params" else "macs", keep_counts)

    def hard(self, keep_counts: Sequence[int]) -> float:
        """Cost of integer keep counts."""
        with torch.no_grad():
            return float(self.soft(torch.as_tensor([float(c) for c in keep_counts], dtype=torch.float64)))

    def dense(self) -> float:
        """Cost of the unpruned model."""
        return self.hard([int(s) for s in self.cost_model.group_sizes.tolist()])

    def fits(self, keep_counts: Sequence[int]) -> bool:
        return self.hard(keep_counts) <= self.target


def global_ranking(scores: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(group, channel) pairs from most to least important; every group's best channel comes first."""
    best = [(g, int(torch.argmax(s))) for g, s in enumerate(scores)]
    taken = set(best)
    rest = [(float(s[c]), g, c) for g, s in enumerate(scores) for c in range(len(s)) if (g, c) not in taken]
    rest.sort(key=lambda t: -t[0])
    return best + [(g, c) for _, g, c in rest]


def counts_from_prefix(ranking: Sequence[tuple[int, int]], n_groups: int, k: int) -> list[int]:
    """Per-group kept counts when the first `k` channels of `ranking` are kept."""
    counts = [0] * n_groups
    for g, _ in ranking[:k]:
        counts[g] += 1
    return counts


def fit_ranking(ranking: Sequence[tuple[int, int]], n_groups: int, fits: Callable[[list[int]], bool],
                round_to: Callable[[list[int]], list[int]] | None = None) -> list[int]:
    """Largest prefix of `ranking` whose (rounded) counts fit; bisection, cost being monotone in the prefix."""
    def counts(k: int) -> list[int]:
        c = counts_from_prefix(ranking, n_groups, k)
        return round_to(c) if round_to else c

    lo, hi = n_groups, len(ranking)
    if not fits(counts(lo)):
        if round_to is not None:
            raise BudgetError(f"the budget is below the cost of the smallest rounded configuration {counts(lo)} "
                              "(one channel per group, rounded up to the channel multiple); raise the budget or "
                              "lower round_to")
        raise BudgetError("the budget is below the cost of keeping one channel per group; raise it")
    if fits(counts(hi)):
        return counts(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(counts(mid)) else (lo, mid)
    return counts(lo)


def normalized_scores(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scores divided by their group's mean, so groups of different scale rank together."""
    return [s.detach().float() / s.detach().float().mean().clamp_min(1e-12) for s in scores]


def trim_to_budget(scores: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor],
                   fits: Callable[[list[int]], bool]) -> tuple[list[torch.Tensor], int]:
    """Exact-budget finisher: drop the globally least important kept channels until the cost fits."""
    masks = [m.clone().bool() for m in keep_masks]
    counts = [int(m.sum()) for m in masks]
    if fits(counts):
        return masks, 0
    norm = normalized_scores(scores)
    kept = [(float(norm[g][c]), g, c) for g, m in enumerate(masks) for c in torch.nonzero(m).flatten().tolist()]
    kept.sort()
    # Bisection over how many of the weakest channels to drop (cost is monotone in it).
    droppable = [(g, c) for _, g, c in kept]

    def after(k: int) -> list[torch.Tensor]:
        out = [m.clone() for m in masks]
        left = [int(m.sum()) for m in out]
        for g, c in droppable[:k]:
            if left[g] > 1:
                out[g][c] = False
                left[g] -= 1
        return out

    lo, hi = 0, len(droppable)
    if not fits([int(m.sum()) for m in after(hi)]):
        raise BudgetError("the budget is below the cost of keeping one channel per group; raise it")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits([int(m.sum()) for m in after(mid)]) else (mid, hi)
    final = after(hi)
    return final, sum(int(a.sum()) - int(b.sum()) for a, b in zip(masks, final, strict=True))
