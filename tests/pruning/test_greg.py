"""GReg: the growing penalty's schedule and where it acts, the collapse of the chosen channels, GReg-2's
re-selection, exact resume, the architectures, and whole jobs through the pipeline."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pruning import zoo
from pruning.allocation import masks_from_counts
from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.data import load_dataset, make_loaders
from pruning.groups import ChannelGraph
from pruning.importance import L1Importance
from pruning.methods import greg
from pruning.methods.api import MethodContext, NotApplicable
from pruning.methods.greg_params import GRegParams
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.train import Cancelled, train
from tests.pruning.helpers import CancelAfter, arch_setup
from tests.pruning.test_wgates import PipelineLatency, random_loader, resnet20_setup, tiny_setup

# The machine is shared: one thread per test process keeps tiny convolutions from fighting over the cores.
torch.set_num_threads(1)

# A schedule short enough for tests: lambda reaches 5 in 10 steps, then holds there.
FAST = {"update_interval_steps": 1, "delta_lambda": 0.5, "tau": 5.0, "stabilize_steps": 5, "reg_lr": 0.05}


def greg_context(budget_text: str = "flops=0.5", epochs: int = 3, setup=tiny_setup, loader=None,
                 latency=None, **params) -> MethodContext:
    model, graph, cost = setup()
    budget = BudgetCost(parse_budget(budget_text), cost, latency(cost) if latency else None)
    loader = loader or random_loader()
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget,
                         params=GRegParams(**{**FAST, **params}), train_loader=loader, val_loader=loader,
                         device=torch.device("cpu"), epochs=epochs, lr=0.01)


def test_greg_is_registered_as_a_training_method():
    info = get_method("greg")
    assert info.target == "pruning.methods.greg:run" and info.trains
    params = info.validate_params({})
    assert (params.variant, params.update_interval_steps, params.delta_lambda, params.tau) == ("greg1", 10, 1e-4, 1)
    assert params.reg_lr == 1e-3 and params.pick_delta_lambda == 1e-5 and params.pick_ceiling == 1e-2


@pytest.mark.parametrize("field, value", [("delta_lambda", float("nan")), ("tau", float("inf")),
                                          ("update_interval_steps", 0), ("variant", "greg3"),
                                          ("reg_lr", -1.0)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        get_method("greg").validate_params({field: value})


def test_greg2_needs_the_uniform_ceiling_below_tau():
    with pytest.raises(ValidationError, match="pick_ceiling"):
        get_method("greg").validate_params({"variant": "greg2", "pick_ceiling": 1.0, "tau": 0.5})


def test_schedule_counts_its_steps_and_shrinks_to_fit_the_epochs():
    paper = greg.GrowthSchedule.from_params(GRegParams())
    assert paper.grow_updates == 10_000 and paper.total_steps == 10 * 10_000 + 40_000
    two = greg.GrowthSchedule.from_params(GRegParams(variant="greg2"))
    assert two.pick_updates == 1000 and two.grow_updates == 9900 and two.kept_lambda == -5e-4
    fitted = paper.fitted(1400)
    assert fitted.total_steps <= 1400 and fitted.interval_steps == 10 and fitted.tau == 1.0
    assert fitted.delta_lambda == pytest.approx(1 / fitted.grow_updates) and fitted.stabilize_steps == 400
    assert paper.fitted(10**6) is paper


def regularizer_for(ctx: MethodContext, pruned=None) -> greg.GrowingRegularizer:
    p = ctx.params
    allocator = greg.L1Allocator(ctx.graph, ctx.budget.fits, p.round_to, p.allocation)
    if pruned is None:
        pruned = [~m for m in allocator.select(ctx.model)[1]]
    return greg.GrowingRegularizer(greg.coupled_layers(ctx.model, ctx.graph),
                                   greg.GrowthSchedule.from_params(p), allocator, pruned)


def test_lambda_grows_every_interval_to_tau_then_stabilizes():
    ctx = greg_context(update_interval_steps=3, delta_lambda=0.4, tau=1.0, stabilize_steps=4)
    reg = regularizer_for(ctx)
    seen = []
    for step in range(1, 16):
        reg.after_step(ctx.model, step)
        seen.append((reg.phase, round(reg.pruned_lambda(), 6)))
    assert [v for _, v in seen[:9]] == [0, 0, 0.4, 0.4, 0.4, 0.8, 0.8, 0.8, 1.0]
    assert seen[8][0] == "stabilize" and reg.stabilized_at_step == 9
    assert seen[12][0] == "done" and seen[-1] == ("done", 1.0)
    lambdas = reg.lambdas()
    assert all(set(lam[m].tolist()) <= {1.0} and set(lam[~m].tolist()) <= {0.0}
               for lam, m in zip(lambdas, reg.pruned, strict=True))


def test_penalty_gradient_is_lambda_times_every_coupled_parameter_of_the_chosen_channels():
    ctx = greg_context()
    model = ctx.model
    reg = regularizer_for(ctx)
    reg.grow_updates_done = 2  # lambda = 1.0 on the chosen channels
    model.zero_grad()
    reg.penalty(model, 0).backward()
    conv, bn = model[3], model[4]  # the second group: conv 8->12 and its BN
    chosen = reg.pruned[1]
    assert chosen.any() and (~chosen).any()
    assert torch.allclose(conv.weight.grad[chosen], conv.weight[chosen].detach())
    assert torch.allclose(bn.weight.grad[chosen], bn.weight[chosen].detach())
    assert torch.allclose(bn.bias.grad[chosen], bn.bias[chosen].detach())
    assert float(conv.weight.grad[~chosen].abs().max()) == 0 and float(bn.weight.grad[~chosen].abs().max()) == 0
    # Consumers' input slices are not penalized: the classifier gets no gradient from the penalty.
    assert model[8].weight.grad is None


def test_penalty_reaches_every_producer_of_a_residual_stream():
    ctx = greg_context(setup=resnet20_setup)
    reg = regularizer_for(ctx)
    reg.grow_updates_done = 2
    stream = max(range(len(reg.layers)), key=lambda g: len(reg.layers[g]))
    layers = reg.layers[stream]
    assert sum(isinstance(ctx.model.get_submodule(n), nn.Conv2d) for n in layers) >= 3  # the stem and the blocks
    reg.pruned[stream] = torch.arange(len(reg.pruned[stream])) % 2 == 0  # the budget may have kept it whole
    ctx.model.zero_grad()
    reg.penalty(ctx.model, 0).backward()
    chosen = reg.pruned[stream]
    for name in layers:
        weight = ctx.model.get_submodule(name).weight
        assert torch.allclose(weight.grad[chosen], weight[chosen].detach())
        assert float(weight.grad[~chosen].abs().max()) == 0


def test_chosen_filters_collapse_a_hundredfold_while_kept_ones_stay():
    ctx = greg_context(epochs=40, stabilize_steps=150)
    before = greg.producer_norms(ctx.model, ctx.graph)
    selection = greg.run(ctx)
    after = greg.producer_norms(selection.model, ctx.graph)
    removed = [~m for m in selection.keep_masks]
    assert min(greg.shrink_factors(before, after, removed)) >= 100
    assert max(greg.shrink_factors(before, after, selection.keep_masks)) < 2
    assert selection.info["removed_min_shrink"] >= 100 and selection.info["phase"] == "done"
    # The dense model the pipeline holds is left as it was.
    assert all(torch.equal(a, b) for a, b in zip(before, greg.producer_norms(ctx.model, ctx.graph), strict=True))
    assert ctx.budget.fits(selection.keep_counts)


def test_greg2_chooses_again_by_l1_after_the_uniform_phase():
    ctx = greg_context(variant="greg2", update_interval_steps=2, pick_ceiling=0.1, pick_delta_lambda=0.05)
    first = regularizer_for(ctx).pruned
    # Start from the opposite of the L1 choice: only the re-selection can bring the masks back to L1's.
    reversed_scores = [-s for s in L1Importance()(ctx.model, ctx.graph)]
    opposite = [~m for m in masks_from_counts(reversed_scores, [int((~m).sum()) for m in first])]
    reg = regularizer_for(ctx, pruned=opposite)
    assert reg.phase == "pick"
    for step in range(1, 4):
        reg.after_step(ctx.model, step)
        assert reg.phase == "pick" and all(torch.equal(lam, torch.full_like(lam, reg.pruned_lambda()))
                                           for lam in reg.lambdas())
    reg.after_step(ctx.model, 4)  # the second increment reaches pick_ceiling
    assert reg.phase == "grow" and reg.reselected_at_step == 4
    assert all(torch.equal(a, b) for a, b in zip(reg.pruned, first, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(reg.pruned, opposite, strict=True))
    # Weight decay is cancelled on the kept channels; the chosen ones go on from the uniform ceiling.
    lam = reg.lambdas()[1]
    assert torch.allclose(lam[~reg.pruned[1]], torch.tensor(-5e-4)) and torch.allclose(lam[reg.pruned[1]],
                                                                                         torch.tensor(0.1))


def test_greg2_run_reports_the_reselection():
    ctx = greg_context(epochs=5, variant="greg2", pick_ceiling=0.1, pick_delta_lambda=0.05)
    events = []
    ctx.progress = events.append
    info = greg.run(ctx).info
    assert {e["phase"] for e in events} >= {"pick", "done"} and events[-1]["lambda"] == 5.0
    assert info["schedule"]["total_steps"] == 17 <= info["steps"]  # the paper's schedule fits: not shrunk
    assert info["reselected_at_step"] == 2 and info["reselection_overlap"] is not None
    assert info["final_lambda"] == 5.0


def test_a_cancelled_run_resumes_to_the_uninterrupted_result(tmp_path):
    params = {"variant": "greg2", "pick_ceiling": 0.5, "pick_delta_lambda": 0.1, "stabilize_steps": 3}
    whole = greg.run(greg_context(epochs=5, **params))
    ctx = greg_context(epochs=5, **params)
    ctx.checkpoint_dir = tmp_path
    ctx.should_cancel = CancelAfter(3)  # inside the uniform phase: the re-selection comes at step 5
    with pytest.raises(Cancelled):
        greg.run(ctx)
    ctx.should_cancel = None
    resumed = greg.run(ctx)
    assert all(torch.equal(a, b) for a, b in zip(whole.keep_masks, resumed.keep_masks, strict=True))
    for key in ("reselected_at_step", "phase", "final_lambda", "steps", "accuracy_after_removal"):
        assert resumed.info[key] == whole.info[key]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "resnet18", "mobilenet_v2"])
def test_greg_prunes_every_architecture_family(arch):
    resolution = 8 if arch.startswith("resnet") and arch != "resnet18" else 16
    loader = random_loader(n=16, batch=8, resolution=resolution)
    ctx = greg_context("flops=0.6", epochs=1, setup=arch_setup(arch, resolution), loader=loader,
                       variant="greg2", update_interval_steps=1, delta_lambda=1.0, pick_ceiling=0.1,
                       pick_delta_lambda=0.1)
    greg.check(ctx.model, ctx.graph, ctx.params)
    selection = greg.run(ctx)
    assert ctx.budget.fits(selection.keep_counts)
    assert selection.info["reselected_at_step"] == 1 and selection.info["final_lambda"] == 5.0
    assert [len(s) for s in selection.scores] == ctx.graph.sizes
    assert 0 <= selection.info["accuracy_after_removal"] <= 1


def test_check_refuses_a_model_without_prunable_groups():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    graph = ChannelGraph.build(model, (1, 3, 2, 2))
    with pytest.raises(NotApplicable, match="no channel group"):
        greg.check(model, graph, GRegParams())


@pytest.mark.slow
def test_removal_right_after_regularization_keeps_a_trained_resnet20s_accuracy():
    splits = load_dataset("builtin:digits", resolution=8)
    train_loader, val_loader, _ = make_loaders(splits, batch_size=64, seed=0)
    torch.manual_seed(0)
    model = zoo.build_model("resnet20", splits.num_classes, splits.in_channels)
    train(model, train_loader, 4, lr=0.05, device="cpu", seed=0)
    graph = ChannelGraph.build(model.eval(), (1, 1, 8, 8))
    cost = CostModel(graph)
    ctx = MethodContext(model=model, graph=graph, cost_model=cost, budget=BudgetCost(parse_budget("flops=0.5"), cost),
                        params=GRegParams(**{**FAST, "stabilize_steps": 100}), train_loader=train_loader,
                        val_loader=val_loader, device=torch.device("cpu"), epochs=6, lr=0.01)
    info = greg.run(ctx).info
    assert info["accuracy_before_removal"] > 0.5  # a trained model, so the comparison means something
    assert abs(info["accuracy_after_removal"] - info["accuracy_before_removal"]) <= 0.01
    assert info["removed_min_shrink"] >= 100


def test_pipeline_prunes_resnet20_to_a_flops_budget(tmp_path):
    request = PruneRequest(arch="resnet20", dataset="synthetic:10x8", method="greg",
                           budget=Budget("flops", 0.5), epochs=1, finetune_epochs=0, resolution=8, params=FAST)
    report = run_prune(request, tmp_path)
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    info = report["method_info"]
    assert info["variant"] == "greg1" and "accuracy_after_removal" in info and info["score_scale"] == "per_group"


def test_pipeline_meets_a_latency_budget_measured_on_the_device(tmp_path):
    latency = PipelineLatency("resnet20", 8, 3, bias=1.3)
    target = 0.5 * float(latency.cost_model.dense_macs) / 1e6
    request = PruneRequest(arch="resnet20", dataset="synthetic:10x8", method="greg",
                           budget=Budget("latency_ms", target, "fake"), epochs=1, finetune_epochs=0,
                           resolution=8, params=FAST)
    report = run_prune(request, tmp_path, latency=latency)
    section = report["latency_ms"]
    assert section["pruned"]["measured"] <= target * 1.05
    assert not math.isnan(report["method_info"]["accuracy_after_removal"])
    assert copy.deepcopy(report["method_info"]["keep_counts"]) != report["group_sizes"]
