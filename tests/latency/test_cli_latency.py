from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LATPRUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def invoke(*args):
    return runner.invoke(app, list(args))


def test_device_add_list_and_errors(home):
    ok = invoke("device", "add", "cpu1", "--runtime", "onnxruntime", "--provider", "cpu", "--threads", "1",
                "--batch", "1", "--resolution", "16")
    assert ok.exit_code == 0, ok.output
    assert json.loads((home / "devices" / "cpu1.json").read_text())["resolutions"] == [16]
    listed = invoke("device", "list")
    assert listed.exit_code == 0 and "cpu1" in listed.output
    again = invoke("device", "add", "cpu1")
    assert again.exit_code != 0 and "exists" in again.output and "Traceback" not in again.output
    bad = invoke("device", "add", "x", "--provider", "nosuch")
    assert bad.exit_code != 0 and "unknown onnxruntime provider" in bad.output
    missing = invoke("profile", "--device", "nope", "--arch", "resnet20", "--samples", "2")
    assert missing.exit_code != 0 and "unknown device 'nope'" in missing.output
    no_profile = invoke("predictor", "fit", "--device", "cpu1", "--arch", "resnet20")
    assert no_profile.exit_code != 0 and "no profile" in no_profile.output


@pytest.mark.slow
def test_profile_fit_eval_and_load_for_the_engine(home, tmp_path):
    assert invoke("device", "add", "cpu1", "--resolution", "16").exit_code == 0
    bad_arch = invoke("profile", "--device", "cpu1", "--arch", "nosuchnet", "--samples", "3")
    assert bad_arch.exit_code != 0 and "unknown architecture" in bad_arch.output
    prof = invoke("profile", "--device", "cpu1", "--arch", "resnet20", "--samples", "14", "--repeat-share", "0.2")
    assert prof.exit_code == 0, prof.output
    assert "measured 14" in prof.output and "repeatability" in prof.output
    resumed = invoke("profile", "--device", "cpu1", "--arch", "resnet20", "--samples", "14")
    assert resumed.exit_code == 0 and "measured 0, already there 14" in resumed.output

    fit = invoke("predictor", "fit", "--device", "cpu1", "--arch", "resnet20")
    assert fit.exit_code == 0, fit.output
    assert (home / "predictors" / "cpu1" / "resnet20_r16.safetensors").is_file()
    report_path = tmp_path / "eval.json"
    ev = invoke("predictor", "eval", "--device", "cpu1", "--arch", "resnet20", "--json", str(report_path))
    assert ev.exit_code == 0, ev.output
    for label in ("LPNet", "FLOPs-linear", "lookup table", "repeatability floor"):
        assert label in ev.output
    report = json.loads(report_path.read_text())
    assert set(report["predictors"]) == {"lpnet", "flops_linear", "lookup_table", "repeatability_floor"}
    assert report["test_samples"] >= 1 and report["learning_curve"]
    listed = invoke("predictor", "list")
    assert listed.exit_code == 0 and "resnet20" in listed.output

    from latency.store import load_latency_model
    from pruning import surgery

    model = load_latency_model(home, "cpu1", "resnet20", 16)
    ratios = torch.full((len(model.group_sizes),), 0.5, requires_grad=True)
    predicted = model.predict_ms(ratios.unsqueeze(0))
    assert predicted.shape == (1,) and float(predicted.detach()) > 0
    predicted.sum().backward()
    assert ratios.grad is not None and ratios.grad.abs().sum() > 0
    from latency.profiler import ProfileTarget

    target = ProfileTarget.build("resnet20", 16)
    onnx_path = surgery.export_onnx(target.model(target.group_sizes), tmp_path / "dense.onnx", (1, 3, 16, 16))
    assert model.measure_ms(str(onnx_path)) > 0
    small = surgery.export_onnx(target.model([1] * len(target.group_sizes)), tmp_path / "small.onnx",
                                (1, 3, 16, 16))
    relative = model.time_relative(str(small), str(onnx_path))
    assert relative.reference is not None and relative.reference.runs == relative.sample.runs
    assert relative.ratio == relative.sample.p10_ms / relative.reference.p10_ms
    before = float(model.predict_ms(torch.ones(len(model.group_sizes))))
    scale = model.calibrate()
    after = float(model.predict_ms(torch.ones(len(model.group_sizes))))
    assert after == pytest.approx(before * scale, rel=1e-4)
    with pytest.raises(ValueError, match="no latency predictor"):
        load_latency_model(home, "cpu1", "resnet20", 32)
