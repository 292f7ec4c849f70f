"""MACs and params as functions of the kept channel count of every group: exact for integers, differentiable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruning.groups import ChannelGraph, is_depthwise
from pruning.zoo import param_count


@dataclass(frozen=True)
class LayerCost:
    """Static facts about one conv/linear layer that its cost needs."""

    name: str
    kind: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    groups: int
    depthwise: bool
    kernel_area: int
    output_area: int
    has_bias: bool


class CostModel:
    """Cost of a model whose groups keep `n_g` channels; in/out widths are affine in n, MACs bilinear."""

    def __init__(self, graph: ChannelGraph):
        self.graph = graph
        model = graph.model
        self.layers: list[LayerCost] = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                h, w = graph.output_hw[name]
                self.layers.append(LayerCost(name, "conv", m.in_channels, m.out_channels, m.groups,
                                             is_depthwise(m), m.kernel_size[0] * m.kernel_size[1], h * w,
                                             m.bias is not None))
            elif isinstance(m, nn.Linear):
                self.layers.append(LayerCost(name, "linear", m.in_features, m.out_features, 1, False, 1, 1,
                                             m.bias is not None))
        self.norms = [(n, m.num_features) for n, m in model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
        index = {layer.name: i for i, layer in enumerate(self.layers)}
        norm_index = {name: i for i, (name, _) in enumerate(self.norms)}
        n_layers, n_groups = len(self.layers), len(graph.groups)
        # removed_out[l] = A_out[l] @ (sizes - n): channels of layer l that disappear with each group's removals
        self.a_out = torch.zeros(n_layers, n_groups, dtype=torch.float64)
        self.a_in = torch.zeros(n_layers, n_groups, dtype=torch.float64)
        self.a_norm = torch.zeros(len(self.norms), n_groups, dtype=torch.float64)
        for g in graph.groups:
            for share in g.out_layers:
                self.a_out[index[share.layer], g.index] += share.channels / g.size
            for share in g.in_layers:
                self.a_in[index[share.layer], g.index] += share.channels / g.size
            for share in g.norm_layers:
                if share.layer in norm_index:
                    self.a_norm[norm_index[share.layer], g.index] += share.channels / g.size
        self.full_norm = torch.tensor([float(c) for _, c in self.norms], dtype=torch.float64)
        self.group_sizes = torch.tensor(graph.sizes, dtype=torch.float64)
        self.full_in = torch.tensor([float(layer.in_channels) for layer in self.layers], dtype=torch.float64)
        self.full_out = torch.tensor([float(layer.out_channels) for layer in self.layers], dtype=torch.float64)
        self.conv_groups = torch.tensor([float(layer.groups) for layer in self.layers], dtype=torch.float64)
        self.depthwise = torch.tensor([layer.depthwise for layer in self.layers])
        self.mac_factor = torch.tensor([float(layer.kernel_area * layer.output_area) for layer in self.layers],
                                       dtype=torch.float64)
        self.kernel_area = torch.tensor([float(layer.kernel_area) for layer in self.layers], dtype=torch.float64)
        self.has_bias = torch.tensor([float(layer.has_bias) for layer in self.layers], dtype=torch.float64)
        full = self.group_sizes.clone()
        self.dense_params = param_count(model)
        self._modeled_dense_params = float(self._modeled_params(full))
        self.dense_macs = int(round(float(self.macs(full))))

    def _as_counts(self, keep_counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        counts = torch.as_tensor(keep_counts)
        if counts.shape != self.group_sizes.shape:
            raise ValueError(f"expected {len(self.group_sizes)} keep counts, got {tuple(counts.shape)}")
        return counts.to(torch.float64)

    def widths(self, keep_counts: torch.Tensor | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(in, out) channels of every conv/linear layer when each group keeps `keep_counts` channels."""
        removed = self.group_sizes - self._as_counts(keep_counts)
        out = self.full_out - self.a_out @ removed
        cin = torch.where(self.depthwise, out, self.full_in - self.a_in @ removed)
        return cin, out

    def _in_per_group(self, cin: torch.Tensor) -> torch.Tensor:
        # A depthwise conv's group count shrinks with its channels; other grouped convs keep theirs.
        return torch.where(self.depthwise, torch.ones_like(cin), cin / self.conv_groups)

    def macs(self, keep_counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Multiply-accumulates of conv and linear layers for one input (batch 1)."""
        cin, out = self.widths(keep_counts)
        return (self.mac_factor * out * self._in_per_group(cin)).sum()

    def _modeled_params(self, counts: torch.Tensor) -> torch.Tensor:
        cin, out = self.widths(counts)
        weights = out * self._in_per_group(cin) * self.kernel_area + out * self.has_bias
        norm_features = self.full_norm - self.a_norm @ (self.group_sizes - counts)
        return weights.sum() + 2 * norm_features.sum()

    def params(self, keep_counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Parameter count; layers outside conv/linear/BN are counted at their dense size."""
        counts = self._as_counts(keep_counts)
        return self._modeled_params(counts) + (self.dense_params - self._modeled_dense_params)

    def cost(self, kind: str, keep_counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """`macs` or `params` by name."""
        if kind == "macs":
            return self.macs(keep_counts)
        if kind == "params":
            return self.params(keep_counts)
        raise ValueError(f"cost kind must be 'macs' or 'params', got {kind!r}")

    def norm_features(self, keep_counts: Sequence[int]) -> dict[str, int]:
        """Integer width of every affine BN layer at integer keep counts."""
        removed = self.group_sizes - torch.as_tensor(keep_counts, dtype=torch.float64)
        features = self.full_norm - self.a_norm @ removed
        return {name: int(round(float(f))) for (name, _), f in zip(self.norms, features, strict=True)}

    def dense(self, kind: str) -> int:
        """Dense model's `macs` or `params`."""
        return self.dense_macs if kind == "macs" else self.dense_params

    def layer_shapes(self, keep_counts: Sequence[int]) -> dict[str, tuple[int, int]]:
        """Integer (in, out) of every conv/linear layer at integer keep counts."""
        cin, out = self.widths(torch.as_tensor(keep_counts, dtype=torch.float64))
        return {layer.name: (int(round(float(i))), int(round(float(o))))
                for layer, i, o in zip(self.layers, cin, out, strict=True)}
