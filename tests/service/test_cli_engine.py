import json

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from pruning.surgery import onnx_macs
from service.cli import app

# Every test here runs real workers or jobs: seconds to minutes each.
pytestmark = pytest.mark.slow

runner = CliRunner()


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    result = runner.invoke(app, ["prune", "--arch", "resnet20", "--dataset", "builtin:digits", "--method", "l1",
                                 "--budget", "flops=0.5", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_cli_prune_writes_consistent_files(pruned_dir):
    for name in ("model.onnx", "model.safetensors", "arch.json", "report.json"):
        assert (pruned_dir / name).is_file()
    report = json.loads((pruned_dir / "report.json").read_text())
    for key in ("method", "arch", "dataset", "budget", "dense", "pruned", "widths", "seconds"):
        assert key in report
    assert report["method"] == "l1" and report["arch"] == "resnet20"
    ratio = report["pruned"]["macs"] / report["dense"]["macs"]
    assert 0.49 <= ratio <= 0.5
    assert report["pruned"]["params"] < report["dense"]["params"]
    assert 0.0 <= report["pruned"]["accuracy"] <= 1.0
    arch = json.loads((pruned_dir / "arch.json").read_text())
    assert report["widths"]["layer1.0.conv1"] == arch["layers"]["layer1.0.conv1"]["out_channels"]


def test_cli_onnx_runs_with_the_pruned_macs(pruned_dir):
    report = json.loads((pruned_dir / "report.json").read_text())
    session = ort.InferenceSession(str(pruned_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.random.rand(1, 1, 32, 32).astype(np.float32)})[0]
    assert logits.shape == (1, 10)
    assert onnx_macs(pruned_dir / "model.onnx") == pytest.approx(report["pruned"]["macs"], rel=0.005)


def test_cli_weights_round_trip(pruned_dir):
    from pruning.zoo import load_pruned

    model, arch = load_pruned(pruned_dir / "arch.json", pruned_dir / "model.safetensors")
    assert arch["arch"] == "resnet20"
    assert model.conv1.in_channels == 1


@pytest.mark.parametrize("args,message", [
    (["--budget", "flops=2"], "fraction"),
    (["--budget", "speed=1"], "unknown budget kind"),
    (["--method", "magic"], "unknown method"),
    (["--arch", "resnet21"], "unknown architecture"),
    (["--dataset", "ftp:x"], "scheme"),
    (["--param", "allocation=sideways"], "allocation"),
    (["--weights", "/nonexistent.safetensors"], "does not exist"),
])
def test_cli_bad_arguments_exit_with_one_line(tmp_path, args, message):
    base = {"--arch": "resnet20", "--dataset": "synthetic:4x16", "--method": "l1", "--budget": "flops=0.5",
            "--epochs": "0", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["prune"] + [x for kv in base.items() for x in kv]
    result = runner.invoke(app, argv)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_methods_lists_l1():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert "l1" in result.output and "allocation" in result.output
