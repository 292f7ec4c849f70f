"""AdaPruner: block-BN-importance widths bisected to the budget, weight-inheritance criteria scored on the held-out
split after BN recalibration, the per-criterion resume cache, and the pipeline end to end."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader

from pruning import zoo
from pruning.allocation import masks_from_counts
from pruning.budget import Budget, BudgetCost, BudgetError, parse_budget
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.methods import adapruner
from pruning.methods.adapruner_params import CRITERIA, AdaPrunerParams
from pruning.methods.api import MethodContext, NotApplicable
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.surgery import materialize
from pruning.train import Cancelled
from tests.pruning.conftest import randomize_norms
from tests.pruning.test_wgates import FakeLatency, PipelineLatency, random_loader, tiny_cnn


def setup(arch: str | None = None, resolution: int = 8, classes: int = 4):
    """A model with uneven BN scales (so blocks differ in importance), its graph and cost model."""
    torch.manual_seed(0)
    model = (tiny_cnn() if arch is None else zoo.build_model(arch, classes, 3)).eval()
    randomize_norms(model)
    graph = ChannelGraph.build(model, (1, 3, resolution, resolution))
    return model, graph, CostModel(graph)


def context(budget_text: str = "flops=0.5", arch: str | None = None, resolution: int = 8, latency=None,
            loader: DataLoader | None = None, checkpoint_dir=None, should_cancel=None, **params) -> MethodContext:
    model, graph, cost = setup(arch, resolution)
    budget = BudgetCost(parse_budget(budget_text), cost, latency(cost) if latency else None)
    loader = loader or random_loader(n=16, batch=8, resolution=resolution)
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget,
                         params=AdaPrunerParams(**({"recal_batches": 2} | params)), train_loader=loader,
                         val_loader=loader, device=torch.device("cpu"), epochs=0, lr=0.01,
                         checkpoint_dir=checkpoint_dir, should_cancel=should_cancel)


def test_registered_without_training_and_bad_params_name_the_field():
    info = get_method("adapruner")
    assert info.target == "pruning.methods.adapruner:run" and info.trains is False
    assert info.validate_params({}).criteria == list(CRITERIA)
    for bad, field in [({"rho_min": 0.0}, "rho_min"), ({"rho_min": float("nan")}, "rho_min"),
                       ({"band": float("inf")}, "band"), ({"criteria": ["l1", "l1"]}, "criteria"),
                       ({"criteria": ["taylor"]}, "criteria"), ({"criteria": []}, "criteria"),
                       ({"recal_batches": 0}, "recal_batches")]:
        with pytest.raises(ValidationError, match=field):
            info.validate_params(bad)


def test_a_network_without_batchnorm_is_not_applicable():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    with pytest.raises(NotApplicable, match="BatchNorm"):
        adapruner.check(model, graph, AdaPrunerParams())
    adapruner.check(*setup()[:2], AdaPrunerParams())  # a network with BN passes


@pytest.mark.parametrize("budget_text", ["flops=0.5", "flops=0.3", "params=0.4", "latency_ms=0.05@fake"])
def test_bisected_allocation_lands_within_two_percent_under_the_budget(budget_text):
    model, graph, cost = setup("resnet20")
    latency = FakeLatency(cost) if budget_text.startswith("latency") else None
    budget = BudgetCost(parse_budget(budget_text), cost, latency)
    importance, _ = adapruner.block_importance(model, graph)
    assert importance.std() > 0  # uneven blocks, so the widths are not one uniform ratio
    allocation = adapruner.allocate(adapruner.BlockWidths(importance, graph.sizes, 0.1), budget, 0.02)
    assert allocation.in_band and 0.98 <= allocation.cost_ratio <= 1.0
    assert 0.98 * budget.target <= budget.hard(allocation.counts) <= budget.target
    # The shares follow block importance: a more important block never keeps a smaller share than a less
    # important one (up to a rounding step and the top-up).
    shares = [c / s for c, s in zip(allocation.counts, graph.sizes, strict=True)]
    for a in range(len(shares)):
        for b in range(len(shares)):
            if importance[a] > importance[b]:
                assert shares[a] >= shares[b] - 2.0 / graph.sizes[a] - 1e-9


def test_rho_min_is_the_floor_of_every_group_and_a_floor_over_the_budget_is_refused():
    model, graph, cost = setup("resnet20")
    importance, _ = adapruner.block_importance(model, graph)
    importance[[1, 7]] *= 0.1  # two blocks of little importance, which the clip has to hold up
    budget = BudgetCost(Budget("flops", 0.45), cost)
    widths = adapruner.BlockWidths(importance, graph.sizes, 0.4)
    allocation = adapruner.allocate(widths, budget, 0.02)
    floors = [math.ceil(0.4 * s) for s in graph.sizes]
    assert all(c >= f for c, f in zip(allocation.counts, floors, strict=True))
    assert [allocation.counts[g] for g in (1, 7)] == [floors[g] for g in (1, 7)]
    assert budget.fits(allocation.counts)
    # Without the clip the least important blocks would fall under 40%.
    assert min(allocation.kappa * float(r) for r in widths.relative) < 0.4
    with pytest.raises(BudgetError, match="rho_min"):
        adapruner.allocate(adapruner.BlockWidths(importance, graph.sizes, 0.9), budget, 0.02)
    rounded = adapruner.BlockWidths(importance, graph.sizes, 0.4, round_to=8).counts(0.0)
    assert all(c % 8 == 0 and c >= 0.4 * s for c, s in zip(rounded, graph.sizes, strict=True))


def test_report_lists_every_criterion_and_the_best_held_out_score_is_chosen(monkeypatch):
    ctx = context()
    selection = adapruner.run(ctx)
    info = selection.info
    assert list(info["criteria"]) == list(CRITERIA)
    best = max(info["criteria"].items(), key=lambda kv: (kv[1]["accuracy"], -kv[1]["loss"]))[0]
    assert info["chosen"] == best
    # Rigged held-out scores: the method follows them, masks and scores included.
    rigged = {"l1": 0.2, "l2": 0.3, "bn_gamma": 0.1, "fpgm": 0.9, "random": 0.5}
    names = iter(CRITERIA)
    monkeypatch.setattr(adapruner, "held_out_metrics",
                        lambda *a: {"accuracy": rigged[next(names)], "loss": 1.0, "samples": 16})
    selection = adapruner.run(ctx)
    assert selection.info["chosen"] == "fpgm"
    assert {k: v["accuracy"] for k, v in selection.info["criteria"].items()} == rigged
    fpgm = adapruner.fpgm_scores(ctx.model, ctx.graph)
    assert all(torch.equal(a, b) for a, b in zip(selection.scores, fpgm, strict=True))
    expected = masks_from_counts(fpgm, selection.info["allocation"]["counts"])
    assert all(torch.equal(a, b) for a, b in zip(selection.keep_masks, expected, strict=True))
    assert ctx.budget.fits(selection.keep_counts)  # (two groups of 8 and 12 channels: no 2% band to land in)


def test_criteria_choose_different_channels():
    model, graph, _ = setup()
    counts = [4, 6]
    chosen = {name: [tuple(m.nonzero().flatten().tolist()) for m in
                     masks_from_counts(adapruner.criterion_scores(name, model, graph, 0), counts)]
              for name in CRITERIA}
    assert len({tuple(v) for v in chosen.values()}) >= 4
    # FPGM keeps the filters far from the others: a filter duplicated onto another is the first to go.
    with torch.no_grad():
        model[0].weight[1].copy_(model[0].weight[0])
        model[0].weight[2].copy_(model[0].weight[0] * 1.001)
    fpgm = adapruner.fpgm_scores(model, graph)[0]
    assert int(fpgm.argmin()) in (0, 1, 2)


def test_recalibration_changes_bn_statistics_and_the_returned_model_carries_them():
    ctx = context(recal_batches=2)
    masks = masks_from_counts(adapruner.criterion_scores("l1", ctx.model, ctx.graph, 0), [4, 6])
    plain = materialize(ctx.model, ctx.graph, masks)
    recal, used = adapruner.recalibrated_subnet(ctx.model, ctx.graph, masks, ctx.train_loader, 2, 0, ctx.device)
    assert used == 2
    norms = [(a, b) for a, b in zip(plain.modules(), recal.modules(), strict=True) if isinstance(a, nn.BatchNorm2d)]
    assert norms and all(not torch.allclose(a.running_mean, b.running_mean) for a, b in norms)
    assert all(not torch.allclose(a.running_var, b.running_var) for a, b in norms)
    # The dense model handed to the finisher materializes into the recalibrated subnet.
    inherited, written = adapruner.inherit_bn_stats(ctx.model, ctx.graph, masks, recal)
    assert written == len(norms)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(materialize(inherited, ctx.graph, masks).eval()(x), recal.eval()(x), atol=1e-5)
        assert not torch.allclose(plain.eval()(x), recal(x), atol=1e-3)
    assert torch.equal(ctx.model[1].running_mean, setup()[0][1].running_mean)  # the dense model is untouched


class CancelAfter:
    """should_cancel that answers True from its `calls`-th call on (state in a named object, not a closure)."""

    def __init__(self, calls: int):
        self.calls, self.seen = calls, 0

    def __call__(self) -> bool:
        self.seen += 1
        return self.seen >= self.calls


@pytest.mark.parametrize("winner_cached", [False, True])
def test_a_cancelled_job_resumes_from_the_criterion_cache_and_matches_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                          winner_cached):
    evaluated = []
    real = adapruner.held_out_metrics

    def counting(subnet, *args):
        evaluated.append(subnet)
        return real(subnet, *args)

    monkeypatch.setattr(adapruner, "held_out_metrics", counting)
    criteria = list(CRITERIA)
    whole = adapruner.run(context(checkpoint_dir=tmp_path / "whole"))
    if winner_cached:  # the winner among the criteria finished before the cancel: the resumed run rebuilds it
        criteria = [whole.info["chosen"]] + [c for c in CRITERIA if c != whole.info["chosen"]]
        whole = adapruner.run(context(checkpoint_dir=tmp_path / "whole_reordered", criteria=criteria))
    assert len(evaluated) == len(CRITERIA) * (2 if winner_cached else 1)
    evaluated.clear()
    with pytest.raises(Cancelled):
        adapruner.run(context(checkpoint_dir=tmp_path / "job", should_cancel=CancelAfter(3), criteria=criteria))
    assert len(evaluated) == 2  # two criteria finished before the cancel
    evaluated.clear()
    resumed = adapruner.run(context(checkpoint_dir=tmp_path / "job", criteria=criteria))
    assert len(evaluated) == len(CRITERIA) - 2
    assert resumed.info["resumed_criteria"] == criteria[:2]
    assert (resumed.info["chosen"] in criteria[:2]) == winner_cached
    assert resumed.info["criteria"] == whole.info["criteria"] and resumed.info["chosen"] == whole.info["chosen"]
    assert all(torch.equal(a, b) for a, b in zip(resumed.keep_masks, whole.keep_masks, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.scores, whole.scores, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                 whole.model.state_dict().values(), strict=True))
    # A cache written for other weights is ignored.
    evaluated.clear()
    other = context(checkpoint_dir=tmp_path / "job")
    with torch.no_grad():
        other.model[0].weight.mul_(1.5)
    other.params = AdaPrunerParams(recal_batches=2, criteria=criteria)
    assert adapruner.run(other).info["resumed_criteria"] == [] and len(evaluated) == len(CRITERIA)


def test_progress_reports_every_criterion():
    events = []
    ctx = context(criteria=["l1", "random"])
    ctx.progress = events.append
    adapruner.run(ctx)
    assert [e["criterion"] for e in events] == ["l1", "random"]
    assert [e["fraction"] for e in events] == [0.5, 1.0] and all(e["stage"] == "adapruner" for e in events)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "resnet18", "mobilenet_v2"])
def test_architectures(arch):
    resolution = 32 if arch in ("resnet18", "mobilenet_v2") else 8
    loader = random_loader(n=4, batch=4, resolution=resolution)
    ctx = context("flops=0.5", arch=arch, resolution=resolution, loader=loader, recal_batches=1,
                  criteria=["bn_gamma", "fpgm"])
    adapruner.check(ctx.model, ctx.graph, ctx.params)
    selection = adapruner.run(ctx)
    assert 0.98 <= ctx.budget.hard(selection.keep_counts) / ctx.budget.target <= 1.0
    assert set(selection.info["criteria"]) == {"bn_gamma", "fpgm"}
    pruned = materialize(selection.model, ctx.graph, list(selection.keep_masks))
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pruned.modules())
    assert selection.info["bn_layers_recalibrated"] == norms > 0  # every BN carries its recalibrated statistics
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, resolution, resolution)).shape == (2, 4)


@pytest.mark.slow
def test_pipeline_flops_budget(tmp_path):
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="adapruner", budget=Budget("flops", 0.5),
                           epochs=0, finetune_epochs=1, params={"recal_batches": 2, "criteria": ["l1", "fpgm"]})
    report = run_prune(request, tmp_path)
    info = report["method_info"]
    assert info["chosen"] in ("l1", "fpgm") and set(info["criteria"]) == {"l1", "fpgm"}
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    assert report["pruned"]["macs"] >= 0.98 * 0.5 * report["dense"]["macs"]
    assert report["finisher_channels_removed"] == 0


@pytest.mark.slow
def test_pipeline_latency_budget(tmp_path):
    latency = PipelineLatency("resnet20", 16, 3, bias=1.3)
    target = 0.5 * float(latency.cost_model.dense_macs) / 1e6
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="adapruner",
                           budget=Budget("latency_ms", target, "fake"), epochs=0, finetune_epochs=0,
                           params={"recal_batches": 1, "criteria": ["bn_gamma", "random"]})
    report = run_prune(request, tmp_path, latency=latency)
    # The allocation hits the predicted budget; the device is 30% slower, so the finisher trims to the reading.
    assert 0.98 <= report["method_info"]["allocation"]["cost_ratio"] <= 1.0
    section = report["latency_ms"]
    assert section["channels_trimmed"] > 0
    assert section["measurements"][-1]["measured_ms"] <= target * 1.025
