"""Regularizers: a method's extra loss term with a schedule that survives a resumed job.

A method that only adds a term to the training loss (a growing penalty, an annealed temperature, a dual variable)
subclasses Regularizer and hands it to pruning.train.train(regularizer=...): `penalty` is added to the task loss
every step, `after_step` advances the schedule after the optimizer step, and `state_dict` is saved in the training
checkpoint, so a job killed mid-training continues the schedule where it stopped instead of restarting it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Regularizer:
    """Base class: no penalty, no schedule. Subclasses override what they use.

    State that changes during training lives in attributes named in `state_fields` (numbers, strings, lists,
    dicts of those, or tensors): the default state_dict/load_state_dict checkpoint exactly those.
    """

    state_fields: tuple[str, ...] = ()

    def penalty(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """The term added to the loss at global step `step` (0-based, before the optimizer step); None: nothing."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer step `step` (1-based count of steps done), e.g. to advance a schedule."""

    def state_dict(self) -> dict[str, Any]:
        return {name: _detached(getattr(self, name)) for name in self.state_fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.state_fields) - set(state)
        if missing:
            raise ValueError(f"regularizer state lacks {sorted(missing)}")
        for name in self.state_fields:
            current = getattr(self, name)
            if isinstance(current, torch.Tensor):
                with torch.no_grad():
                    current.copy_(state[name])
            else:
                setattr(self, name, state[name])


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value
