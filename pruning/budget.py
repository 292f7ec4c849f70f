"""Budgets (FLOPs, MACs, params, latency) as hard and differentiable costs (allocation: pruning.allocation)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pruning.cost import CostModel
from pruning.oracle import DeviceOracle

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


class BudgetCost:
    """A budget's cost of a channel configuration: `hard` on integer counts, `soft` differentiable."""

    def __init__(self, budget: Budget, cost_model: CostModel, latency: DeviceOracle | None = None):
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
