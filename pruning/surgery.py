"""Masks and per-channel scales -> a physically smaller model; folding; ONNX export."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pruning.cost import CostModel
from pruning.groups import ChannelGraph, ChannelGroup


def scaled_layers(model: nn.Module, group: ChannelGroup) -> list[nn.Module]:
    """Where a group's per-channel scale acts: right after each producer's BN (or the producer itself)."""
    return [model.get_submodule(n) for n in group.scale_layers]


@contextmanager
def channel_scales(model: nn.Module, graph: ChannelGraph, scales: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Temporarily multiply each group's channels by `scales[g]` (a mask when 0/1): the 'masked model'."""
    handles = []

    def hook(scale: torch.Tensor):
        def fn(_module, _inputs, output):
            shape = [1, -1] + [1] * (output.dim() - 2)
            return output * scale.to(output.device, output.dtype).view(shape)
        return fn

    try:
        for group, scale in zip(graph.groups, scales, strict=True):
            if scale is None:
                continue
            for layer in scaled_layers(model, group):
                handles.append(layer.register_forward_hook(hook(scale.detach().float())))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold_scales(model: nn.Module, graph: ChannelGraph, scales: Sequence[torch.Tensor | None]) -> None:
    """Multiply each group's scale into the layers it acts on, in place (exact: they are affine per channel)."""
    for group, scale in zip(graph.groups, scales, strict=True):
        if scale is None:
            continue
        for layer in scaled_layers(model, group):
            s = scale.detach().to(layer.weight.device, layer.weight.dtype)
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.weight.mul_(s)
                layer.bias.mul_(s)
            else:
                layer.weight.mul_(s.view([-1] + [1] * (layer.weight.dim() - 1)))
                if layer.bias is not None:
                    layer.bias.mul_(s)


@torch.no_grad()
def materialize(model: nn.Module, graph: ChannelGraph, keep_masks: Sequence[torch.Tensor],
                scales: Sequence[torch.Tensor | None] | None = None) -> nn.Module:
    """A physically smaller copy of `model` keeping the masked channels (scales folded in first)."""
    if len(keep_masks) != len(graph.groups):
        raise ValueError(f"expected {len(graph.groups)} masks, got {len(keep_masks)}")
    for group, mask in zip(graph.groups, keep_masks, strict=True):
        if mask.shape != (group.size,):
            raise ValueError(f"group {group.index} ({group.root}) has {group.size} channels, mask {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"group {group.index} ({group.root}) would keep no channel")
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    pruned.eval()
    if scales is not None:
        fold_scales(pruned, graph, scales)
    dg = graph.dependency_graph(pruned)
    for group, mask in zip(graph.groups, keep_masks, strict=True):
        removed = torch.nonzero(~mask.bool()).flatten().tolist()
        if not removed:
            continue
        root = pruned.get_submodule(group.root)
        pruning_group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs=removed)
        pruning_group.prune()
    pruned.train(was_training)
    return pruned


@torch.no_grad()
def slice_indices(model: nn.Module, graph: ChannelGraph, keep_masks: Sequence[torch.Tensor],
                  compact: nn.Module | None = None) -> dict[str, list[torch.Tensor | None]]:
    """Per parameter of materialize(model, graph, keep_masks) (or `compact`, that result): the indices it keeps
    along each dim (None: all)."""
    full = dict(model.named_parameters())
    compact = materialize(model, graph, keep_masks) if compact is None else compact
    shapes = {name: p.shape for name, p in compact.named_parameters()}
    if set(shapes) != set(full):
        raise ValueError("materialize renamed or dropped parameters; cannot map them onto the full network")
    out: dict[str, list[torch.Tensor | None]] = {name: [None] * len(shape) for name, shape in shapes.items()}
    cut = {(name, d) for name, shape in shapes.items() for d in range(len(shape)) if shape[d] != full[name].shape[d]}
    # Read the kept indices off materialize itself (every parameter holding its own index along dim d), so the map
    # follows whatever the dependency graph prunes instead of re-deriving it.
    for d in sorted({d for _, d in cut}):
        coded = copy.deepcopy(model).cpu().float()  # channel indices are exact in float32
        for p in coded.parameters():
            if p.dim() > d:
                view = [1] * p.dim()
                view[d] = -1
                p.copy_(torch.arange(p.shape[d], dtype=p.dtype).view(view).expand_as(p))
        sliced = dict(materialize(coded, graph, keep_masks).named_parameters())
        for name, shape in shapes.items():
            if (name, d) in cut:
                out[name][d] = sliced[name].movedim(d, 0).reshape(shape[d], -1)[:, 0].round().long()
    return out


def gather_params(params: Mapping[str, torch.Tensor],
                  indices: Mapping[str, Sequence[torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """The compact network's parameters as differentiable slices of the full network's (see slice_indices)."""
    out = {}
    for name, index in indices.items():
        p = params[name]
        for d, keep in enumerate(index):
            if keep is not None:
                p = p.index_select(d, keep if keep.device == p.device else keep.to(p.device))
        out[name] = p
    return out


def pruned_arch(arch_json: Mapping, cost_model: CostModel, keep_counts: Sequence[int]) -> dict:
    """The arch.json of the model whose groups keep `keep_counts` channels (no weights involved)."""
    shapes = cost_model.layer_shapes(keep_counts)
    layers = {name: dict(spec) for name, spec in arch_json["layers"].items()}
    for layer in cost_model.layers:
        cin, cout = shapes[layer.name]
        spec = layers[layer.name]
        if layer.kind == "conv":
            spec.update(in_channels=cin, out_channels=cout, groups=cout if layer.depthwise else layer.groups)
        else:
            spec.update(in_features=cin, out_features=cout)
    for norm, features in cost_model.norm_features(keep_counts).items():
        layers[norm]["num_features"] = features
    return {**arch_json, "layers": layers}


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int], opset: int = 17) -> Path:
    """Export `model` in eval mode to ONNX with a fixed input shape (input 'input', output 'logits')."""
    path = Path(path)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = torch.randn(*input_shape, device=device)
    try:
        # The TorchScript exporter is deprecated but several times faster than the dynamo one for these static
        # CNNs, which matters when the profiler exports thousands of variants.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=False)
    finally:
        model.train(was_training)
    return path


def onnx_macs(path: str | Path) -> int:
    """MACs of the Conv and Gemm nodes of an ONNX file, read off the graph (independent of the cost model)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            h, w = shapes[node.output[0]][2:]
            total += int(np.prod(inits[node.input[1]].shape)) * h * w
        elif node.op_type == "Gemm":
            total += int(np.prod(inits[node.input[1]].shape))
    return total
