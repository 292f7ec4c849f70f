"""OFARPruning (Sun et al.): one training yields a cohort of subnets for several budgets x input resolutions.

Stage 1 (structure search) trains with an L1 penalty on BN gammas; at every epoch end each (budget, resolution)
member gets a mask from one global gamma threshold, bisected so the member's cost at its resolution fits its
budget. The search stops once the masks stop moving (early bird). Stage 2 trains the shared weights with the
sandwich rule: every step the full network (task loss), the smallest member and K sampled members, these
distilled in place from the full network's outputs. Members train as compact networks whose weights are slices of
the shared ones (not as masked full-width networks), so a step costs what its members cost. pruning.cohort
materializes, recalibrates and exports them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from pruning import zoo
from pruning.allocation import fit_ranking, global_ranking, masks_from_counts, round_counts
from pruning.budget import BudgetCost
from pruning.groups import ChannelGraph
from pruning.importance import group_bn_gammas
from pruning.methods.api import CohortContext, CohortResult
from pruning.surgery import gather_params, materialize, slice_indices
from pruning.train import Cancelled, distillation_loss, train

SEARCH_STATE = "search_state.json"
SEARCH_DONE = "search.json"
SEARCH_WEIGHTS = "search.safetensors"
JOINT_DONE = "joint.json"
JOINT_WEIGHTS = "joint.safetensors"

Masks = list[torch.Tensor]


# ---- structure search -------------------------------------------------------------------------------------------

def bn_layers(model: nn.Module, graph: ChannelGraph) -> list[nn.modules.batchnorm._BatchNorm]:
    """The distinct BN layers where the groups' masks act (those whose gammas the search penalises)."""
    seen, layers = set(), []
    for group in graph.groups:
        for name in group.scale_layers:
            layer = model.get_submodule(name)
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine and id(layer) not in seen:
                seen.add(id(layer))
                layers.append(layer)
    return layers


def threshold_counts(scores: Sequence[torch.Tensor], fits: Callable[[list[int]], bool], round_to: int = 1) -> list[int]:
    """Kept channels per group under the lowest global score threshold whose (rounded) configuration fits."""
    sizes = [len(s) for s in scores]

    def rounded(counts: list[int]) -> list[int]:
        return round_counts(counts, sizes, round_to)

    return fit_ranking(global_ranking(scores), len(sizes), fits, rounded if round_to > 1 else None)


def derive_masks(scores: Sequence[torch.Tensor], budget_costs: Sequence[BudgetCost], round_to: int = 1) -> list[Masks]:
    """One keep-mask set per member: the global threshold bisected to that member's budget at its resolution."""
    return [masks_from_counts(scores, threshold_counts(scores, cost.fits, round_to)) for cost in budget_costs]


def mask_similarity(previous: Sequence[Masks], current: Sequence[Masks]) -> float:
    """Cosine similarity of two epochs' masks: each member's masks as one 0/1 vector, the lowest over members."""
    if len(previous) != len(current) or not current:
        raise ValueError(f"cannot compare mask sets of {len(previous)} and {len(current)} members")
    lowest = 1.0
    for a, b in zip(previous, current, strict=True):
        va, vb = torch.cat([m.flatten() for m in a]).double(), torch.cat([m.flatten() for m in b]).double()
        denominator = float(va.norm() * vb.norm())
        lowest = min(lowest, float(va @ vb) / denominator if denominator > 0 else 0.0)
    return lowest


def early_bird_reached(similarities: Sequence[float], threshold: float = 0.99, patience: int = 3) -> bool:
    """True once the last `patience` epoch-to-epoch mask similarities are all >= `threshold`."""
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    return len(similarities) >= patience and all(s >= threshold for s in similarities[-patience:])


def encode_masks(structures: Sequence[Masks]) -> list[list[str]]:
    """Masks as JSON-friendly '0'/'1' strings (member -> group -> string)."""
    return [["".join("1" if bool(v) else "0" for v in mask.tolist()) for mask in masks] for masks in structures]


def decode_masks(encoded: Sequence[Sequence[str]]) -> list[Masks]:
    """Inverse of encode_masks."""
    return [[torch.tensor([c == "1" for c in text], dtype=torch.bool) for text in masks] for masks in encoded]


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class EarlyBirdSearch:
    """Stage 1's state across epochs: every member's masks at each epoch end, the similarities of consecutive
    epochs' masks, and the epoch the search stopped at (early bird); kept in `state_path` for a resumed job."""

    def __init__(self, ctx: CohortContext, state_path: Path | None):
        self.ctx, self.state_path = ctx, state_path
        self.graph = ctx.graphs[ctx.train_resolution]
        self.norms = bn_layers(ctx.model, self.graph)
        self.steps_per_epoch = max(len(ctx.train_loader), 1)
        self.state: dict[str, Any] = {"masks": {}, "similarities": {}}
        if state_path is not None and state_path.exists():
            self.state = json.loads(state_path.read_text())
        self.stopped_epoch: int | None = None
        if self.state["similarities"] and self.reached():
            self.stopped_epoch = max(int(k) for k in self.state["similarities"])

    def similarities(self) -> list[float]:
        return [self.state["similarities"][k] for k in sorted(self.state["similarities"], key=int)]

    def reached(self) -> bool:
        p = self.ctx.params
        return early_bird_reached(self.similarities(), p.early_bird_threshold, p.early_bird_patience)

    def member_masks(self) -> list[Masks]:
        scores = group_bn_gammas(self.ctx.model, self.graph)
        return derive_masks(scores, self.ctx.budget_costs, self.ctx.params.round_to)

    def sparsity_loss(self, _model: nn.Module) -> torch.Tensor:
        return self.ctx.params.sparsity * sum(n.weight.abs().sum() for n in self.norms)

    def at_step(self, _model: nn.Module, step: int) -> None:
        """At every epoch end: derive the members' masks, compare them with the last epoch's, stop if settled."""
        if step % self.steps_per_epoch:
            return
        epoch, state = step // self.steps_per_epoch, self.state
        masks = self.member_masks()
        # A redone epoch (resume after a crash) overwrites what it wrote before; older masks are not needed.
        state["masks"] = {k: v for k, v in state["masks"].items() if int(k) == epoch - 1}
        state["similarities"] = {k: v for k, v in state["similarities"].items() if int(k) < epoch}
        if str(epoch - 1) in state["masks"]:
            state["similarities"][str(epoch)] = mask_similarity(decode_masks(state["masks"][str(epoch - 1)]), masks)
        state["masks"][str(epoch)] = encode_masks(masks)
        if self.state_path is not None:
            _atomic_json(self.state_path, state)
        if self.reached():
            self.stopped_epoch = epoch
        if self.ctx.progress:
            sims = self.similarities()
            self.ctx.progress({"stage": "search", "epoch": epoch, "epochs": self.ctx.search_epochs,
                               "similarity": sims[-1] if str(epoch) in state["similarities"] else None,
                               "fraction": epoch / max(self.ctx.search_epochs, 1)})

    def should_stop(self) -> bool:
        """train()'s cancellation check: the early bird was reached, or the job was cancelled."""
        return self.stopped_epoch is not None or bool(self.ctx.should_cancel and self.ctx.should_cancel())


def search_structures(ctx: CohortContext) -> tuple[list[Masks], dict[str, Any]]:
    """Stage 1: train with L1 on BN gammas until the members' masks settle (early bird) or the epochs run out."""
    ckpt = ctx.checkpoint_dir
    search = EarlyBirdSearch(ctx, ckpt / SEARCH_STATE if ckpt else None)
    result, started = None, time.monotonic()
    if ctx.search_epochs > 0:
        try:
            result = train(ctx.model, ctx.train_loader, ctx.search_epochs, lr=ctx.lr, device=ctx.device,
                           progress=ctx.progress, should_cancel=search.should_stop,
                           checkpoint_dir=ckpt / "search" if ckpt else None, stage="search",
                           extra_loss=search.sparsity_loss if ctx.params.sparsity > 0 else None,
                           on_step=search.at_step, seed=ctx.seed)
        except Cancelled:
            if search.stopped_epoch is None:
                raise
    ctx.model.cpu().eval()
    structures = search.member_masks()
    epochs_run = search.stopped_epoch if search.stopped_epoch is not None else ctx.search_epochs
    info = {"max_epochs": ctx.search_epochs, "epochs_run": epochs_run, "early_bird_epoch": search.stopped_epoch,
            "similarities": search.similarities(), "final_loss": result.final_loss if result else None,
            "seconds": round(time.monotonic() - started, 2)}
    return structures, info


# ---- joint training ---------------------------------------------------------------------------------------------

def sandwich_members(costs: Sequence[float], sampled: int, generator: torch.Generator | None = None) -> list[int]:
    """Candidates trained in one step: the largest (the teacher) first, the smallest, then `sampled` others drawn
    uniformly without replacement."""
    if not costs:
        raise ValueError("no candidates to sample from")
    order = range(len(costs))
    largest = max(order, key=lambda i: (costs[i], -i))
    smallest = min(order, key=lambda i: (costs[i], i))
    plan = [largest] if largest == smallest else [largest, smallest]
    others = [i for i in order if i not in plan]
    if sampled > 0 and others:
        picks = torch.randperm(len(others), generator=generator)[:sampled].tolist()
        plan += [others[p] for p in picks]
    return plan


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Batch resized to resolution x resolution (bilinear, antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    shrinking = resolution < min(x.shape[-2:])
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrinking)


class SlicedSubnet:
    """A member trained through the shared weights: its compact module runs on slices gathered from them.

    Outputs and gradients equal the masked full network's (channel_scales), but the convolutions run at the
    member's width, so a step costs about the member's MACs instead of the full network's.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, masks: Masks):
        self.module = materialize(model, graph, masks).train()
        self.indices = slice_indices(model, graph, masks, self.module)
        # Only the structure and the BN buffers are used: the weights always come from the shared network.
        for p in self.module.parameters():
            p.requires_grad_(False)

    def __call__(self, shared: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        buffer = next(self.module.buffers(), None)
        if buffer is not None and buffer.device != x.device:
            self.module.to(x.device)
            self.indices = {n: [None if i is None else i.to(x.device) for i in idx] for n, idx in self.indices.items()}
        self.module.train()
        return functional_call(self.module, gather_params(shared, self.indices), (x,), strict=False)


class SandwichNet(nn.Module):
    """The shared network; in training its forward runs the sandwich and leaves the distillation loss pending.

    Candidates are (masks or None for the full width, resolution). The forward returns the teacher's (largest
    candidate's) logits, on which train() computes the task loss; `take_distillation()` hands train() the other
    candidates' KL to the teacher's softened outputs. Masked candidates run as SlicedSubnets.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, candidates: Sequence[tuple[Masks | None, int]],
                 costs: Sequence[float], sampled: int, temperature: float = 1.0):
        super().__init__()
        if len(candidates) != len(costs):
            raise ValueError("one cost per candidate")
        self.model = model
        self.graph = graph
        self.resolutions = [r for _, r in candidates]
        # A plain list, not a ModuleList: the subnets' own tensors must stay out of the optimizer and checkpoints.
        self.subnets = [None if m is None else SlicedSubnet(model, graph, m) for m, _ in candidates]
        self.costs = list(costs)
        self.sampled = sampled
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.last_plan: list[int] = []

    def run(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of candidate `index` on batch `x` (resized to the candidate's resolution)."""
        x = resize(x, self.resolutions[index])
        subnet = self.subnets[index]
        if subnet is None:
            return self.model(x)
        return subnet(dict(self.model.named_parameters()), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.model(x)
        plan = sandwich_members(self.costs, self.sampled)  # torch's RNG: train() checkpoints it, resume is exact
        self.last_plan = plan
        teacher = self.run(plan[0], x)
        shared = dict(self.model.named_parameters())
        resized: dict[int, torch.Tensor] = {}
        loss = teacher.new_zeros(())
        for index in plan[1:]:
            resolution = self.resolutions[index]
            if resolution not in resized:
                resized[resolution] = resize(x, resolution)
            subnet = self.subnets[index]
            logits = self.model(resized[resolution]) if subnet is None else subnet(shared, resized[resolution])
            loss = loss + distillation_loss(logits, teacher, self.temperature)
        self.pending = loss
        return teacher

    def take_distillation(self, _model: nn.Module | None = None) -> torch.Tensor:
        """The pending distillation loss of the last training forward (zero if none)."""
        loss, self.pending = self.pending, None
        return loss if loss is not None else torch.zeros(())


def joint_train(ctx: CohortContext, structures: Sequence[Masks]) -> dict[str, Any]:
    """Stage 2: sandwich-rule training of the shared weights with in-place distillation."""
    started = time.monotonic()
    cost_models = ctx.cost_models
    candidates: list[tuple[Masks | None, int]] = [(None, ctx.train_resolution)]
    costs = [float(cost_models[ctx.train_resolution].dense_macs)]
    for spec, masks in zip(ctx.members, structures, strict=True):
        candidates.append((masks, spec.resolution))
        costs.append(float(cost_models[spec.resolution].macs([int(m.sum()) for m in masks])))
    net = SandwichNet(ctx.model, ctx.graphs[ctx.train_resolution], candidates, costs, ctx.params.sampled_members,
                      ctx.params.distill_temperature)
    if ctx.joint_epochs == 0:
        return {"epochs": 0, "steps": 0, "final_loss": None}
    ckpt = ctx.checkpoint_dir
    result = train(net, ctx.train_loader, ctx.joint_epochs, lr=ctx.joint_lr, device=ctx.device,
                   progress=ctx.progress, should_cancel=ctx.should_cancel,
                   checkpoint_dir=ckpt / "joint" if ckpt else None, stage="joint",
                   extra_loss=net.take_distillation, seed=ctx.seed)
    return {"epochs": ctx.joint_epochs, "steps": result.steps, "final_loss": result.final_loss,
            "sampled_members": ctx.params.sampled_members, "seconds": round(time.monotonic() - started, 2)}


# ---- the method -------------------------------------------------------------------------------------------------

def run(ctx: CohortContext) -> CohortResult:
    """Search the members' structures, train the shared weights jointly; resumable from ctx.checkpoint_dir."""
    if not isinstance(ctx, CohortContext):
        raise ValueError("method ofa produces a cohort of subnets: submit it as a job (the worker runs "
                         "pruning.cohort.run_cohort), not as a single-subnet prune")
    ckpt = ctx.checkpoint_dir
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    names = [spec.name for spec in ctx.members]
    if ckpt is not None and (ckpt / SEARCH_DONE).exists() and (ckpt / SEARCH_WEIGHTS).exists():
        saved = json.loads((ckpt / SEARCH_DONE).read_text())
        if saved.get("members") != names:
            raise ValueError(f"checkpoint {ckpt} belongs to a cohort of other members ({saved.get('members')}); "
                             "delete it to start over")
        structures, search_info = decode_masks(saved["structures"]), saved["info"]
        zoo.load_weights(ctx.model, ckpt / SEARCH_WEIGHTS)
    else:
        structures, search_info = search_structures(ctx)
        if ckpt is not None:
            zoo.save_weights(ctx.model, ckpt / SEARCH_WEIGHTS)
            _atomic_json(ckpt / SEARCH_DONE, {"members": names, "structures": encode_masks(structures),
                                              "info": search_info})
    if ckpt is not None and (ckpt / JOINT_DONE).exists() and (ckpt / JOINT_WEIGHTS).exists():
        joint_info = json.loads((ckpt / JOINT_DONE).read_text())
        zoo.load_weights(ctx.model, ckpt / JOINT_WEIGHTS)
    else:
        joint_info = joint_train(ctx, structures)
        ctx.model.cpu().eval()
        if ckpt is not None:
            zoo.save_weights(ctx.model, ckpt / JOINT_WEIGHTS)
            _atomic_json(ckpt / JOINT_DONE, joint_info)
    ctx.model.cpu().eval()
    return CohortResult(ctx.model, structures, {"search": search_info, "joint": joint_info})


# ---- after training ---------------------------------------------------------------------------------------------

@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, batches: int, device: torch.device | str = "cpu") -> int:
    """Re-estimate every BN's running statistics from up to `batches` training batches; returns batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.to(device).train()
    used = 0
    try:
        for inputs, _ in loader:
            if used >= batches:
                break
            model(inputs.to(device))
            used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    if used == 0:
        raise ValueError("BN recalibration needs at least one training batch")
    return used
