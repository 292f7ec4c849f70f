"""Per-channel importance scores of every group, from the weights of the layers that produce it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from pruning.groups import ChannelGraph


@torch.no_grad()
def producer_scores(model: nn.Module, graph: ChannelGraph,
                    per_filter: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Per-channel scores of every group: `per_filter` of each producing layer's filters ([out, fan-in] -> [out]),
    each layer normalised by its mean, summed over the group's producers."""
    scores = []
    for group in graph.groups:
        total = torch.zeros(group.size)
        for share in group.out_layers:
            if share.channels != group.size:
                continue
            values = per_filter(model.get_submodule(share.layer).weight.detach().float().cpu().flatten(1))
            total += values / values.mean().clamp_min(1e-12)
        scores.append(total)
    return scores


def group_weight_norms(model: nn.Module, graph: ChannelGraph, p: int = 1) -> list[torch.Tensor]:
    """Per-channel L`p` norm of each group's producing filters, each layer normalised by its mean, summed."""
    return producer_scores(model, graph, lambda weight: weight.norm(p=p, dim=1))


def fpgm_scores(model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
    """FPGM (He et al., 2019): a filter's summed distance to the layer's other filters; the filters nearest the
    geometric median are the most replaceable. Each layer normalised by its mean, summed over the producers."""
    return producer_scores(model, graph, lambda weight: torch.cdist(weight, weight).sum(dim=1))


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


class Importance(Protocol):
    """(model, graph) -> one score tensor per group (higher: more important), as Torch-Pruning's Importance."""

    def __call__(self, model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]: ...


class L1Importance:
    """Per-channel L1 norm of the producing filters, each layer normalised by its mean (Li et al.)."""

    def __call__(self, model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
        return group_weight_norms(model, graph, p=1)


class L2Importance:
    """Per-channel L2 norm of the producing filters, each layer normalised by its mean."""

    def __call__(self, model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
        return group_weight_norms(model, graph, p=2)


class BNScaleImportance:
    """Mean |BN gamma| over the BNs a group's mask acts on (network slimming); filter L1 for groups without BN."""

    def __call__(self, model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
        return group_bn_gammas(model, graph)


class GroupNormImportance:
    """DepGraph's group norm: the L2 norm of every parameter slice coupled to a channel (producers, consumers,
    norms), through torch-pruning's GroupMagnitudeImportance(p=2); normalised per group by its mean, so scores
    compare across groups as they are."""

    @torch.no_grad()
    def __call__(self, model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
        import torch_pruning as tp

        legacy = getattr(tp.importance, "GroupNormImportance", None)
        importance = legacy() if legacy is not None else tp.importance.GroupMagnitudeImportance(p=2)
        dg = graph.dependency_graph(model)
        scores = []
        for group in graph.groups:
            root = model.get_submodule(group.root)
            tp_group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels,
                                            idxs=list(range(group.size)))
            scores.append(importance(tp_group).detach().float().cpu())
        return scores
