"""Engine fixtures: every zoo architecture the engine is tested on, built once per session."""

from __future__ import annotations

import functools

import pytest
import torch

from pruning import zoo
from pruning.cost import CostModel
from pruning.groups import ChannelGraph

ARCH_CASES = [
    ("resnet20", 32),
    ("resnet56", 32),
    ("vgg16_bn", 32),
    ("resnet18", 64),
    ("mobilenet_v2", 64),
    ("efficientnet_b0", 64),  # squeeze-excitation + depthwise + SiLU: a third torchvision family
]


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics so a wrong surgery cannot hide behind identity BNs; gammas < 1 keep logits O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.4 + 0.1)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


@functools.cache
def _built(arch: str, resolution: int):
    torch.manual_seed(0)
    model = zoo.build_model(arch, num_classes=10, in_channels=3).eval()
    randomize_norms(model)
    graph = ChannelGraph.build(model, (1, 3, resolution, resolution))
    return model, graph, CostModel(graph)


@pytest.fixture(params=ARCH_CASES, ids=[a for a, _ in ARCH_CASES])
def engine_case(request):
    arch, resolution = request.param
    model, graph, cost = _built(arch, resolution)
    return arch, resolution, model, graph, cost


@pytest.fixture
def built():
    return _built
