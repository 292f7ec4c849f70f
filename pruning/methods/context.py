"""What a method receives from the pipeline and what it hands back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pruning.budget import BudgetCost
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.registry import MethodParams


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


@dataclass
class MethodResult:
    """The method's choice: which channels of each group to keep, their importance, optional scales to fold."""

    model: nn.Module
    keep_masks: list[torch.Tensor]
    scores: list[torch.Tensor]
    scales: list[torch.Tensor | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)
