"""Per-channel importance scores of every group, from the weights of the layers that produce it."""

from __future__ import annotations

import torch
from torch import nn

from pruning.groups import ChannelGraph


@torch.no_grad()
def group_weight_norms(model: nn.Module, graph: ChannelGraph, p: int = 1) -> list[torch.Tensor]:
    """Per-channel L`p` norm of each group's producing filters, each layer normalised by its mean, summed."""
    scores = []
    for group in graph.groups:
        total = torch.zeros(group.size)
        for share in group.out_layers:
            if share.channels != group.size:
                continue
            weight = model.get_submodule(share.layer).weight.detach().float().cpu()
            norms = weight.flatten(1).norm(p=p, dim=1)
            total += norms / norms.mean().clamp_min(1e-12)
        scores.append(total)
    return scores


@torch.no_grad()
def group_bn_gammas(model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
    """Per-channel |BN gamma| of each group (summed over its BNs that follow a producer); L1 if it has none."""
    fallback = group_weight_norms(model, graph)
    scores = []
    for group, default in zip(graph.groups, fallback, strict=True):
        total = torch.zeros(group.size)
        for name in group.scale_layers:
            layer = model.get_submodule(name)
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.weight.numel() == group.size:
                total += layer.weight.detach().abs().float().cpu()
        scores.append(total if bool(total.any()) else default)
    return scores
