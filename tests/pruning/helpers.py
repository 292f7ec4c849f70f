"""Helpers the method tests share: tiny architecture setups and a cancellation that stops a run part way."""

from __future__ import annotations

import torch

from pruning import zoo
from pruning.cost import CostModel
from pruning.groups import ChannelGraph


def arch_setup(arch: str, resolution: int):  # noqa: ANN201 - () -> (model, graph, cost model)
    """A setup for method_context-style helpers: `arch` with 4 classes at `resolution`, seeded."""
    def setup():  # noqa: ANN202
        torch.manual_seed(0)
        model = zoo.build_model(arch, 4, 3).eval()
        graph = ChannelGraph.build(model, (1, 3, resolution, resolution))
        return model, graph, CostModel(graph)
    return setup


class CancelAfter:
    """should_cancel: False for the first `steps` calls (train asks before every step), then True."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.steps
