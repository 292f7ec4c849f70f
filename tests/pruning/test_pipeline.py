import json

import pytest
import torch

from pruning.budget import Budget
from pruning.oracle import DeviceOracle
from pruning.pipeline import PruneRequest, run_prune


class PredictOnly(DeviceOracle):
    """A latency predictor with no device to measure on (the worker is not the target device)."""

    def predict_ms(self, keep_ratios: torch.Tensor) -> torch.Tensor:
        return keep_ratios.float().mean(dim=-1) * 2.0


def test_latency_budget_with_a_predict_only_model_reports_no_measurement(tmp_path):
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="l1",
                           budget=Budget("latency_ms", 1.0, "remote"), epochs=0, finetune_epochs=0)
    report = run_prune(request, tmp_path, latency=PredictOnly())
    assert report["latency_ms"]["pruned"]["measured"] is None
    assert report["latency_ms"]["dense"]["measured"] is None
    assert report["latency_ms"]["dense"]["predicted"] == 2.0
    assert report["latency_ms"]["pruned"]["predicted"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text())["pruned"]["macs"] < report["dense"]["macs"]
    assert not (tmp_path / "dense.onnx").exists()


REFUSING_METHOD = '''
from pruning.methods.api import NotApplicable
from pruning.registry import MethodParams, register_method


@register_method("refuses_resnets", target="refusing_method:run")
class RefusingParams(MethodParams):
    """Refuses every architecture with a residual stream."""


def check(model, graph, params):
    raise NotApplicable(f"refuses_resnets cannot prune {type(model).__name__}: it has residual streams")


def run(ctx):
    raise AssertionError("a refused method must not run")
'''


def test_a_method_that_cannot_prune_the_architecture_fails_before_any_training(tmp_path, monkeypatch):
    from pruning import pipeline
    from pruning.methods.api import NotApplicable
    from pruning.registry import METHODS, PLUGINS_ENV

    (tmp_path / "refusing_method.py").write_text(REFUSING_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(PLUGINS_ENV, "refusing_method")
    trained = []
    monkeypatch.setattr(pipeline, "train", lambda *args, **kwargs: trained.append(kwargs.get("stage")))
    request = PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="refuses_resnets",
                           budget=Budget("flops", 0.5), epochs=1)
    try:
        with pytest.raises(NotApplicable, match="residual streams"):
            run_prune(request, tmp_path / "out")
    finally:
        METHODS.forget("refuses_resnets")
    assert trained == [] and not (tmp_path / "out" / "report.json").exists()
