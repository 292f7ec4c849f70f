"""W-Gates: weight-dependent gates, straight-through gradients, the budget penalty, exact materialization,
and the measured-latency finisher."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruning import zoo
from pruning.budget import Budget, BudgetCost, parse_budget
from pruning.cost import CostModel
from pruning.groups import ChannelGraph
from pruning.methods import wgates
from pruning.methods.api import MethodContext
from pruning.methods.wgates_params import WGatesParams
from pruning.oracle import DeviceOracle
from pruning.pipeline import PruneRequest, run_prune
from pruning.registry import get_method
from pruning.surgery import materialize, onnx_macs


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that a wrong surgery cannot hide behind identity BNs."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.4 + 0.1)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_cnn().eval()
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    return model, graph, CostModel(graph)


def resnet20_setup():
    """resnet20 at 8x8 (4 classes): residual streams, and channel steps small enough to land in a 5% band."""
    model = zoo.build_model("resnet20", 4, 3).eval()
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    return model, graph, CostModel(graph)


class FakeLatency(DeviceOracle):
    """A differentiable stand-in for a device's LPNet: ms proportional to the MACs; `measure_ms` reads the MACs
    off the exported ONNX and is `bias` times slower than predicted."""

    can_measure = True

    def __init__(self, cost_model: CostModel, ms_per_mmac: float = 1.0, bias: float = 1.0):
        self.cost_model = cost_model
        self.ms_per_mmac = ms_per_mmac
        self.bias = bias
        self.measured: list[float] = []

    def predict_ms(self, keep_ratios: torch.Tensor) -> torch.Tensor:
        counts = keep_ratios[0].double() * self.cost_model.group_sizes
        ms = self.cost_model.macs(counts) / 1e6 * self.ms_per_mmac
        return ms.float().unsqueeze(0)

    def measure_ms(self, onnx_path: str, model=None) -> float:  # noqa: ANN001
        ms = onnx_macs(onnx_path) / 1e6 * self.ms_per_mmac * self.bias
        self.measured.append(ms)
        return ms


def random_loader(n: int = 32, batch: int = 8, classes: int = 4, resolution: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, resolution, resolution, generator=gen),
                         torch.randint(0, classes, (n,), generator=gen))
    return DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_wgates_is_registered_with_validated_params():
    info = get_method("wgates")
    assert info.target == "pruning.methods.wgates:run"
    assert info.validate_params({"hidden": 8}).hidden == 8
    with pytest.raises(ValueError):
        info.validate_params({"gate_lr": -1})


def test_binary_gate_is_a_step_with_straight_through_window():
    s = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    g = wgates.binary_gate(s)
    assert g.tolist() == [0, 0, 0, 1, 1, 1, 1]
    (g * torch.arange(1.0, 8.0)).sum().backward()
    # dg/ds = 1[|s| <= 1]: the upstream gradient passes inside the window only.
    assert s.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]


def test_floor_holds_the_best_channels_open_and_ranks_them_first_for_the_finisher():
    s = torch.tensor([-0.9, -0.2, -0.5, 0.3, -0.1], requires_grad=True)
    g = wgates.floored_gate(s, 3)
    assert g.tolist() == [0, 1, 0, 1, 1]  # 0.3 is open by itself; -0.1 and -0.2 are held open by the floor
    (g * torch.ones(5)).sum().backward()
    assert s.grad.tolist() == [1, 1, 1, 1, 1]  # held or not, the straight-through gradient flows
    ranked = wgates.finisher_scores([s.detach()], [3])[0]
    assert ranked.argsort(descending=True).tolist() == [3, 4, 1, 2, 0]
    assert bool((ranked[[3, 4, 1]] > 50).all()) and bool((ranked[[0, 2]] < 0).all())
    assert wgates.floor_count(16, 0.5) == 8 and wgates.floor_count(16, 0.0) == 1 and wgates.floor_count(3, 0.1) == 1


def test_gate_score_is_a_function_of_the_filter_weights():
    model, graph, _ = tiny_setup()
    gated = wgates.GatedNetwork(model, graph, hidden=8)
    gate_state = copy.deepcopy(gated.gates.state_dict())
    before = [s.detach().clone() for s in gated.scores()]
    with torch.no_grad():
        model[0].weight[3].mul_(-2.0).add_(0.3)
    after = gated.scores()
    assert all(torch.equal(a, b) for a, b in zip(gate_state.values(), gated.gates.state_dict().values(),
                                                 strict=True))
    assert abs(float(after[0][3].detach() - before[0][3])) > 1e-3
    # The second group's filters are untouched, so its scores are too.
    assert torch.allclose(after[1], before[1])
    gated.remove()


def test_budget_penalty_gradients_reach_gate_networks_and_filters():
    model, graph, cost = tiny_setup()
    gated = wgates.GatedNetwork(model, graph, hidden=8)
    gated(torch.randn(2, 3, 8, 8))
    # Only the gates connect the cost to the weights: no task loss in this objective.
    cost.macs(gated.keep_counts()).backward()
    for gate in gated.gates:
        assert gate.net[2].bias.grad is not None and float(gate.net[2].bias.grad) > 0
        assert float(gate.net[0].weight.grad.abs().sum()) > 0
    assert float(model[0].weight.grad.abs().sum()) > 0
    assert float(model[3].weight.grad.abs().sum()) > 0
    gated.remove()
    assert not model[1]._forward_hooks  # the gate hooks are gone: the bare model is back


def test_keep_counts_without_the_filters_stop_the_penalty_at_the_gate_networks():
    model, graph, cost = tiny_setup()
    gated = wgates.GatedNetwork(model, graph, hidden=8)
    gated(torch.randn(2, 3, 8, 8))
    gate_only = gated.scores(through_filters=False)
    assert torch.equal(gated.keep_counts(gate_only), gated.keep_counts())
    cost.macs(gated.keep_counts(gate_only)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(float(gate.net[2].bias.grad) > 0 for gate in gated.gates)
    gated.remove()


def test_scores_without_the_filters_keep_the_range_term_off_them():
    model, graph, _ = tiny_setup()
    gated = wgates.GatedNetwork(model, graph, hidden=8)
    assert all(torch.allclose(a, b) for a, b in zip(gated.scores(through_filters=False), gated.scores(), strict=True))
    sum(s.sum() for s in gated.scores(through_filters=False)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(float(gate.net[0].weight.grad.abs().sum()) > 0 for gate in gated.gates)
    sum(s.sum() for s in gated.scores()).backward()
    assert float(model[0].weight.grad.abs().sum()) > 0  # the full scores do reach the filters
    gated.remove()


def test_range_term_averages_each_group_so_a_wide_gate_network_stays_in_the_window(monkeypatch):
    scores = [torch.full((8,), 3.0), torch.full((64,), -3.0), torch.zeros(16)]
    assert float(wgates.range_term(scores)) == pytest.approx(4.0)  # 2 + 2 + 0, whatever the widths

    def wide_cnn() -> nn.Module:  # one group of 512 channels sharing a gate network
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 4))

    monkeypatch.setattr(f"{__name__}.tiny_cnn", wide_cnn)
    # A large L1-norm skip weight starts many scores outside the window, where only the range term moves them.
    result = wgates.run(method_context("flops=0.5", epochs=3, norm_weight=5.0))
    raw = [torch.where(s > wgates.FLOOR_RANK / 2, s - wgates.FLOOR_RANK, s) for s in result.scores]
    assert max(float(s.abs().max()) for s in raw) < 5.0


def test_gated_model_with_closed_gates_equals_materialized_model():
    torch.manual_seed(0)
    model = zoo.build_model("resnet20", 10, 3).eval()
    randomize_norms(model)
    graph = ChannelGraph.build(model, (1, 3, 16, 16))
    gated = wgates.GatedNetwork(model, graph, hidden=8).eval()
    with torch.no_grad():
        for gate, group in zip(gated.gates, graph.groups, strict=True):
            gate.norm_weight.fill_(0.0)
            gate.net[2].weight.normal_(std=1.0)
            # Put every group's threshold at its median score: about half of the gates close.
            raw = gate(wgates.filter_vectors(model, group))
            gate.net[2].bias.sub_(raw.median() + 1e-4)
        masks = wgates.final_masks(gated.scores(), gated.floors)
        assert all(0 < int(m.sum()) < m.numel() for m in masks)
        x = torch.randn(4, 3, 16, 16)
        gated_out = gated(x)
        gated.remove()
        pruned = materialize(model, graph, masks).eval()
        assert [p.shape for p in pruned.parameters()] != [p.shape for p in model.parameters()]
        assert float((pruned(x) - gated_out).abs().max()) <= 1e-4


def method_context(budget_text: str, latency=None, epochs: int = 3, setup=tiny_setup, **params) -> MethodContext:
    model, graph, cost = setup()
    budget = BudgetCost(parse_budget(budget_text), cost, latency(cost) if latency else None)
    loader = random_loader()
    return MethodContext(model=model, graph=graph, cost_model=cost, budget=budget,
                         params=WGatesParams(**params), train_loader=loader, val_loader=loader,
                         device=torch.device("cpu"), epochs=epochs, lr=0.01)


def test_latency_penalty_lowers_predicted_latency_in_a_few_steps():
    ctx = method_context("latency_ms=0.03@fake", latency=FakeLatency, epochs=3, gate_lr=0.5, anneal_share=0.3)
    dense_ms = ctx.budget.dense()
    assert ctx.budget.target < 0.6 * dense_ms
    result = wgates.run(ctx)
    counts = [int(m.sum()) for m in result.keep_masks]
    assert result.info["steps"] == 12
    assert ctx.budget.hard(counts) < 0.8 * dense_ms
    # The trace of the training cost falls as the penalty closes gates.
    trace = result.info["cost_trace"]
    assert trace[-1] < trace[0]
    assert result.score_scale == "global" and result.scales is None
    assert [len(s) for s in result.scores] == ctx.graph.sizes


def test_on_device_checks_move_the_gates_target_by_the_measured_bias():
    ctx = method_context("latency_ms=0.04@fake", latency=lambda cost: FakeLatency(cost, bias=1.5), epochs=4,
                         gate_lr=0.5, anneal_share=0.25, latency_checks=2)
    result = wgates.run(ctx)
    checks = result.info["latency_checks"]
    assert len(checks) == 2 and [c["step"] for c in checks] == sorted(c["step"] for c in checks)
    # The fake device is 1.5x slower than its predictor, which the drift-corrected checks recover exactly.
    assert all(c["measured_ms"] == pytest.approx(1.5 * c["predicted_ms"], rel=1e-4) for c in checks)
    assert result.info["latency_correction"] == pytest.approx(1.5, rel=1e-4)
    assert wgates.latency_check_steps(10, 40, 2) == {10, 24} and wgates.latency_check_steps(10, 40, 0) == set()


def test_flops_budget_uses_the_same_penalty_path():
    ctx = method_context("flops=0.4", epochs=3, gate_lr=0.5, anneal_share=0.3)
    result = wgates.run(ctx)
    counts = [int(m.sum()) for m in result.keep_masks]
    assert ctx.budget.hard(counts) < ctx.budget.dense()
    assert result.info["target"] == pytest.approx(0.4 * ctx.cost_model.dense_macs)
    assert result.round_to == 1


def test_short_schedules_train_the_gates_on_smaller_batches():
    assert wgates.gate_batch_size(1259, 64, 1, 100) == 16  # digits: 19 steps at 64, 78 at 16
    assert wgates.gate_batch_size(1259, 64, 2, 100) == 25
    assert wgates.gate_batch_size(50_000, 64, 1, 100) == 64  # already enough steps
    assert wgates.gate_batch_size(1259, 64, 1, 0) == 64
    assert wgates.gate_batch_size(1259, 8, 1, 1000) == 8  # never larger than the job's
    loader = random_loader(n=64, batch=32)
    small = wgates.gate_loader(loader, epochs=1, min_steps=8, seed=0)
    assert small.batch_size == 16 and len(small) == 4 and small.dataset is loader.dataset
    assert wgates.gate_loader(loader, epochs=1, min_steps=0, seed=0) is loader
    ctx = method_context("flops=0.5", epochs=2, min_gate_steps=8)
    ctx.train_loader = random_loader(n=64, batch=32)
    assert wgates.run(ctx).info["steps"] == 8  # 2 epochs of 4 batches of 16, not 2 of 2 batches of 32


class PipelineLatency(FakeLatency):
    """FakeLatency for run_prune: builds its cost model lazily from the dense model the pipeline trains."""

    def __init__(self, arch: str, resolution: int, in_channels: int, bias: float):
        model = zoo.build_model(arch, 10, in_channels).eval()
        super().__init__(CostModel(ChannelGraph.build(model, (1, in_channels, resolution, resolution))),
                         ms_per_mmac=1.0, bias=bias)


@pytest.mark.slow
def test_pipeline_remeasures_and_trims_a_latency_budget(tmp_path):
    latency = PipelineLatency("resnet20", 16, 1, bias=1.6)
    dense_ms = float(latency.cost_model.dense_macs) / 1e6
    target = 0.5 * dense_ms
    request = PruneRequest(arch="resnet20", dataset="builtin:digits", method="wgates",
                           budget=Budget("latency_ms", target, "fake"), epochs=1, finetune_epochs=0,
                           resolution=16, params={"gate_lr": 0.2, "latency_checks": 0})
    report = run_prune(request, tmp_path, latency=latency)
    section = report["latency_ms"]
    assert section["target"] == pytest.approx(target)
    assert section["rounds"] >= 1 and section["channels_trimmed"] > 0
    first, last = section["measurements"][0], section["measurements"][-1]
    assert first["measured_ms"] > target * 1.05
    # The finisher accepts readings up to half the job's 5% tolerance over, a margin for the final re-measure.
    assert section["accept_over"] == pytest.approx(0.025) and last["measured_ms"] <= target * 1.025
    assert section["accept_under"] == pytest.approx(0.025)
    assert section["pruned"]["measured"] == pytest.approx(last["measured_ms"], rel=1e-6)
    assert section["dense"]["measured"] == pytest.approx(dense_ms * 1.6, rel=1e-6)
    assert section["pruned"]["predicted"] == pytest.approx(last["predicted_ms"], rel=1e-6)
    assert report["keep_counts"] == last["keep_counts"]
    # The final re-measure agrees with the finisher's last measurement, so it is taken once.
    assert section["pruned"]["readings_ms"] == [pytest.approx(last["measured_ms"], rel=1e-6)]
    assert "post_finetune_trim" not in section  # the final reading is within the band
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["latency_ms"]["rounds"] == section["rounds"]
    assert saved["method_info"]["score_scale"] == "global"


class SlowerAfterFinisher(PipelineLatency):
    """A device on which pruned models read `slowdown` times slower once `slow` is set (after the finisher), while
    the dense model does not: what the ratio to the dense model cannot cancel."""

    def __init__(self, *args, slowdown: float = 1.3, **kwargs):
        super().__init__(*args, **kwargs)
        self.slowdown, self.slow = slowdown, False

    def measure_ms(self, onnx_path: str, model=None) -> float:  # noqa: ANN001
        macs = onnx_macs(onnx_path)
        factor = self.slowdown if self.slow and macs < 0.99 * float(self.cost_model.dense_macs) else 1.0
        return macs / 1e6 * self.ms_per_mmac * self.bias * factor


def prune_slower_after_finisher(latency: SlowerAfterFinisher, out) -> tuple[dict, float]:
    """(report, target ms) of an l1 job at half the dense latency on `latency`, slowed once the finisher is done."""
    from pruning.pipeline import STAGE_SPAN

    target = 0.5 * float(latency.cost_model.dense_macs) / 1e6

    def progress(event):
        if event["stage"] == "prune" and event["fraction"] == STAGE_SPAN["prune"][1]:
            latency.slow = True  # the finisher is done; the final reading comes next

    request = PruneRequest(arch="resnet20", dataset="builtin:digits", method="l1",
                           budget=Budget("latency_ms", target, "fake"), epochs=0, finetune_epochs=1,
                           resolution=16, seed=1)
    return run_prune(request, out, progress=progress, latency=latency), target


@pytest.mark.slow
def test_pipeline_trims_the_fine_tuned_model_when_the_final_reading_is_over_the_budget(tmp_path, monkeypatch):
    from pruning import pipeline

    trained = []  # (stage, parameter shapes before, whether the weights moved)
    real_train = pipeline.train

    def recording_train(model, *args, **kwargs):
        before = [p.detach().clone() for p in model.parameters()]
        result = real_train(model, *args, **kwargs)
        moved = any(not torch.equal(a, b.to(a.device)) for a, b in zip(before, model.parameters(), strict=True))
        trained.append((kwargs.get("stage"), [p.shape for p in before], moved))
        return result

    monkeypatch.setattr(pipeline, "train", recording_train)
    report, target = prune_slower_after_finisher(SlowerAfterFinisher("resnet20", 16, 1, bias=1.0), tmp_path)
    section = report["latency_ms"]
    accepted = section["measurements"][-1]
    assert accepted["measured_ms"] <= target * 1.025
    post = section["post_finetune_trim"]
    assert post["measurements"][0]["measured_ms"] > target * 1.05  # the fine-tuned model now reads over
    assert post["channels_trimmed"] > 0 and post["channels_added"] == 0
    assert section["pruned"]["drift_corrected"] <= target * 1.05
    assert sum(report["keep_counts"]) == sum(accepted["keep_counts"]) - post["channels_trimmed"]
    assert report["keep_counts"] == post["measurements"][-1]["keep_counts"]
    # What is delivered is the trimmed model, evaluated and exported after the trim.
    assert onnx_macs(tmp_path / "model.onnx") == pytest.approx(report["pruned"]["macs"], rel=0.05)
    saved, _ = zoo.load_pruned(tmp_path / "arch.json", tmp_path / "model.safetensors")
    assert zoo.param_count(saved) == report["pruned"]["params"]
    # The trimmed model trains one more epoch before it is evaluated: the trim cut into fine-tuned weights.
    assert post["recovery_epochs"] == 1 and report["epochs"]["recovery"] == 1
    assert [stage for stage, _, _ in trained][-2:] == ["finetune", "recovery"]
    _, recovery_shapes, recovery_moved = trained[-1]
    assert recovery_moved and recovery_shapes == [p.shape for p in saved.parameters()]
    assert recovery_shapes != trained[-2][1]  # it trained the trimmed model, not the one the finisher accepted


class SlowSpellAfterFinisher(SlowerAfterFinisher):
    """SlowerAfterFinisher whose slowness lasts only `spell` readings of pruned models once `slow` is set."""

    def __init__(self, *args, spell: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.spell = spell

    def measure_ms(self, onnx_path: str, model=None) -> float:  # noqa: ANN001
        ms = super().measure_ms(onnx_path)
        if self.slow and onnx_macs(onnx_path) < 0.99 * float(self.cost_model.dense_macs):
            self.spell -= 1
            self.slow = self.spell > 0
        return ms


def prune_through_slow_spell(out, spell: int) -> tuple[dict, float, dict, dict]:
    """(report, target ms, its latency section, the finisher's accepted measurement) of prune_slower_after_finisher
    on a device slow for the first `spell` timings of pruned models after the finisher."""
    report, target = prune_slower_after_finisher(SlowSpellAfterFinisher("resnet20", 16, 1, bias=1.0, spell=spell),
                                                 out)
    return report, target, report["latency_ms"], report["latency_ms"]["measurements"][-1]


@pytest.mark.slow
def test_a_slow_spell_after_the_finisher_does_not_trim_the_fine_tuned_model(tmp_path):
    # Each reading times the candidate 5 times: the spell covers the first 3 final readings, not the next ones.
    report, target, section, accepted = prune_through_slow_spell(tmp_path, 15)
    pruned = section["pruned"]
    assert "post_finetune_trim" not in section and report["keep_counts"] == accepted["keep_counts"]
    readings = pruned["readings_ms"]
    assert len(readings) == 6 and all(ms > target * 1.05 for ms in readings[:3])
    assert all(ms == pytest.approx(accepted["measured_ms"], rel=1e-6) for ms in readings[3:])
    assert pruned["finisher_readings_ms"] and pruned["drift_corrected"] == pytest.approx(accepted["measured_ms"])


def channel_total(counts):
    return float(sum(counts))


def test_the_finisher_trims_below_the_floors_in_proportion_to_them():
    from pruning.allocation import trim_masks

    # An inner group (floor 2 of 8) and a residual stream (floor 16 of 32) at their floors; the budget pushed
    # hardest on the stream's gates, so its scores are the lowest.
    inner = torch.tensor([0.4, 0.2, -0.3, -0.5, -0.6, -0.7, -0.8, -0.9])
    stream = -1.0 + torch.linspace(0.5, 0.0, 32)
    floors = [2, 16]
    masks = wgates.final_masks([inner, stream], floors)
    assert [int(m.sum()) for m in masks] == floors
    ranked = wgates.finisher_scores([inner, stream], floors)
    # Half the channels go: each floor loses half, its lowest-scored ones, where by raw score the stream would
    # have lost 9 of its 16 and the inner group none.
    trimmed, removed = trim_masks(ranked, masks, lambda counts: sum(counts) <= 9, normalize=False)
    assert removed == 9 and [int(m.sum()) for m in trimmed] == [1, 8]
    assert bool(trimmed[0][0]) and trimmed[1].nonzero().flatten().tolist() == list(range(8))


def test_budget_floors_lower_the_residual_streams_to_the_inner_share_first():
    sizes, residual = [16, 64], [False, True]
    unlowered = wgates.budget_floors(sizes, residual, 0.25, 1.0, channel_total, 100.0, residual_first=True)
    assert unlowered == ([4, 64], (0.25, 1.0))
    floors, (inner, stream) = wgates.budget_floors(sizes, residual, 0.25, 1.0, channel_total, 34.0,
                                                   residual_first=True)
    assert floors == [4, 30] and inner == 0.25 and 0.25 < stream < 1
    # Past the inner share, both fall together.
    floors, (inner, stream) = wgates.budget_floors(sizes, residual, 0.25, 1.0, channel_total, 10.0,
                                                   residual_first=True)
    assert floors == [2, 8] and inner == stream == pytest.approx(0.125)
    # Even one channel per group over the limit: one channel per group.
    assert wgates.budget_floors(sizes, residual, 0.25, 1.0, channel_total, 1.0, True) == ([1, 1], (0.0, 0.0))


@pytest.mark.parametrize("lowering", [None, "together"])
def test_wgates_lowers_the_residual_streams_first_to_0_9_of_the_budget_unless_told_otherwise(lowering):
    # resnet20's floors (inner groups 25%, residual streams whole) cost 26% of its MACs at 8x8; the budget is 20%.
    params = {"min_gate_steps": 0} | ({"floor_lowering": lowering, "floor_share": 1.0} if lowering else {})
    ctx = method_context("flops=0.2", epochs=1, setup=resnet20_setup, **params)
    cost = ctx.cost_model
    info = wgates.run(ctx).info
    if lowering is None:  # the defaults: the inner floors keep their 25%, the streams give way to 0.9 x the budget
        assert info["floor_min_keep"] == 0.25 and 0.25 < info["floor_residual_min_keep"] < 1
        assert 0.8 * 0.2 * cost.dense_macs < cost.macs(info["floors"]) <= 0.9 * 0.2 * cost.dense_macs
    else:  # the defaults before 9a04480: both shares fall by one factor, to the whole budget
        assert info["floor_min_keep"] < 0.25
        assert info["floor_residual_min_keep"] == pytest.approx(4 * info["floor_min_keep"])
        assert 0.9 * 0.2 * cost.dense_macs < cost.macs(info["floors"]) <= 0.2 * cost.dense_macs


def test_budget_floors_lowered_together_keep_the_floors_shape_by_default():
    sizes, residual = [16, 64], [False, True]
    floors, (inner, stream) = wgates.budget_floors(sizes, residual, 0.25, 1.0, channel_total, 34.0)
    assert floors == [2, 32] and stream == pytest.approx(4 * inner) and 0 < stream < 1
    larger = wgates.group_floors(sizes, residual, inner + 0.005, stream + 0.02)
    assert channel_total(larger) > 34.0  # the largest scale that fits


def test_budget_floors_find_the_largest_fitting_shares_where_the_cost_is_not_monotone():
    sizes, residual = [16, 64], [False, True]

    def bumpy(counts):  # like an LPNet off the channel grid: 33-48 residual channels predict slower than 64
        return float(sum(counts)) + (100.0 if 33 <= counts[1] <= 48 else 0.0)

    # A bisection would try the middle (fits), then above it (in the bump) and settle near half of the stream.
    for residual_first in (True, False):
        floors, _ = wgates.budget_floors(sizes, residual, 0.25, 1.0, bumpy, 67.0, residual_first)
        assert floors == [4, 63]


def test_floors_over_the_budget_pin_the_gates_unless_floor_share_lowers_them():
    fixed = method_context("flops=0.4", epochs=3, gate_lr=0.5, anneal_share=0.3, min_keep=0.9, floor_share=0)
    pinned = wgates.run(fixed).info
    assert (pinned["floor_min_keep"], pinned["floor_residual_min_keep"]) == (0.9, 1.0)
    assert pinned["gate_keep_counts"] == pinned["floors"] and pinned["gate_cost"] > pinned["target"]
    shared = method_context("flops=0.4", epochs=3, gate_lr=0.5, anneal_share=0.3, min_keep=0.9, floor_share=0.8)
    info = wgates.run(shared).info
    assert info["floor_min_keep"] < 0.9 and shared.budget.hard(info["floors"]) <= 0.8 * info["target"]
    assert info["gate_cost"] <= 1.05 * info["target"]


@pytest.mark.parametrize("bias", [0.5, 1.5])
def test_latency_floors_are_sized_by_their_measured_latency(bias):
    params = dict(epochs=1, gate_lr=0.5, min_keep=0.9, floor_share=0.8, latency_checks=0)
    ctx = method_context("latency_ms=0.05@fake", latency=lambda cost: FakeLatency(cost, bias=bias), **params)
    sizes, limit = ctx.graph.sizes, 0.8 * ctx.budget.target
    fixed = wgates.group_floors(sizes, [False] * len(sizes), 0.9, 1.0)
    assert ctx.budget.hard(fixed) > ctx.budget.target  # predicted over the budget either way
    info = wgates.run(ctx).info
    assert info["floor_predicted"] == pytest.approx(ctx.budget.hard(fixed))
    assert info["floor_measured"] == pytest.approx(bias * info["floor_predicted"], rel=1e-4)
    if bias < 1:  # the device is faster than predicted: the floors measure under the budget and stay
        assert info["floors"] == fixed and info["floor_min_keep"] == 0.9
    else:
        assert bias * ctx.budget.hard(info["floors"]) <= limit < bias * ctx.budget.hard(
            wgates.group_floors(sizes, [False] * len(sizes), info["floor_min_keep"] + 0.05, 1.0))


@pytest.mark.parametrize("floor_tolerance", [0.05, 0.0])
def test_floors_within_the_tolerance_of_the_budget_are_left_alone(floor_tolerance):
    probe = method_context("latency_ms=0.05@fake", latency=FakeLatency)
    fixed = wgates.group_floors(probe.graph.sizes, [False] * len(probe.graph.sizes), 0.9, 1.0)
    bias = 1.03 * 0.05 / probe.budget.hard(fixed)  # the floors measure 3% over the budget
    ctx = method_context("latency_ms=0.05@fake", latency=lambda cost: FakeLatency(cost, bias=bias), epochs=1,
                         min_keep=0.9, floor_share=1.0, floor_tolerance=floor_tolerance, latency_checks=0)
    info = wgates.run(ctx).info
    assert info["floor_measured"] == pytest.approx(1.03 * 0.05, rel=1e-4)
    if floor_tolerance > 0.03:
        assert info["floors"] == fixed and info["floor_min_keep"] == 0.9
    else:
        assert info["floor_min_keep"] < 0.9 and bias * ctx.budget.hard(info["floors"]) <= 0.05


@pytest.mark.slow
def test_a_slow_spell_over_every_final_reading_is_rechecked_before_the_report_takes_it(tmp_path):
    # The spell covers all six final readings (5 timings each) and ends before the post-fine-tune trim reads the
    # model: the trim finds it within the band and the report carries that reading, not the slow ones.
    report, target, section, accepted = prune_through_slow_spell(tmp_path, 30)
    pruned = section["pruned"]
    post = section["post_finetune_trim"]
    assert post["channels_trimmed"] == 0 and report["keep_counts"] == accepted["keep_counts"]
    slow = pruned["readings_ms"][:6]
    assert all(ms > target * 1.05 for ms in slow)
    assert pruned["drift_corrected"] == pytest.approx(post["measurements"][0]["measured_ms"])
    assert pruned["drift_corrected"] == pytest.approx(accepted["measured_ms"], rel=1e-6)
    assert pruned["rechecked_readings_ms"] == pruned["readings_ms"][6:]
    assert pruned["ratio_to_dense"] == pytest.approx(pruned["drift_corrected"] / section["dense"]["measured"],
                                                     rel=1e-6)


def test_a_cancelled_gate_training_resumes_to_the_uninterrupted_selection(tmp_path):
    from pruning.train import Cancelled
    from tests.pruning.test_train import cancel_after

    reference = wgates.run(method_context("flops=0.4", epochs=3, gate_lr=0.5, anneal_share=0.3))
    cut = method_context("flops=0.4", epochs=3, gate_lr=0.5, anneal_share=0.3)
    cut.checkpoint_dir, cut.should_cancel = tmp_path, cancel_after(5)
    with pytest.raises(Cancelled):
        wgates.run(cut)
    resumed_ctx = method_context("flops=0.4", epochs=3, gate_lr=0.5, anneal_share=0.3)
    resumed_ctx.checkpoint_dir = tmp_path
    resumed = wgates.run(resumed_ctx)
    assert [m.tolist() for m in resumed.keep_masks] == [m.tolist() for m in reference.keep_masks]
    assert resumed.info["penalty_weight"] == pytest.approx(reference.info["penalty_weight"])
    # The cost trace before the cut comes back from the checkpoint (the schedule's state).
    assert resumed.info["cost_trace"] == pytest.approx(reference.info["cost_trace"], rel=1e-5)
