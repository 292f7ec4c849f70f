"""run_cohort: every member exported with its resolution, latency per device, Pareto fronts, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pruning import zoo
from pruning.budget import Budget, BudgetError
from pruning.cohort import member_dir, run_cohort
from pruning.oracle import DeviceOracle
from pruning.pipeline import PruneRequest
from pruning.train import Cancelled

PARAMS = {"budgets": [0.6, 0.3], "resolutions": [16, 12], "recalibration_batches": 2}


def request(**overrides) -> PruneRequest:
    fields = {"arch": "resnet20", "dataset": "synthetic:4x16", "method": "ofa", "budget": Budget("flops", 0.5),
              "epochs": 2, "finetune_epochs": 1, "batch_size": 32, "params": PARAMS}
    return PruneRequest(**{**fields, **overrides})


class FakeLatency(DeviceOracle):
    """A predictor whose latency grows with width and pixels; measuring returns a fixed time and is counted."""

    can_measure = True

    measured: list[str] = []

    def __init__(self, resolution: int):
        self.resolution = resolution

    def predict_ms(self, keep_ratios: torch.Tensor) -> torch.Tensor:
        return keep_ratios.float().mean() * 10.0 * (self.resolution / 16) ** 2

    def measure_ms(self, onnx_path: str, model=None) -> float:  # noqa: ANN001
        FakeLatency.measured.append(onnx_path)
        return 1.25


def only_16(resolution: int) -> FakeLatency:
    if resolution != 16:
        raise ValueError(f"no predictor at {resolution} px")
    return FakeLatency(resolution)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    report = run_cohort(request(), out, checkpoint_dir=out / "ckpt",
                        latency_models={"fake-cpu": FakeLatency, "big-only": only_16})
    return out, report


def test_every_member_is_exported_with_its_resolution(cohort):
    out, report = cohort
    assert json.loads((out / "cohort.json").read_text()) == json.loads(json.dumps(report))
    members = report["members"]
    assert [(m["budget"]["value"], m["resolution"]) for m in members] == [(0.6, 16), (0.6, 12), (0.3, 16), (0.3, 12)]
    assert [m["id"] for m in members] == [0, 1, 2, 3]
    dense = report["dense"]["macs"]
    for m in members:
        folder = member_dir(out, m["id"])
        assert sorted(p.name for p in folder.iterdir()) == ["arch.json", "member.json", "model.onnx",
                                                            "model.safetensors"]
        model, arch_json = zoo.load_pruned(folder / "arch.json", folder / "model.safetensors")
        assert arch_json["resolution"] == m["resolution"]
        assert zoo.param_count(model) == m["params"]
        assert m["macs"] <= m["budget"]["value"] * dense
        assert 0.0 <= m["accuracy"] <= 1.0
        x = torch.randn(1, 3, m["resolution"], m["resolution"])
        with torch.no_grad():
            expected = model.eval()(x).numpy()
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() <= 1e-4
    # Same budget at a lower resolution affords wider layers.
    assert sum(members[1]["keep_counts"]) > sum(members[0]["keep_counts"])
    assert not [p for p in (out / "members").iterdir() if p.name.startswith(".")]


def test_members_carry_predictions_per_device_and_fronts(cohort):
    _, report = cohort
    for m in report["members"]:
        fake = m["latency_ms"]["fake-cpu"]
        assert fake["measured_ms"] is None  # a FLOPs budget measures nothing
        assert fake["predicted_ms"] == pytest.approx(
            10.0 * (m["resolution"] / 16) ** 2 * np.mean([c / s for c, s in zip(m["keep_counts"], report[
                "group_sizes"], strict=True)]), rel=1e-5)
        big = m["latency_ms"]["big-only"]
        assert (big["predicted_ms"] is None) == (m["resolution"] != 16)
    assert set(report["pareto"]) == {"macs", "fake-cpu", "big-only"}
    assert set(report["pareto"]["big-only"]) <= {0, 2}
    front = [next(m for m in report["members"] if m["id"] == i) for i in report["pareto"]["fake-cpu"]]
    latencies = [m["latency_ms"]["fake-cpu"]["predicted_ms"] for m in front]
    accuracies = [m["accuracy"] for m in front]
    assert latencies == sorted(latencies) and accuracies == sorted(accuracies) and len(set(accuracies)) == len(front)


def test_latency_budgets_are_met_by_prediction_and_measured_once(tmp_path):
    FakeLatency.measured.clear()
    req = request(budget=Budget("latency_ms", 5.0, "fake-cpu"), epochs=1, finetune_epochs=0,
                  params={"budgets": [6.0, 3.0], "resolutions": [16, 12], "recalibration_batches": 1})
    report = run_cohort(req, tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                        latency_models={"fake-cpu": FakeLatency})
    for m in report["members"]:
        entry = m["latency_ms"]["fake-cpu"]
        assert entry["predicted_ms"] <= m["budget"]["value"] + 1e-6
        assert entry["measured_ms"] == 1.25
    assert len(FakeLatency.measured) == len(report["members"]) == 4
    again = run_cohort(req, tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                       latency_models={"fake-cpu": FakeLatency})
    assert len(FakeLatency.measured) == 4  # kept from the first run
    assert [m["latency_ms"] for m in again["members"]] == [m["latency_ms"] for m in report["members"]]


@pytest.mark.slow
def test_members_survive_an_interrupted_run_and_are_not_redone(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    exported = []

    def progress(event):
        if event.get("stage") == "export" and "member" in event:
            exported.append(event["member"])

    with pytest.raises(Cancelled):
        run_cohort(request(), out, progress=progress, should_cancel=lambda: len(exported) >= 1, checkpoint_dir=ckpt)
    assert exported == [0]
    assert sorted(p.name for p in (out / "members").iterdir()) == ["0"]
    first = {p.name: p.stat().st_mtime_ns for p in member_dir(out, 0).iterdir()}

    events = []
    report = run_cohort(request(), out, progress=events.append, checkpoint_dir=ckpt)
    assert not [e for e in events if e.get("stage") in ("search", "joint") and e.get("loss") is not None]
    assert {p.name: p.stat().st_mtime_ns for p in member_dir(out, 0).iterdir()} == first
    assert sorted(p.name for p in (out / "members").iterdir()) == ["0", "1", "2", "3"]
    assert [m["id"] for m in report["members"]] == [0, 1, 2, 3]


@pytest.mark.slow
def test_training_interrupted_mid_joint_stage_resumes_without_searching_again(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    seen = []
    with pytest.raises(Cancelled):
        run_cohort(request(finetune_epochs=2), out, progress=seen.append, checkpoint_dir=ckpt,
                   should_cancel=lambda: any(e.get("stage") == "joint" and (e.get("step") or 0) >= 2 for e in seen))
    assert not (out / "members" / "0").exists()
    events = []
    report = run_cohort(request(finetune_epochs=2), out, progress=events.append, checkpoint_dir=ckpt)
    assert not [e for e in events if e.get("stage") == "search"]
    joint = [e for e in events if e.get("stage") == "joint"]
    assert joint and joint[0]["step"] >= 2  # picked up where it stopped
    assert len(report["members"]) == 4


def test_bad_requests_fail_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="run_prune"):
        run_cohort(request(method="l1", params={}), tmp_path)
    with pytest.raises(BudgetError, match="latency model"):
        run_cohort(request(budget=Budget("latency_ms", 2.0, "phone")), tmp_path)
    with pytest.raises(BudgetError, match="fraction"):
        run_cohort(request(params={"budgets": [0.5, 1.5]}), tmp_path)
    with pytest.raises(BudgetError, match="raise the budgets"):
        run_cohort(request(params={"budgets": [1e-6], "resolutions": [16]}), tmp_path)
    assert not (tmp_path / "members").exists()
