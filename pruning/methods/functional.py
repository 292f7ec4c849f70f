"""Functionality-oriented filter pruning (Qin et al., 2018): cluster each group's channels by what they respond
to, keep one representative per cluster and add the removed channels' outgoing weights onto it.

A channel is represented by what its consumers (the conv/linear layers that read it) receive on a calibration
batch: per consumer, the Gram matrix of the channels' flattened inputs (every image and position) and their sums.
Two channels' distance is 1 - their cosine similarity, averaged over the group's consumers; a dead channel (zero
input everywhere) is at distance 0 from every channel, since removing it changes nothing. Each group is clustered
agglomeratively once; one distance threshold `delta` for all groups is bisected to the budget (a larger delta
only merges more, so the cost is monotone in it, and the bisection walks the merges of all groups in the order
of their heights).

The merge: for a consumer reading channel j as s * (channel i), W[:, i] += s * W[:, j] keeps its output exact.
s is the ratio of the channels' mean inputs at that consumer (ours; `scale=mean_ratio`): exact for scaled copies,
and otherwise it keeps the consumer's mean output (what its BN's running mean expects); `least_squares` uses
<x_i, x_j> / <x_i, x_i> instead. The removed channels' own outgoing slices are zeroed, so that a channel the
finisher grows back does not count twice. Consumers are the group's in_layers, so this is the same for residual
streams (every block reading the stream, the downsample convs and the classifier) and for depthwise groups (the
depthwise conv is one of the group's producers; the projection conv after it is the consumer). Statistics come
from the dense network in one pass, and are checkpointed so that a cancelled job resumes to the same selection.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import nn

from pruning.allocation import bisect_scalar
from pruning.groups import ChannelGraph, ChannelGroup, LayerShare, is_depthwise
from pruning.importance import group_weight_norms
from pruning.methods.api import MethodContext, NotApplicable, Selection
from pruning.methods.functional_params import FunctionalParams
from pruning.surgery import materialize
from pruning.train import Cancelled, evaluate

# Cosine distances lie in [0, 2]: at this threshold every group is one cluster (or its floor).
MAX_DELTA = 2.0
STATS_FILE = "functional_stats.pt"
# Removed channels rank this far below the kept ones of their group, for a finisher that grows channels back.
REMOVED_SCORE_FACTOR = 1e-3


def consumers(model: nn.Module, group: ChannelGroup) -> list[LayerShare]:
    """The layers that read the group's channels linearly: its in_layers that are not also its producers
    (a depthwise conv is listed among the producers: it carries the channels, it does not mix them)."""
    producers = set(group.out_layer_names)
    return [s for s in group.in_layers if s.layer not in producers
            and not (isinstance(m := model.get_submodule(s.layer), nn.Conv2d) and is_depthwise(m))]


def input_width(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def check(model: nn.Module, graph: ChannelGraph, params: FunctionalParams | None = None) -> None:
    """NotApplicable where a group's channels cannot be merged: no linear consumer, a grouped (not depthwise) conv
    consumer, or a consumer whose input holds other channels too (concatenations)."""
    for group in graph.groups:
        found = consumers(model, group)
        if not found:
            raise NotApplicable(f"functional cannot merge group {group.root}: no conv/linear layer reads its channels")
        for share in found:
            layer = model.get_submodule(share.layer)
            if not isinstance(layer, nn.Conv2d | nn.Linear):
                raise NotApplicable(f"functional cannot merge into {share.layer}: not a conv or linear layer")
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                raise NotApplicable(f"functional cannot merge into grouped conv {share.layer} (groups={layer.groups})")
            width = input_width(layer)
            if share.channels != width or width % group.size:
                raise NotApplicable(f"functional cannot merge into {share.layer}: its {width} inputs are not "
                                    f"exactly group {group.root}'s {group.size} channels (a concatenation?)")


@dataclass
class ConsumerStats:
    """What one consumer receives, per channel of its group: the Gram matrix of the flattened inputs over the
    calibration batch, their sums and how many values each channel had."""

    gram: torch.Tensor  # [C, C] float64
    total: torch.Tensor  # [C] float64
    count: int = 0

    def add(self, rows: torch.Tensor) -> None:
        # One batch's products in float32 (half the memory of a float64 copy of a large activation), summed
        # over batches in float64.
        rows = rows.detach().float()
        self.gram += (rows @ rows.T).double().cpu()
        self.total += rows.sum(dim=1).double().cpu()
        self.count += rows.shape[1]

    def cosine(self) -> torch.Tensor:
        """Cosine similarity of every pair of channels; a dead channel is similar to everything (removing it is
        exact)."""
        diag = self.gram.diagonal()
        dead = diag <= 1e-12 * float(diag.max().clamp_min(1e-300))
        norm = diag.clamp_min(1e-300).sqrt()
        cos = self.gram / norm[:, None] / norm[None, :]
        cos[dead, :] = 1.0
        cos[:, dead] = 1.0
        return cos

    def scale(self, rep: int, member: int, mode: str) -> float:
        """s with input[member] ~ s * input[rep] (see the module docstring); mean_ratio falls back to least
        squares where the representative's mean input is ~0 against its RMS (signed, centred activations)."""
        n = max(self.count, 1)
        mean_rep, mean_member = float(self.total[rep]) / n, float(self.total[member]) / n
        energy = float(self.gram[rep, rep])
        if mode == "mean_ratio" and abs(mean_rep) > 1e-3 * math.sqrt(energy / n):
            return mean_member / mean_rep
        return float(self.gram[rep, member]) / energy if energy > 0 else 0.0

    def state(self) -> dict:
        return {"gram": self.gram, "total": self.total, "count": torch.tensor(self.count)}

    @classmethod
    def from_state(cls, state: dict) -> ConsumerStats:
        return cls(state["gram"], state["total"], int(state["count"]))


def channel_rows(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """A consumer's input as [size, values]: conv inputs per channel over images and positions; linear inputs
    per channel over images (and the positions a flatten laid out channel-major)."""
    if inputs.dim() == 4:
        return inputs.transpose(0, 1).reshape(size, -1)
    n = inputs.shape[0]
    return inputs.reshape(n, size, -1).transpose(0, 1).reshape(size, -1)


class StatsRecorder:
    """Forward pre-hooks accumulating ConsumerStats on every consumer layer (removed by close())."""

    def __init__(self, model: nn.Module, sizes: dict[str, int]):
        self.sizes = sizes
        self.stats = {name: ConsumerStats(torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
                      for name, n in sizes.items()}
        self.handles = [model.get_submodule(name).register_forward_pre_hook(self.hook(name)) for name in sizes]

    def hook(self, name: str):
        def record(_module: nn.Module, inputs: tuple) -> None:
            self.stats[name].add(channel_rows(inputs[0], self.sizes[name]))
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def consumer_sizes(model: nn.Module, graph: ChannelGraph) -> dict[str, int]:
    """Consumer layer -> the channel count of the group it reads."""
    return {share.layer: group.size for group in graph.groups for share in consumers(model, group)}


@torch.no_grad()
def collect_stats(model: nn.Module, graph: ChannelGraph, ctx: MethodContext, samples: int) -> dict[str, ConsumerStats]:
    """ConsumerStats of every consumer over the first `samples` training images (eval mode), cached in the
    method's checkpoint folder."""
    path = Path(ctx.checkpoint_dir) / STATS_FILE if ctx.checkpoint_dir is not None else None
    sizes = consumer_sizes(model, graph)
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        if int(saved["samples"]) == samples and set(saved["layers"]) == set(sizes):
            return {name: ConsumerStats.from_state(state) for name, state in saved["layers"].items()}
    recorder = StatsRecorder(model, sizes)
    seen = 0
    try:
        model.eval()
        for inputs, _ in ctx.train_loader:
            cancel_point(ctx, "calibration")
            batch = inputs[: samples - seen].to(ctx.device)
            model(batch)
            seen += batch.shape[0]
            emit(ctx, "calibrate", seen / samples)
            if seen >= samples:
                break
    finally:
        recorder.close()
    if seen == 0:
        raise ValueError("functional needs calibration images, but the training loader is empty")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"samples": samples, "layers": {n: s.state() for n, s in recorder.stats.items()}}, tmp)
        os.replace(tmp, path)
    return recorder.stats


def cancel_point(ctx: MethodContext, where: str) -> None:
    if ctx.should_cancel is not None and ctx.should_cancel():
        raise Cancelled(f"functional cancelled during {where}")


# (start, share) of the method's progress bar per phase: the calibration pass is most of the work.
PHASE_SPAN = {"calibrate": (0.0, 0.5), "cluster": (0.5, 0.25), "merge": (0.75, 0.25)}


def emit(ctx: MethodContext, phase: str, fraction: float, **extra) -> None:
    if ctx.progress is not None:
        start, share = PHASE_SPAN[phase]
        ctx.progress({"phase": phase, "fraction": start + share * min(fraction, 1.0), **extra})


class GroupTree:
    """One group's agglomerative clustering by consumer-averaged cosine distance, cut at any threshold."""

    def __init__(self, stats: list[ConsumerStats], method: str, floor: int):
        cosine = sum(s.cosine() for s in stats) / len(stats)
        distance = (1.0 - cosine).clamp(0.0, MAX_DELTA).numpy()
        distance = 0.5 * (distance + distance.T)
        np.fill_diagonal(distance, 0.0)
        self.size = distance.shape[0]
        self.tree = linkage(squareform(distance, checks=False), method=method)
        self.floor = floor
        self.alive = (sum(s.gram.diagonal() for s in stats) > 0).numpy()

    def labels(self, delta: float) -> np.ndarray:
        """Cluster of every channel at threshold `delta` (at least `floor` clusters)."""
        labels = fcluster(self.tree, t=delta, criterion="distance")
        if labels.max() < self.floor:
            labels = fcluster(self.tree, t=self.floor, criterion="maxclust")
        return labels

    def count(self, delta: float) -> int:
        return int(self.labels(delta).max())


def fit_threshold(trees: list[GroupTree], fits: Callable[[list[int]], bool], iterations: int) -> float:
    """The smallest threshold whose cluster counts fit the budget (0: only exact duplicates merge; MAX_DELTA
    when even the floors do not fit, and the finisher trims from there)."""
    def ok(delta: float) -> bool:
        return fits([t.count(delta) for t in trees])

    if ok(0.0):
        return 0.0
    if not ok(MAX_DELTA):
        return MAX_DELTA
    return bisect_scalar(ok, MAX_DELTA, 0.0, iterations)


def representatives(labels: np.ndarray, l1: torch.Tensor, alive: np.ndarray) -> dict[int, int]:
    """member -> representative of its cluster: the live channel with the largest L1 (any, if all are dead)."""
    merged = {}
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster).tolist()
        live = [c for c in members if alive[c]] or members
        rep = max(live, key=lambda c: float(l1[c]))
        merged.update({c: rep for c in members if c != rep})
    return merged


@torch.no_grad()
def merge_group(model: nn.Module, group: ChannelGroup, merged: dict[int, int], stats: dict[str, ConsumerStats],
                mode: str) -> None:
    """Add every removed channel's input slice of every consumer onto its representative's, scaled; zero it."""
    for share in consumers(model, group):
        weight = model.get_submodule(share.layer).weight
        per_channel = input_width(model.get_submodule(share.layer)) // group.size
        view = weight.data.view(weight.shape[0], group.size, per_channel, *weight.shape[2:])
        for member, rep in merged.items():
            view[:, rep] += stats[share.layer].scale(rep, member, mode) * view[:, member]
            view[:, member] = 0.0


def selection_scores(labels: np.ndarray, l1: torch.Tensor, merged: dict[int, int]) -> torch.Tensor:
    """Kept channels: cluster size x L1 (trimming a representative drops its whole cluster); removed ones far below."""
    sizes = torch.as_tensor(np.bincount(labels)[labels], dtype=torch.float32)
    scores = sizes * l1.float()
    removed = torch.tensor(sorted(merged), dtype=torch.long)
    if len(removed):
        scores[removed] = l1.float()[removed] * REMOVED_SCORE_FACTOR
    return scores


def build_trees(ctx: MethodContext, model: nn.Module, stats: dict[str, ConsumerStats]) -> list[GroupTree]:
    """Every group's clustering, with a progress event and a cancellation point per group."""
    params: FunctionalParams = ctx.params
    trees = []
    for group in ctx.graph.groups:
        cancel_point(ctx, "clustering")
        floor = min(group.size, max(1, math.ceil(params.min_keep * group.size - 1e-9)))
        trees.append(GroupTree([stats[s.layer] for s in consumers(model, group)], params.linkage, floor))
        emit(ctx, "cluster", (group.index + 1) / len(ctx.graph.groups), group=group.index)
    return trees


def run(ctx: MethodContext) -> Selection:
    """Cluster, bisect the threshold to the budget, merge; the merged copy of the dense model and its masks."""
    params: FunctionalParams = ctx.params
    graph = ctx.graph
    check(ctx.model, graph, params)
    model = copy.deepcopy(ctx.model).to(ctx.device).eval()
    stats = collect_stats(model, graph, ctx, params.calibration_samples)
    trees = build_trees(ctx, model, stats)
    delta = fit_threshold(trees, ctx.budget.fits, params.bisect_iterations)
    masks, scores = [], []
    for group, tree, group_l1 in zip(graph.groups, trees, group_weight_norms(ctx.model, graph), strict=True):
        cancel_point(ctx, "merging")
        labels = tree.labels(delta)
        merged = representatives(labels, group_l1, tree.alive)
        if params.merge:
            merge_group(model, group, merged, stats, params.scale)
        mask = torch.ones(group.size, dtype=torch.bool)
        mask[list(merged)] = False
        masks.append(mask)
        scores.append(selection_scores(labels, group_l1, merged))
        emit(ctx, "merge", (group.index + 1) / len(graph.groups), group=group.index)
    chosen = model.cpu().eval() if params.merge else ctx.model
    counts = [int(m.sum()) for m in masks]
    info = {"delta": delta, "linkage": params.linkage, "scale": params.scale, "merged": params.merge,
            "channels_removed": sum(graph.sizes) - sum(counts), "keep_counts": counts,
            "calibration_samples": params.calibration_samples, "predicted_cost": ctx.budget.hard(counts)}
    if params.evaluate:
        info.update(accuracy_before_finetune(ctx, chosen, masks))
    return Selection(chosen, masks, scores, score_scale="per_group", round_to=params.round_to, info=info)


def accuracy_before_finetune(ctx: MethodContext, merged: nn.Module, masks: list[torch.Tensor]) -> dict:
    """Validation accuracy of the method's selection (before the finisher and fine-tuning), with the merge and,
    for comparison, with the same channels merely removed from the dense model."""
    out = {"accuracy_before_finetune": evaluate(materialize(merged, ctx.graph, masks), ctx.val_loader, ctx.device)}
    if merged is not ctx.model:
        out["accuracy_before_finetune_unmerged"] = evaluate(materialize(ctx.model, ctx.graph, masks),
                                                            ctx.val_loader, ctx.device)
    return out
