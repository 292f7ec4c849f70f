"""LAPP: learnable thresholds, monotone progressive masks, the exact bypass fold, training from scratch, resume."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pruning import zoo
from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.methods import lapp
from pruning.methods.api import MethodContext, NotApplicable
from pruning.methods.lapp_params import LappParams
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.surgery import channel_scales, materialize
from tests.pruning.conftest import randomize_norms
from tests.pruning.test_wgates import FakeLatency, PipelineLatency, random_loader, resnet20_setup, tiny_setup


def lapp_context(budget_text: str = "flops=0.5", setup=resnet20_setup, epochs: int = 3, latency=None,
                 **params) -> MethodContext:
    model, graph, cost = setup()
    budget = BudgetCost(parse_budget(budget_text), cost, latency(cost) if latency else None)
    loader = random_loader()
    params = {"threshold_lr": 1.0, "prune_share": 0.5, **params}
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget, params=LappParams(**params),
                         train_loader=loader, val_loader=loader, device=torch.device("cpu"), epochs=epochs, lr=0.01)


def randomize_bypasses(net: lapp.LappNetwork, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for bypass in net.bypasses.values():
        randomize_norms(bypass, seed)
        bypass.conv.weight.data.copy_(torch.randn(bypass.conv.weight.shape, generator=gen) * 0.3)


def test_lapp_is_registered_as_a_from_scratch_training_method():
    info = get_method("lapp")
    assert info.target == "pruning.methods.lapp:run" and info.trains and not info.needs_dense
    assert info.validate_params({"mu": 2.0}).mu == 2.0
    for field, value in (("mu", -1.0), ("prune_share", float("nan")), ("threshold_lr", float("inf")),
                         ("min_keep", 1.5)):
        with pytest.raises(ValidationError, match=field):
            info.validate_params({field: value})


def test_bypass_plan_takes_foldable_3x3_convs_and_skips_depthwise():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, 1, 2, dilation=2, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).eval()
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    planned, skipped = lapp.bypass_plan(model, graph)
    assert planned == {"0": "1", "6": "7"}  # strided and dilated 3x3 convs fold at the centre tap
    assert skipped == {"3": "depthwise"}


def fold_case(setup, seed: int = 0):
    model, graph, _ = setup()
    randomize_norms(model, seed)
    plan, _ = lapp.bypass_plan(model, graph)
    schedule = lapp.LappSchedule(LappParams(), BudgetCost(Budget("flops", 0.5), CostModel(graph)), graph.sizes, 0)
    net = lapp.LappNetwork(model, graph, plan, 0.5, 5.0)
    net.schedule = schedule
    randomize_bypasses(net, seed + 1)
    return net, graph, schedule


def assert_fold_is_exact(net: lapp.LappNetwork, graph: ChannelGraph, schedule: lapp.LappSchedule, shape) -> None:
    gen = torch.Generator().manual_seed(3)
    for alive in schedule.group_alive():
        alive[torch.randperm(len(alive), generator=gen)[: len(alive) // 3]] = False
        alive[0] = True
    x = torch.randn(*shape, generator=gen)
    net.eval()
    with torch.no_grad():
        bypassed = net(x)
        net.remove()
        plain = net.net(x)
        assert (bypassed - plain).abs().max() > 1e-2  # the bypasses matter: the fold has something to do
        net.fold()
        masks = [a.clone() for a in schedule.group_alive()]
        with channel_scales(net.net, graph, [m.float() for m in masks]):
            folded = net.net(x)
        compact = materialize(net.net, graph, masks)(x)
    assert (folded - bypassed).abs().max() <= 1e-4
    assert (compact - bypassed).abs().max() <= 1e-4


def test_folded_bypass_equals_the_bypassed_network_in_eval_mode():
    net, graph, schedule = fold_case(resnet20_setup)
    norm = net.net.layer2[0].bn1
    norm.weight.data[:4] = 0.0  # a dead 3x3 path: the fold rescales by the bypass instead of dividing by zero
    assert_fold_is_exact(net, graph, schedule, (2, 3, 8, 8))
    assert "layer2.0.conv1" in net.bypass_of_norm.values()  # a strided conv was folded too


def test_fold_bypass_arithmetic_on_one_conv():
    conv, norm = nn.Conv2d(4, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6)
    randomize_norms(nn.Sequential(norm))
    bypass = lapp.Bypass(conv, norm)
    randomize_norms(bypass, 5)
    x = torch.randn(2, 4, 9, 9)
    stack = nn.Sequential(conv, norm).eval()
    bypass.eval()
    with torch.no_grad():
        expected = stack(x) + bypass(x)
        lapp.fold_bypass(conv, norm, bypass)
        assert (stack(x) - expected).abs().max() <= 1e-5


def test_a_pruned_channel_stays_pruned_when_its_threshold_falls_again():
    ctx = lapp_context("flops=0.3")
    plan, _ = lapp.bypass_plan(ctx.model, ctx.graph)
    net = lapp.LappNetwork(ctx.model, ctx.graph, plan, 0.0, 5.0)
    schedule = lapp.LappSchedule(ctx.params, ctx.budget, ctx.graph.sizes, prune_steps=10)
    net.schedule = schedule
    with torch.no_grad():  # importances tie at 1 from scratch: spread them so the median splits every group
        for group in ctx.graph.groups:
            for name in group.scale_layers:
                bn = ctx.model.get_submodule(name)
                bn.weight.copy_(torch.linspace(0.5, 1.5, bn.weight.numel()))
        net.thresholds.fill_(1.0)
    schedule.after_step(net, 1)
    after_first = schedule.alive.clone()
    assert 0 < int(after_first.sum()) < len(after_first)
    with torch.no_grad():
        net.thresholds.fill_(-math.inf)  # every channel is over its threshold again
    schedule.after_step(net, 2)
    assert torch.equal(schedule.alive, after_first)  # none of them comes back
    # The mask the forward pass applies is the monotone one, whatever the thresholds say.
    net(torch.randn(1, 3, 8, 8))
    assert torch.equal(torch.cat([m.detach() for m in net.current]).bool(), after_first)
    net.remove()


def test_masks_only_shrink_during_training_and_freeze_after_the_pruning_phase(monkeypatch):
    snapshots = []
    real_train = lapp.train

    def recording_train(*args, **kwargs):
        schedule = kwargs["regularizer"]
        kwargs["on_step"] = lambda _model, _step: snapshots.append(schedule.alive.clone())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(lapp, "train", recording_train)
    ctx = lapp_context("flops=0.5")
    result = lapp.run(ctx)
    assert len(snapshots) == 12 and result.info["prune_steps"] == 6
    for before, after in zip(snapshots, snapshots[1:], strict=False):
        assert not bool((after & ~before).any())  # nothing revived
    assert all(torch.equal(s, snapshots[5]) for s in snapshots[6:])  # frozen after E_p
    kept = [int(s.sum()) for s in snapshots[:6]]
    assert sum(a > b for a, b in zip(kept, kept[1:], strict=False)) >= 3  # pruned progressively, not at once
    assert torch.equal(torch.cat(result.keep_masks), snapshots[-1])
    trace = result.info["cost_trace"]
    assert trace[0] > trace[-1] and ctx.budget.hard(result.keep_counts) <= ctx.budget.target
    assert result.score_scale == "global"


def test_a_cancelled_run_resumes_to_the_uninterrupted_thresholds_and_masks(tmp_path):
    from pruning.train import Cancelled
    from tests.pruning.test_train import cancel_after

    reference = lapp.run(lapp_context())
    cut = lapp_context()
    cut.checkpoint_dir, cut.should_cancel = tmp_path, cancel_after(4)  # inside the pruning phase
    with pytest.raises(Cancelled):
        lapp.run(cut)
    resumed_ctx = lapp_context()
    resumed_ctx.checkpoint_dir = tmp_path
    resumed = lapp.run(resumed_ctx)
    assert [m.tolist() for m in resumed.keep_masks] == [m.tolist() for m in reference.keep_masks]
    assert resumed.info["thresholds"] == reference.info["thresholds"]
    assert resumed.info["cost_trace"] == pytest.approx(reference.info["cost_trace"])
    for a, b in zip(resumed.scores, reference.scores, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_latency_budget_drives_the_thresholds_through_the_predictor():
    ctx = lapp_context("latency_ms=1.2@fake", latency=FakeLatency)
    assert ctx.budget.target < 0.5 * ctx.budget.dense()
    result = lapp.run(ctx)
    assert ctx.budget.hard(result.keep_counts) <= ctx.budget.target
    assert result.info["cost_trace"][-1] < result.info["cost_trace"][0]


def test_models_without_foldable_convs_train_without_bypasses_and_no_group_is_not_applicable():
    result = lapp.run(lapp_context(setup=tiny_setup, bypass=False, epochs=1))
    assert result.info["bypassed_convs"] == []
    depthwise = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    graph = ChannelGraph.build(depthwise, (1, 3, 8, 8))
    assert lapp.bypass_plan(depthwise, graph)[0] == {}
    lapp.check(depthwise, graph, LappParams())
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    with pytest.raises(NotApplicable, match="no prunable channel group"):
        lapp.check(linear, ChannelGraph.build(linear, (1, 3, 8, 8)), LappParams())


@pytest.mark.slow
@pytest.mark.parametrize("arch,resolution", [("resnet20", 8), ("resnet56", 8), ("resnet18", 32),
                                             ("mobilenet_v2", 32)])
def test_lapp_prunes_and_folds_every_family(arch, resolution):
    def setup():
        model = zoo.build_model(arch, 4, 3).eval()
        graph = ChannelGraph.build(model, (1, 3, resolution, resolution))
        return model, graph, CostModel(graph)

    ctx = lapp_context("flops=0.6", setup=setup, epochs=1)
    ctx.train_loader = random_loader(n=16, batch=8, resolution=resolution)
    result = lapp.run(ctx)
    assert ctx.budget.hard(result.keep_counts) <= ctx.budget.target
    if arch == "mobilenet_v2":
        assert "depthwise" in result.info["bypass_skipped"].values()
    assert result.info["bypassed_convs"]
    compact = materialize(result.model, ctx.graph, list(result.keep_masks))
    assert set(zoo.describe(compact, arch, 4, 3, resolution)["layers"]) == set(
        zoo.describe(ctx.model, arch, 4, 3, resolution)["layers"])
    assert not any(isinstance(m, lapp.Bypass) for m in result.model.modules())


@pytest.mark.slow
def test_fold_is_exact_on_resnet18_and_mobilenet_v2():
    for arch in ("resnet18", "mobilenet_v2"):
        def setup(arch=arch):
            model = zoo.build_model(arch, 4, 3).eval()
            graph = ChannelGraph.build(model, (1, 3, 32, 32))
            return model, graph, CostModel(graph)

        net, graph, schedule = fold_case(setup)
        assert_fold_is_exact(net, graph, schedule, (2, 3, 32, 32))


def recorded_stages(monkeypatch) -> list[str]:
    from pruning import pipeline

    stages = []
    for module in (pipeline, lapp):
        real = module.train

        def recording(*args, real=real, **kwargs):
            stages.append(kwargs.get("stage"))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "train", recording)
    return stages


@pytest.mark.slow
def test_pipeline_trains_from_scratch_without_a_dense_stage_to_a_flops_budget(tmp_path, monkeypatch):
    stages = recorded_stages(monkeypatch)
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="lapp", budget=Budget("flops", 0.5),
                           epochs=2, finetune_epochs=1, params={"threshold_lr": 1.0})
    report = run_prune(request, tmp_path)
    assert stages == ["lapp", "finetune"]
    assert report["epochs"]["dense"] == 0
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    assert report["method_info"]["bypassed_convs"]
    saved, _ = zoo.load_pruned(tmp_path / "arch.json", tmp_path / "model.safetensors")
    assert zoo.param_count(saved) == report["pruned"]["params"]


@pytest.mark.slow
def test_pipeline_meets_a_latency_budget_with_the_fake_device(tmp_path):
    latency = PipelineLatency("resnet20", 16, 3, bias=1.2)
    target = 0.5 * float(latency.cost_model.dense_macs) / 1e6
    request = PruneRequest(arch="resnet20", dataset="synthetic:10x16", method="lapp",
                           budget=Budget("latency_ms", target, "fake"), epochs=1, finetune_epochs=0,
                           params={"threshold_lr": 1.0})
    report = run_prune(request, tmp_path, latency=latency)
    assert report["epochs"]["dense"] == 0
    assert report["latency_ms"]["pruned"]["measured"] <= target * 1.05


def test_budget_penalty_raises_the_thresholds_through_the_sigmoid_surrogate():
    ctx = lapp_context("flops=0.3")
    plan, _ = lapp.bypass_plan(ctx.model, ctx.graph)
    net = lapp.LappNetwork(ctx.model, ctx.graph, plan, 0.5, 5.0)
    schedule = lapp.LappSchedule(ctx.params, ctx.budget, ctx.graph.sizes, prune_steps=4)
    net.schedule = schedule
    net(torch.randn(2, 3, 8, 8))
    # The masks' values are the hard ones (all open here), so the soft counts equal the hard counts.
    assert net.soft_counts.tolist() == [float(s) for s in ctx.graph.sizes]
    penalty = schedule.penalty(net, 0)
    assert float(penalty) > 0  # dense cost over the first step's falling target
    penalty.backward()
    assert bool((net.thresholds.grad < 0).all())  # descent raises every threshold
    gamma = ctx.model.layer1[0].bn1.weight.grad
    assert gamma is not None and bool((gamma > 0).all())  # and lowers the importances
    net.remove()


def test_deaths_per_step_stop_at_the_falling_target():
    ctx = lapp_context("flops=0.3")
    net = lapp.LappNetwork(ctx.model, ctx.graph, {}, 0.5, 5.0)
    schedule = lapp.LappSchedule(ctx.params, ctx.budget, ctx.graph.sizes, prune_steps=4)
    net.schedule = schedule
    with torch.no_grad():
        net.thresholds.fill_(10.0)  # every channel (tied at s = 1 from scratch) is under its threshold
    schedule.after_step(net, 1)
    counts = [int(a.sum()) for a in schedule.group_alive()]
    first_target = schedule.target_at(1)
    assert first_target == pytest.approx(ctx.budget.dense() * (1 - 0.7 / 4))
    # One step goes just under its target (not down to the floors, as the tied thresholds alone would).
    assert ctx.budget.hard(counts) <= first_target
    assert ctx.budget.hard(counts) >= schedule.target_at(2)
    net.remove()
