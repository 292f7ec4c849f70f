"""The method plug-in API: what a method receives, what it returns, and the parts it is built from.

A channel-pruning method is one module with `run(ctx: MethodContext) -> Selection`, registered with its params
by `@register_method` in a torch-free `<name>_params.py` next to it (see pruning.registry and docs/engine.md,
"Adding a method"). It scores channels with an Importance, may train with a Regularizer
(pruning.train.train(regularizer=...)), allocates to the budget with pruning.allocation, and returns a Selection;
the pipeline's stages (dense, select, finish, fine-tune, verify on device, export) do the rest, the same for every
method. A cohort method (many subnets from one training) implements CohortMethod instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from pruning.budget import BudgetCost
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.importance import (
    BNScaleImportance,
    GroupNormImportance,
    Importance,
    L1Importance,
    L2Importance,
)
from pruning.registry import CohortParams, MethodParams
from pruning.regularizer import Regularizer

__all__ = ["BNScaleImportance", "CohortContext", "CohortMethod", "CohortResult", "GroupNormImportance", "Importance",
           "L1Importance", "L2Importance", "MemberSpec", "MethodContext", "NotApplicable", "Regularizer", "Selection"]

Masks = list[torch.Tensor]
# How a Selection's scores compare across groups: "per_group" (each group on its own scale: the finisher divides
# by the group's mean before ranking globally) or "global" (one scale for all groups, e.g. gate scores against a
# common threshold: ranked as they are).
ScoreScale = Literal["per_group", "global"]


class NotApplicable(ValueError):
    """The method cannot prune this architecture; the message says why in one line (raised by a method module's
    `check(model, graph, params)` before any training)."""


@dataclass
class MethodContext:
    """Everything a method may use: the trained dense model, its groups, the budget, data and training knobs."""

    model: nn.Module
    graph: ChannelGraph
    cost_model: CostModel
    budget: BudgetCost
    params: MethodParams
    train_loader: DataLoader
    val_loader: DataLoader
    device: torch.device
    epochs: int
    lr: float
    seed: int = 0
    progress: Callable[[dict], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    checkpoint_dir: Path | None = None


@dataclass(frozen=True)
class Selection:
    """A method's choice: which channels of each group to keep and how the finisher may change it.

    model: the network the masks apply to (the dense one, or the method's trained copy);
    keep_masks / scores: per group, a bool mask and the importance of every channel (the finisher trims the
    lowest and grows back the highest);
    score_scale: how scores compare across groups (see ScoreScale);
    round_to: the channel multiple the finisher should round kept counts to where it measures faster (1: none);
    scales: per group, a per-channel scale to fold into the next layer at materialization (None: no scales);
    info: what the method reports (JSON-serializable), shown in report.json under method_info.
    """

    model: nn.Module
    keep_masks: tuple[torch.Tensor, ...]
    scores: tuple[torch.Tensor, ...]
    score_scale: ScoreScale = "per_group"
    round_to: int = 1
    scales: tuple[torch.Tensor | None, ...] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_masks", tuple(self.keep_masks))
        object.__setattr__(self, "scores", tuple(self.scores))
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(self.scales))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))
        if len(self.keep_masks) != len(self.scores):
            raise ValueError(f"{len(self.keep_masks)} masks but {len(self.scores)} score vectors")
        if self.score_scale not in ("per_group", "global"):
            raise ValueError(f"score_scale must be 'per_group' or 'global', got {self.score_scale!r}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")

    @property
    def normalize_scores(self) -> bool:
        """Whether the finisher divides each group's scores by their mean before ranking them together."""
        return self.score_scale == "per_group"

    @property
    def keep_counts(self) -> list[int]:
        return [int(m.sum()) for m in self.keep_masks]


# ---- cohort methods ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemberSpec:
    """A cohort member before its structure is known: a budget (in the cohort's budget kind) at a resolution."""

    id: int
    kind: str  # flops | macs | params | latency_ms
    value: float
    resolution: int
    device: str | None = None

    @property
    def name(self) -> str:
        """Human-readable label, e.g. flops=0.5@24px."""
        where = f"@{self.device}" if self.device else ""
        return f"{self.kind}={self.value:g}{where}@{self.resolution}px"


@dataclass
class CohortContext:
    """What a cohort method needs: the model, one channel graph per resolution, the members and their costs."""

    model: nn.Module
    graphs: dict[int, ChannelGraph]  # one per resolution: groups are shared, spatial sizes are not
    cost_models: dict[int, CostModel]
    members: list[MemberSpec]
    budget_costs: list[BudgetCost]  # aligned with members, each at its member's resolution
    params: CohortParams
    train_loader: DataLoader  # batches at `train_resolution`, resized per member
    train_resolution: int
    device: torch.device
    search_epochs: int
    joint_epochs: int
    lr: float
    joint_lr: float
    seed: int = 0
    progress: Callable[[dict], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    checkpoint_dir: Path | None = None


@dataclass
class CohortResult:
    """The trained shared network and every member's keep masks (aligned with CohortContext.members)."""

    model: nn.Module
    structures: list[Masks]
    info: dict[str, Any] = field(default_factory=dict)


class CohortMethod(Protocol):
    """A cohort method's run function: pruning.cohort plans the members, calls it, then materializes,
    recalibrates and exports every member (the method's params subclass pruning.registry.CohortParams)."""

    def __call__(self, ctx: CohortContext) -> CohortResult: ...

