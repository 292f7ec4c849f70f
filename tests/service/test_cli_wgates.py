"""`latprune prune --method wgates` end to end: a FLOPs budget, and a latency budget on a freshly profiled device."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from service.cli import app

# Every test here runs real workers or jobs: seconds to minutes each.
pytestmark = pytest.mark.slow

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_wgates_with_a_flops_budget(tmp_path):
    out = tmp_path / "out"
    result = invoke("prune", "--arch", "resnet20", "--dataset", "builtin:digits", "--method", "wgates",
                    "--budget", "flops=0.5", "--epochs", "1", "--resolution", "16", "--param", "hidden=16",
                    "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "wgates" and report["params"]["hidden"] == 16
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    assert report["method_info"]["steps"] > 0
    assert report["keep_counts"] != report["group_sizes"]
    for name in ("model.onnx", "model.safetensors", "arch.json"):
        assert (out / name).is_file()


def test_cli_wgates_rejects_bad_params(tmp_path):
    result = invoke("prune", "--arch", "resnet20", "--dataset", "builtin:digits", "--method", "wgates",
                    "--budget", "flops=0.5", "--param", "gate_lr=-1", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "gate_lr" in result.output
    assert not (tmp_path / "out" / "report.json").exists()


def test_cli_wgates_with_a_latency_budget(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LATPRUNE_HOME", str(home))
    assert invoke("device", "add", "cpu1", "--threads", "1", "--resolution", "16").exit_code == 0
    profiled = invoke("profile", "--device", "cpu1", "--arch", "resnet20", "--samples", "12", "--repeat-share", "0")
    assert profiled.exit_code == 0, profiled.output
    fitted = invoke("predictor", "fit", "--device", "cpu1", "--arch", "resnet20")
    assert fitted.exit_code == 0, fitted.output

    from latency.store import load_latency_model

    latency = load_latency_model(home, "cpu1", "resnet20", 16)
    dense_ms = float(latency.predict_ms(torch.ones(len(latency.group_sizes))))
    smallest_ms = float(latency.predict_ms(1.0 / torch.tensor(latency.group_sizes, dtype=torch.float32)))
    # At 16x16 most of the latency is per-layer overhead: aim between the smallest configuration and dense.
    target_ms = smallest_ms + 0.4 * (dense_ms - smallest_ms)
    out = tmp_path / "out"
    result = invoke("prune", "--arch", "resnet20", "--dataset", "builtin:digits", "--method", "wgates",
                    "--budget", f"latency_ms={target_ms:.4f}@cpu1", "--epochs", "1", "--finetune-epochs", "0",
                    "--resolution", "16", "--out", out)
    assert result.exit_code == 0, result.output
    assert "measured ms" in result.output
    report = json.loads((out / "report.json").read_text())
    section = report["latency_ms"]
    assert section["target"] == float(f"{target_ms:.4f}")
    assert section["dense"]["predicted"] > 0 and section["dense"]["measured"] > 0
    assert section["pruned"]["measured"] > 0
    measurements = section["measurements"]
    assert measurements[0]["action"] == "initial" and len(measurements) >= 1 + section["rounds"]
    assert all(m["measured_ms"] > 0 and m["predicted_ms"] > 0 for m in measurements)
    # The model shipped is the last configuration measured (or the restored one).
    assert report["keep_counts"] == measurements[-1]["keep_counts"]
    assert section["pruned"]["predicted"] == measurements[-1]["predicted_ms"]
    assert report["pruned"]["macs"] < report["dense"]["macs"]
