"""DAIS: annealed indicators that binarize, alphas trained on held-out data only, exact resume of the schedule,
every budget kind, every architecture family, and the pipeline end to end."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruning import zoo
from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.methods import dais
from pruning.methods.api import MethodContext, NotApplicable
from pruning.methods.dais_params import DAISParams
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.surgery import materialize
from pruning.train import Cancelled, checkpoint_path
from tests.pruning.helpers import CancelAfter
from tests.pruning.test_wgates import FakeLatency, PipelineLatency, tiny_setup


def resnet20_8px():
    torch.manual_seed(0)
    model = zoo.build_model("resnet20", 4, 3).eval()
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    return model, graph, CostModel(graph)


def tagged_loader(n: int, batch: int, seed: int, shuffle: bool = True) -> DataLoader:
    """Random 8x8 images whose first pixel identifies the sample (normal draws are distinct almost surely)."""
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen))
    if not shuffle:
        return DataLoader(data, batch_size=batch, shuffle=False)
    return DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))


def context(budget_text: str = "flops=0.5", setup=tiny_setup, latency=None, epochs: int = 3,
            checkpoint_dir=None, should_cancel=None, **params) -> MethodContext:
    model, graph, cost = setup()
    budget = BudgetCost(parse_budget(budget_text), cost, latency(cost) if latency else None)
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget, params=DAISParams(**params),
                         train_loader=tagged_loader(32, 8, seed=1), val_loader=tagged_loader(20, 8, seed=2,
                                                                                             shuffle=False),
                         device=torch.device("cpu"), epochs=epochs, lr=0.01, seed=3,
                         checkpoint_dir=checkpoint_dir, should_cancel=should_cancel)


class Captured:
    """Records every IndicatorSearch that dais.run builds (monkeypatched in place of the class)."""

    def __init__(self):
        self.searches: list[dais.IndicatorSearch] = []
        self.build = dais.IndicatorSearch

    def __call__(self, *args, **kwargs) -> dais.IndicatorSearch:
        search = self.build(*args, **kwargs)
        self.searches.append(search)
        return search


# ---- params and registration ---------------------------------------------------------------------------------------

def test_dais_is_registered_as_a_training_method_with_validated_params():
    info = get_method("dais")
    assert info.target == "pruning.methods.dais:run" and info.trains
    assert "Annealing" in info.description
    assert info.validate_params({"anneal_factor": 10}).anneal_factor == 10
    for bad in ({"temperature_init": math.nan}, {"band": math.inf}, {"anneal_factor": 0.5}, {"alpha_lr": -1.0},
                {"budget_weight": -math.inf}):
        with pytest.raises(ValidationError) as error:
            info.validate_params(bad)
        assert next(iter(bad)) in str(error.value)
    with pytest.raises(ValidationError, match="unknown_knob"):
        info.validate_params({"unknown_knob": 1})


def test_check_rejects_a_model_without_prunable_groups():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    with pytest.raises(NotApplicable, match="no prunable channel groups"):
        dais.check(model, graph, DAISParams())
    dais.check(*tiny_setup()[:2], DAISParams())


# ---- the pieces ----------------------------------------------------------------------------------------------------

def test_temperature_falls_geometrically_by_the_anneal_factor():
    assert dais.temperature_at(0, 100, 2.0, 50.0) == pytest.approx(2.0)
    assert dais.temperature_at(50, 100, 2.0, 50.0) == pytest.approx(2.0 / math.sqrt(50.0))
    assert dais.temperature_at(100, 100, 2.0, 50.0) == pytest.approx(2.0 / 50.0)
    assert dais.temperature_at(150, 100, 2.0, 50.0) == pytest.approx(2.0 / 50.0)


def test_band_term_is_zero_inside_the_band_and_logarithmic_outside():
    cost = torch.tensor([90.0, 97.0, 100.0, 103.0, 110.0], requires_grad=True)
    term = dais.band_term(cost, 100.0, 0.05)
    assert term.tolist()[1:4] == [0.0, 0.0, 0.0]
    assert term[0].item() == pytest.approx(math.log(95 / 90), rel=1e-5)
    assert term[4].item() == pytest.approx(math.log(110 / 105), rel=1e-5)
    term.sum().backward()
    assert cost.grad[0] < 0 < cost.grad[4] and cost.grad[2] == 0


def test_indicators_multiply_each_groups_channels_and_closed_indicators_equal_the_materialized_model():
    model, graph, cost = resnet20_8px()
    budget = BudgetCost(parse_budget("flops=0.5"), cost)
    search = dais.IndicatorSearch(model, graph, budget, tagged_loader(8, 4, 0), DAISParams(), 10, 0,
                                  torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        search.alpha.copy_(torch.randn(search.alpha.shape, generator=gen))
    search.temperature = 1e-4  # indicators exactly 0 or 1
    masks = dais.keep_masks(search.alphas())
    x = torch.randn(2, 3, 8, 8, generator=gen)
    search.attach(model)
    try:
        with torch.no_grad():
            gated = model.eval()(x)
    finally:
        search.detach()
    pruned = materialize(model, graph, masks).eval()
    assert sum(int(m.sum()) for m in masks) < sum(graph.sizes)
    with torch.no_grad():
        assert float((pruned(x) - gated).abs().max()) <= 1e-4


def test_alpha_step_changes_alpha_only_and_leaves_weights_and_bn_statistics_alone():
    model, graph, cost = resnet20_8px()
    budget = BudgetCost(parse_budget("flops=0.3"), cost)
    search = dais.IndicatorSearch(model, graph, budget, tagged_loader(16, 8, 0), DAISParams(), 10, 0,
                                  torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alpha = search.alpha.clone()
    search.attach(model)
    try:
        model.train()
        search.alpha_step(model)
    finally:
        search.detach()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(alpha, search.alpha) and not search.alpha.requires_grad
    assert search.val_position == 1 and search.soft_cost > 0


def test_held_out_batches_of_one_sample_are_skipped():
    search = dais.IndicatorSearch(*tiny_setup()[:2], BudgetCost(parse_budget("flops=0.5"), tiny_setup()[2]),
                                  tagged_loader(9, 4, 0, shuffle=False), DAISParams(), 10, 0, torch.device("cpu"))
    sizes = [len(search.next_val_batch()[0]) for _ in range(3)]
    assert sizes == [4, 4, 4] and search.val_position == 4  # 4, 4, (1 skipped), 4


# ---- the mechanism -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("anneal_factor", [50.0, 1.0])
def test_annealing_binarizes_the_indicators_by_the_end_of_the_search(anneal_factor):
    ctx = context("flops=0.5", setup=resnet20_8px, epochs=5, anneal_factor=anneal_factor)
    result = dais.run(ctx)
    share = result.info["binarized_share"]
    if anneal_factor > 1:
        assert share >= 0.99
        assert result.info["temperature"] == pytest.approx(1.0 / 50.0)
        # Binary indicators: the soft cost the alphas were trained against is the kept channels' hard cost.
        assert result.info["soft_cost"] == pytest.approx(result.info["indicator_cost"], rel=0.02)
        assert 0.85 <= result.info["indicator_cost"] / ctx.budget.target <= 1.1
    else:  # the mechanism removed: T stays at 1 and the indicators stay soft
        assert share < 0.5


def test_weights_and_alphas_see_disjoint_data(monkeypatch):
    captured = Captured()
    monkeypatch.setattr(dais, "IndicatorSearch", captured)
    ctx = context("flops=0.5", epochs=2)
    train_tags = set(ctx.train_loader.dataset.tensors[0][:, 0, 0, 0].tolist())
    val_tags = set(ctx.val_loader.dataset.tensors[0][:, 0, 0, 0].tolist())
    assert not train_tags & val_tags
    seen: dict[str, set] = {"weights": set(), "alphas": set()}

    def record(_module, inputs):
        seen[captured.searches[-1].phase].update(inputs[0][:, 0, 0, 0].tolist())

    ctx.model.register_forward_pre_hook(record)
    dais.run(ctx)
    assert seen["weights"] == train_tags  # 2 epochs: every training sample, no held-out one
    assert seen["alphas"] == val_tags  # 8 alpha steps over 3 held-out batches: every held-out sample
    assert captured.searches[-1].val_position == 8


def test_a_latency_budget_drives_the_alphas_through_the_predictor():
    ctx = context("latency_ms=0.02@fake", latency=FakeLatency, setup=resnet20_8px, epochs=3)
    dense_ms = ctx.budget.dense()
    assert ctx.budget.target < 0.6 * dense_ms
    result = dais.run(ctx)
    assert result.info["indicator_cost"] < 0.7 * dense_ms
    assert result.info["target"] == pytest.approx(0.02)
    assert result.score_scale == "global" and [len(s) for s in result.scores] == ctx.graph.sizes


# ---- resume --------------------------------------------------------------------------------------------------------

def test_a_cancelled_search_resumes_to_the_uninterrupted_result_on_the_annealing_schedule(tmp_path, monkeypatch):
    captured = Captured()
    monkeypatch.setattr(dais, "IndicatorSearch", captured)
    whole = dais.run(context(epochs=3))
    cancel = CancelAfter(6)  # 4 steps per epoch: cancelled in the middle of the second epoch
    with pytest.raises(Cancelled):
        dais.run(context(epochs=3, checkpoint_dir=tmp_path, should_cancel=cancel))
    saved = torch.load(checkpoint_path(tmp_path, "dais"), weights_only=True)["regularizer"]
    assert saved["steps_done"] == 6 and saved["val_position"] == 6
    assert saved["temperature"] == pytest.approx(dais.temperature_at(6, 12, 1.0, 50.0))
    assert saved["alpha_optimizer"]["state"][0]["step"] == 6
    resumed = dais.run(context(epochs=3, checkpoint_dir=tmp_path))
    first, _, second = captured.searches
    assert [m.tolist() for m in resumed.keep_masks] == [m.tolist() for m in whole.keep_masks]
    assert all(torch.equal(a, b) for a, b in zip(resumed.scores, whole.scores, strict=True))
    assert second.state_dict()["trace"] == first.state_dict()["trace"]
    assert [row[1] for row in second.trace] == pytest.approx([dais.temperature_at(s, 12, 1.0, 50.0)
                                                              for s in range(1, 13)])
    assert second.val_position == first.val_position == 12
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                 whole.model.state_dict().values(), strict=True))


# ---- architectures and the pipeline --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "resnet18", "mobilenet_v2"])
def test_every_architecture_family_searches_and_materializes(arch):
    resolution = 8 if arch.startswith("resnet") and arch != "resnet18" else 16

    def setup():
        torch.manual_seed(0)
        model = zoo.build_model(arch, 4, 3).eval()
        graph = ChannelGraph.build(model, (1, 3, resolution, resolution))
        return model, graph, CostModel(graph)

    ctx = context("flops=0.5", setup=setup, epochs=1)
    data = TensorDataset(torch.randn(8, 3, resolution, resolution), torch.randint(0, 4, (8,)))
    ctx.train_loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    ctx.val_loader = DataLoader(TensorDataset(torch.randn(4, 3, resolution, resolution), torch.randint(0, 4, (4,))),
                                batch_size=4)
    dais.check(ctx.model, ctx.graph, ctx.params)
    result = dais.run(ctx)
    assert result.info["steps"] == 2 and result.info["val_batches"] == 2
    assert all(m.any() for m in result.keep_masks)
    pruned = materialize(result.model, ctx.graph, list(result.keep_masks))
    assert pruned.eval()(torch.randn(2, 3, resolution, resolution)).shape == (2, 4)


@pytest.mark.slow
def test_pipeline_meets_a_flops_budget(tmp_path):
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="dais", budget=Budget("flops", 0.5),
                           epochs=1, finetune_epochs=1, batch_size=16, resolution=16)
    report = run_prune(request, tmp_path)
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    info = report["method_info"]
    assert info["score_scale"] == "global" and info["steps"] == 8 and info["binarized_share"] >= 0.95
    assert (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_pipeline_meets_a_latency_budget_measured_on_the_device(tmp_path):
    latency = PipelineLatency("resnet20", 16, 3, bias=1.0)
    target = 0.5 * float(latency.cost_model.dense_macs) / 1e6
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="dais",
                           budget=Budget("latency_ms", target, "fake"), epochs=1, finetune_epochs=0,
                           batch_size=16, resolution=16)
    report = run_prune(request, tmp_path, latency=latency)
    section = report["latency_ms"]
    assert section["target"] == pytest.approx(target)
    assert section["pruned"]["measured"] <= target * 1.05
    assert report["method_info"]["target"] == pytest.approx(target)
