"""functional (Qin et al., 2018): clustering by activations, exact merges of scaled copies, the threshold bisected
to the budget, merging better than removing on a trained network, resume after cancellation, every architecture."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader

from pruning import zoo
from pruning.allocation import trim_masks
from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.data import load_dataset, make_loaders
from pruning.groups import ChannelGraph
from pruning.importance import L1Importance
from pruning.methods import functional
from pruning.methods.api import MethodContext, NotApplicable
from pruning.methods.functional_params import FunctionalParams
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.surgery import materialize
from pruning.train import Cancelled, train
from tests.pruning.conftest import randomize_norms
from tests.pruning.test_wgates import FakeLatency, PipelineLatency, random_loader, resnet20_setup, tiny_cnn


def context(model, graph, cost, budget, loader=None, **params) -> MethodContext:
    loader = loader if loader is not None else random_loader(32)
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget, params=FunctionalParams(**params),
                         train_loader=loader, val_loader=random_loader(16), device=torch.device("cpu"), epochs=0,
                         lr=0.01)


def test_functional_is_registered_without_training():
    info = get_method("functional")
    assert info.target == "pruning.methods.functional:run" and not info.trains
    assert info.validate_params({"linkage": "average"}).linkage == "average"


@pytest.mark.parametrize(("field", "value"), [("calibration_samples", 0), ("min_keep", math.nan),
                                              ("min_keep", math.inf), ("linkage", "ward"), ("bisect_iterations", 0)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        get_method("functional").validate_params({field: value})


def duplicated_cnn() -> nn.Module:
    """tiny_cnn whose first layer has an exact copy (5 of 2) and a scaled copy (6 = 2 x 1 after BN and ReLU), and
    whose second layer has an exact copy (7 of 3); every other channel is alive and distinct."""
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    randomize_norms(model)
    conv0, bn0, conv1, bn1 = model[0], model[1], model[3], model[4]
    with torch.no_grad():
        for bn in (bn0, bn1):
            bn.bias.add_(0.8)  # keep channels alive, so only the planted copies are redundant
        for conv, bn, src, dst, factor in ((conv0, bn0, 2, 5, 1.0), (conv0, bn0, 1, 6, 2.0), (conv1, bn1, 3, 7, 1.0)):
            conv.weight[dst] = conv.weight[src]
            bn.running_mean[dst], bn.running_var[dst] = bn.running_mean[src], bn.running_var[src]
            bn.weight[dst], bn.bias[dst] = factor * bn.weight[src], factor * bn.bias[src]
    return model


def test_merging_exact_copies_leaves_the_outputs_unchanged():
    model = duplicated_cnn()
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    cost = CostModel(graph)
    budget = BudgetCost(Budget("macs", float(cost.macs([6, 11]))), cost)
    selection = functional.run(context(model, graph, cost, budget))
    assert selection.keep_counts == [6, 11]
    first, second = selection.keep_masks
    assert [int(first[a]) + int(first[b]) for a, b in ((1, 6), (2, 5))] == [1, 1] and int(second[3] + second[7]) == 1
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        dense = model(x)
        merged = materialize(selection.model, graph, list(selection.keep_masks)).eval()(x)
        removed = materialize(model, graph, list(selection.keep_masks)).eval()(x)
    assert torch.allclose(merged, dense, atol=1e-5)
    assert (removed - dense).abs().max() > 1e-2  # without the merge the removal is not free


def test_merging_through_a_flatten_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 4)).eval()
    with torch.no_grad():
        model[0].weight[4], model[0].bias[4] = 3.0 * model[0].weight[1], 3.0 * model[0].bias[1]
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    cost = CostModel(graph)
    budget = BudgetCost(Budget("macs", float(cost.macs([5]))), cost)
    selection = functional.run(context(model, graph, cost, budget, scale="least_squares"))
    mask = selection.keep_masks[0]
    assert selection.keep_counts == [5] and int(mask[1]) + int(mask[4]) == 1  # the larger filter (4) stays
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(materialize(selection.model, graph, list(selection.keep_masks))(x), model(x), atol=1e-5)


def plant_copy(model: nn.Module, group, src: int, dst: int) -> None:
    """Make channel dst of `group` an exact copy of src at every producer (convs, depthwise convs, BNs)."""
    with torch.no_grad():
        for share in group.out_layers:
            layer = model.get_submodule(share.layer)
            layer.weight[dst] = layer.weight[src]
            if layer.bias is not None:
                layer.bias[dst] = layer.bias[src]
        for share in group.norm_layers:
            norm = model.get_submodule(share.layer)
            for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                tensor[dst] = tensor[src]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "group_index"), [("resnet20", 0), ("mobilenet_v2", 2), ("mobilenet_v2", 4)],
                         ids=["resnet20-stream", "mobilenet_v2-depthwise", "mobilenet_v2-stream"])
def test_copies_in_residual_streams_and_depthwise_groups_merge_exactly(arch, group_index):
    torch.manual_seed(0)
    # Default BNs: randomized ones saturate MobileNet's ReLU6 at 16 px until its output no longer depends on x.
    model = zoo.build_model(arch, 10, 3).eval()
    graph = ChannelGraph.build(model, (1, 3, 16, 16))
    group = graph.groups[group_index]
    plant_copy(model, group, 1, 3)
    # This group's merges at threshold ~0 only: deep MobileNet layers at 16 px hold many channels that are constant
    # on a small batch (ReLU6 saturated), whose exact merges would otherwise meet a budget before the planted pair.
    ctx = context(model, graph, CostModel(graph), None, random_loader(16, batch=8, classes=10, resolution=16))
    stats = functional.collect_stats(model, graph, ctx, 16)
    tree = functional.GroupTree([stats[s.layer] for s in functional.consumers(model, group)], "complete", 1)
    merged_into = functional.representatives(tree.labels(1e-9), L1Importance()(model, graph)[group_index], tree.alive)
    assert merged_into.get(3) == 1 or merged_into.get(1) == 3
    merged_model = copy.deepcopy(model)
    functional.merge_group(merged_model, group, merged_into, stats, "mean_ratio")
    masks = [torch.ones(size, dtype=torch.bool) for size in graph.sizes]
    masks[group_index][list(merged_into)] = False
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        dense = model(x)
        merged = materialize(merged_model, graph, masks).eval()(x)
        removed = materialize(model, graph, masks).eval()(x)
    # Relative to the logits' scale: torchvision's initial MobileNet answers ~1e-11.
    scale = float(dense.abs().max())
    assert float((merged - dense).abs().max()) <= 1e-5 * scale
    assert float((removed - dense).abs().max()) > 1e-3 * scale


def test_grouped_consumers_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    with pytest.raises(NotApplicable, match="grouped conv"):
        functional.check(model, graph, FunctionalParams())


@pytest.mark.parametrize("budget_text", ["flops=0.5", "params=0.4"])
def test_the_threshold_bisection_meets_the_budget_closely(budget_text):
    model, graph, cost = resnet20_setup()
    randomize_norms(model)
    budget = BudgetCost(parse_budget(budget_text), cost)
    selection = functional.run(context(model, graph, cost, budget, evaluate=False))
    spent = budget.hard(selection.keep_counts)
    assert spent <= budget.target
    # One more merge at a time: the first threshold that fits leaves little of the budget unused.
    assert spent >= 0.97 * budget.target
    assert 0 < selection.info["delta"] < functional.MAX_DELTA


def test_a_latency_budget_is_fitted_on_the_predictor():
    model, graph, cost = resnet20_setup()
    randomize_norms(model)
    latency = FakeLatency(cost, ms_per_mmac=1.0)
    # Under 0.5: removing the channels that are dead on the calibration batch (free, at threshold 0) costs ~0.53.
    target = 0.45 * float(cost.dense_macs) / 1e6
    budget = BudgetCost(Budget("latency_ms", target, "fake"), cost, latency)
    selection = functional.run(context(model, graph, cost, budget, evaluate=False))
    assert 0.95 * target <= budget.hard(selection.keep_counts) <= target


class CancelAfter:
    """should_cancel that answers True on its `calls`-th call (once)."""

    def __init__(self, calls: int):
        self.calls, self.seen = calls, 0

    def __call__(self) -> bool:
        self.seen += 1
        return self.seen == self.calls


def test_a_cancelled_run_resumes_to_the_uninterrupted_selection(tmp_path):
    model, graph, cost = resnet20_setup()
    randomize_norms(model)
    budget = BudgetCost(parse_budget("flops=0.5"), cost)
    loader = random_loader(32)  # batches of 8: four calibration checks, then one per group while clustering
    whole = functional.run(context(model, graph, cost, budget, loader, calibration_samples=32, evaluate=False))
    ctx = context(model, graph, cost, budget, random_loader(32), calibration_samples=32, evaluate=False)
    ctx.checkpoint_dir, ctx.should_cancel = tmp_path, CancelAfter(7)
    events = []
    ctx.progress = events.append
    with pytest.raises(Cancelled):
        functional.run(ctx)
    assert (tmp_path / functional.STATS_FILE).exists()
    assert [e["phase"] for e in events].count("cluster") == 2
    # The resumed run reads the saved statistics: a loader that fails when iterated proves it.
    ctx.should_cancel, ctx.train_loader = None, FailingLoader()
    resumed = functional.run(ctx)
    assert all(torch.equal(a, b) for a, b in zip(whole.keep_masks, resumed.keep_masks, strict=True))
    assert resumed.info["delta"] == whole.info["delta"]
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                 resumed.model.state_dict().values(), strict=True))


class FailingLoader:
    def __iter__(self):
        raise AssertionError("the calibration statistics should have been read from the checkpoint")


def small_digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "epochs", "budget_text"), [("small_cnn", 6, "flops=0.5"),
                                                             ("resnet20", 2, "flops=0.7")])
def test_merging_beats_removing_on_a_trained_network_before_fine_tuning(arch, epochs, budget_text):
    # resnet20: ~40 s on a quiet 2-core machine (0.93 dense, ~0.69 merged, ~0.18 removed); the 3-layer CNN trains
    # in seconds (0.96 dense, ~0.79 merged, 0.10 removed).
    splits = load_dataset("builtin:digits", resolution=8)
    train_loader, val_loader, _ = make_loaders(splits, batch_size=64, seed=0)
    torch.manual_seed(0)
    model = small_digits_cnn() if arch == "small_cnn" else zoo.build_model(arch, splits.num_classes, 1)
    train(model, train_loader, epochs, lr=0.05, device="cpu", seed=0)
    graph = ChannelGraph.build(model.eval(), (1, 1, 8, 8))
    cost = CostModel(graph)
    budget = BudgetCost(parse_budget(budget_text), cost)
    # Calibration in a fixed order, so that the ablation below clusters the same images.
    ctx = context(model, graph, cost, budget, DataLoader(splits.train, batch_size=64))
    ctx.val_loader = val_loader
    info = functional.run(ctx).info
    assert info["accuracy_before_finetune"] > 0.5, info  # a trained network, so the comparison means something
    assert info["accuracy_before_finetune_unmerged"] < info["accuracy_before_finetune"] - 0.1, info
    ctx.params = FunctionalParams(merge=False)
    ablation = functional.run(ctx).info
    assert ablation["accuracy_before_finetune"] == pytest.approx(info["accuracy_before_finetune_unmerged"])
    assert ablation["keep_counts"] == info["keep_counts"]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "resolution"), [("resnet20", 8), ("resnet56", 8), ("resnet18", 16),
                                                  ("mobilenet_v2", 16)])
def test_every_architecture_prunes_and_materializes(built, arch, resolution):
    model, graph, cost = built(arch, resolution)
    budget = BudgetCost(parse_budget("flops=0.6"), cost)
    loader = random_loader(16, batch=8, classes=10, resolution=resolution)
    selection = functional.run(context(model, graph, cost, budget, loader, calibration_samples=16, evaluate=False))
    masks, _ = trim_masks(selection.scores, selection.keep_masks, budget.fits)
    assert budget.fits([int(m.sum()) for m in masks])
    assert selection.info["channels_removed"] > 0
    pruned = materialize(selection.model, graph, masks).eval()
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, resolution, resolution)).shape == (2, 10)
    # Only the consumers' input slices change: every producer and norm keeps its dense weights.
    consumers = {s.layer + ".weight" for g in graph.groups for s in functional.consumers(model, g)}
    dense = model.state_dict()
    changed = {k for k, v in selection.model.state_dict().items() if not torch.equal(v, dense[k])}
    assert changed and changed <= consumers


def test_pipeline_meets_a_flops_budget(tmp_path):
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x8", method="functional", budget=Budget("flops", 0.5),
                           epochs=0, finetune_epochs=0, resolution=8, params={"calibration_samples": 32})
    report = run_prune(request, tmp_path)
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    info = report["method_info"]
    assert "accuracy_before_finetune" in info and info["score_scale"] == "per_group"


def test_pipeline_meets_a_latency_budget(tmp_path):
    latency = PipelineLatency("resnet20", 8, 3, bias=1.2)
    target = 0.5 * float(latency.cost_model.dense_macs) / 1e6
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x8", method="functional",
                           budget=Budget("latency_ms", target, "fake"), epochs=0, finetune_epochs=0, resolution=8,
                           params={"calibration_samples": 32})
    report = run_prune(request, tmp_path, latency=latency)
    assert report["latency_ms"]["pruned"]["measured"] <= target * 1.05
