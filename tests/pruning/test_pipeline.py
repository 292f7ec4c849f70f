import json

import torch

from pruning.budget import Budget
from pruning.pipeline import PruneRequest, run_prune


class PredictOnly:
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
