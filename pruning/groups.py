"""Coupled channel groups, from torch-pruning's DependencyGraph, described by module names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

PRUNE_OUT = "prune_out_channels"
PRUNE_IN = "prune_in_channels"


@dataclass(frozen=True)
class LayerShare:
    """How many of a layer's channels one group governs (len(idxs); >size after a flatten)."""

    layer: str
    channels: int


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together (a conv's outputs, its BN, the consumers' inputs)."""

    index: int
    root: str
    size: int
    out_layers: list[LayerShare] = field(default_factory=list)
    in_layers: list[LayerShare] = field(default_factory=list)
    norm_layers: list[LayerShare] = field(default_factory=list)
    # Where a per-channel scale (gate, mask) acts: each producer's directly following BN, else the producer.
    scale_layers: list[str] = field(default_factory=list)

    @property
    def out_layer_names(self) -> list[str]:
        return [s.layer for s in self.out_layers]


def is_depthwise(conv: nn.Conv2d) -> bool:
    """A conv whose groups equal its input channels (its inputs shrink with its outputs)."""
    return conv.groups > 1 and conv.groups == conv.in_channels


def find_classifier(model: nn.Module) -> str:
    """Name of the final classifier layer (the last Linear, else the last conv), never pruned."""
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if last_linear:
        return last_linear[-1]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]


class ChannelGraph:
    """The prunable channel groups of a model at a given input shape, with per-layer spatial sizes."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], groups: list[ChannelGroup],
                 output_hw: dict[str, tuple[int, int]], ignored: list[str]):
        self.model = model
        self.input_shape = tuple(input_shape)
        self.groups = groups
        self.output_hw = output_hw
        self.ignored = ignored

    @classmethod
    def build(cls, model: nn.Module, input_shape: Sequence[int], ignored: Sequence[str] = ()) -> ChannelGraph:
        """Trace `model` once at `input_shape` and list its prunable groups in module order."""
        names = {m: n for n, m in model.named_modules()}
        ignored_names = [find_classifier(model), *ignored]
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        example = torch.randn(*input_shape, device=device)
        output_hw = _output_sizes(model, example)
        with torch.enable_grad():  # torch-pruning traces through autograd
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        raw = dg.get_all_groups(ignored_layers=[model.get_submodule(n) for n in ignored_names],
                                root_module_types=[nn.Conv2d, nn.Linear])
        order = {n: i for i, n in enumerate(names.values())}
        groups = []
        for g in raw:
            root = names[g[0].dep.target.module]
            size = len(g[0].idxs)
            out_layers, in_layers, norms = [], [], []
            for item in g:
                dep, module = item.dep, item.dep.target.module
                if module not in names:
                    continue
                handler = getattr(dep.handler, "__name__", "")
                if isinstance(module, nn.Conv2d | nn.Linear):
                    if handler == PRUNE_OUT:
                        out_layers.append(LayerShare(names[module], len(item.idxs)))
                    elif handler == PRUNE_IN:
                        in_layers.append(LayerShare(names[module], len(item.idxs)))
                elif isinstance(module, nn.modules.batchnorm._BatchNorm) and handler == PRUNE_OUT:
                    norms.append(LayerShare(names[module], len(item.idxs)))
            if size > 1 and out_layers:
                scale_layers = [_following_norm(dg, model.get_submodule(s.layer), names) or s.layer
                                for s in out_layers]
                groups.append(ChannelGroup(0, root, size, out_layers, in_layers, norms, scale_layers))
        groups.sort(key=lambda grp: order[grp.root])
        for i, grp in enumerate(groups):
            grp.index = i
        model.train(was_training)
        return cls(model, input_shape, groups, output_hw, ignored_names)

    @property
    def sizes(self) -> list[int]:
        """Channel count of every group, in group order."""
        return [g.size for g in self.groups]

    def dependency_graph(self, model: nn.Module) -> tp.DependencyGraph:
        """A torch-pruning graph of `model` (same architecture, possibly a copy) at this input shape."""
        device = next(model.parameters()).device
        with torch.enable_grad():  # torch-pruning traces through autograd
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.randn(*self.input_shape, device=device))


def _following_norm(dg: tp.DependencyGraph, layer: nn.Module, names: dict[nn.Module, str]) -> str | None:
    outputs = dg.module2node[layer].outputs
    if len(outputs) == 1 and isinstance(outputs[0].module, nn.modules.batchnorm._BatchNorm):
        return names[outputs[0].module]
    return None


def _output_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:]))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return sizes
