from __future__ import annotations

import pytest
import torch

from latency.device import make_device
from latency.latency_model import LatencyModel
from latency.lpnet import FitConfig, PredictorError
from latency.lpnet_io import load_predictor
from latency.predictors import evaluate_predictor, fit_predictor
from latency.profiler import ProfileTarget, profile
from latency.samples import SampleStore
from latency.store import LatencyHome, load_latency_model
from pruning.surgery import export_onnx
from tests.latency.conftest import QUICK_PLAN

SMALL = FitConfig(hidden=(16, 16), max_epochs=60, patience=15, members=2)


@pytest.mark.slow
def test_one_predictor_covers_several_resolutions(tmp_path):
    home = LatencyHome(tmp_path)
    spec = make_device(name="cpu1", resolutions=[12, 16])
    home.add_device(spec)
    for res in (12, 16):
        target = ProfileTarget.build("resnet20", res)
        profile(spec, target, SampleStore(home.profile_path("cpu1", "resnet20", res)), 12, repeat_share=0.0,
                plan=QUICK_PLAN)
    assert home.profiled_resolutions("cpu1", "resnet20") == [12, 16]
    stem, meta = fit_predictor(home, "cpu1", "resnet20", config=SMALL)
    assert meta.resolutions == [12, 16] and stem.name == "resnet20_r12-16"
    held = meta.fit_info["held_out"]  # what the console's predicted-vs-measured plot shows
    assert len(held["predicted_ms"]) == len(held["measured_ms"]) == len(meta.test_keys) > 0
    assert set(held["resolution"]) <= {12, 16} and min(held["measured_ms"]) > 0
    net, _ = load_predictor(stem)
    ratios = torch.full((len(meta.group_sizes),), 0.7)
    assert float(net.predict_ms(ratios, 12)) > 0 and float(net.predict_ms(ratios, 16)) > 0
    with pytest.raises(PredictorError, match="say which one"):
        net.predict_ms(ratios)
    model = load_latency_model(tmp_path, "cpu1", "resnet20", 12)
    assert model.resolution == 12 and model.reference_ms == pytest.approx(meta.reference_ms[0])
    report = evaluate_predictor(home, "cpu1", "resnet20", learning_curve=(), config=SMALL)
    assert report["resolutions"] == [12, 16] and report["learning_curve"] == []

    # Timed against the dense architecture at the predictor's resolution, in the units the predictor speaks.
    model.plan = QUICK_PLAN
    target = ProfileTarget.build("resnet20", 12)
    readings = {}
    for name, counts in (("dense", target.group_sizes), ("tiny", [1] * len(target.group_sizes))):
        path = export_onnx(target.model(counts), tmp_path / f"{name}.onnx", (1, 3, 12, 12))
        readings[name] = model.measure_against_dense(path, repeats=2)
        assert readings[name]["ms"] == pytest.approx(readings[name]["ratio"] * model.reference_ms)
    assert 0.7 < readings["dense"]["ratio"] < 1.4 and readings["tiny"]["ratio"] < 0.8 * readings["dense"]["ratio"]


@pytest.mark.slow
def test_torch_runtime_profiles_and_measures_without_onnx(tmp_path, tiny_target):
    spec = make_device(name="torch-cpu", runtime="torch", provider="cpu", threads=1)
    store = SampleStore(tmp_path / "p.jsonl")
    before = torch.get_num_threads()
    result = profile(spec, tiny_target, store, 3, repeat_share=0.0, plan=QUICK_PLAN)
    assert result.measured == 3 and torch.get_num_threads() == before
    assert all(s.fingerprint.runtime == "torch" and s.ratio > 0 for s in store.load())

    home = LatencyHome(tmp_path / "home")
    home.add_device(spec)
    profile(spec, tiny_target, SampleStore(home.profile_path("torch-cpu", "resnet20", 16)), 12, repeat_share=0.0,
            plan=QUICK_PLAN)
    stem, meta = fit_predictor(home, "torch-cpu", "resnet20", config=SMALL)
    net, meta = load_predictor(stem)
    model = LatencyModel(net, meta, spec, 16, plan=QUICK_PLAN)
    assert model.measure_ms(tmp_path / "unused.onnx", model=tiny_target.model(tiny_target.group_sizes)) > 0
    # The torch runtime times the given modules, interleaved: a one-channel-per-group net against the dense one.
    relative = model.time_relative(tmp_path / "a.onnx", tmp_path / "b.onnx",
                                      model=tiny_target.model([1] * len(tiny_target.group_sizes)),
                                      reference_model=tiny_target.model(tiny_target.group_sizes))
    assert relative.reference is not None and 0 < relative.ratio
    with pytest.raises(ValueError, match="arch.json"):
        model.measure_ms(tmp_path / "model.onnx")
