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
    """Per-channel mean |BN gamma| over the BNs where each group's mask acts (filter L1 for a group without BN)."""
    fallback = group_weight_norms(model, graph)
    scores = []
    for group, default in zip(graph.groups, fallback, strict=True):
        total, count = torch.zeros(group.size), 0
        for name in group.scale_layers:
            layer = model.get_submodule(name)
            is_norm = isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine
            if is_norm and layer.weight.numel() == group.size:
                total += layer.weight.detach().abs().float().cpu()
                count += 1
        # A mean, not a sum: residual groups span several BNs and would otherwise always win the global threshold.
        scores.append(total / count if count else default)
    return scores
