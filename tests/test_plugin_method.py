"""A method added from one file (the example in docs/engine.md, "Adding a method") reaches every door: the
registry, `latprune methods`, GET /v1/methods, a CLI prune and bench/methods.py, with no other file edited."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pruning.registry import METHODS, PLUGINS_ENV, get_method
from tests.service.conftest import env, postgres_schema  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
NAME = "toy_random"


def example_source() -> str:
    """The first python block of docs/engine.md's "Adding a method" section."""
    text = (ROOT / "docs" / "engine.md").read_text()
    section = text.split("### Adding a method", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """toy_method.py written from the docs into a folder on the path, named in LATPRUNE_METHOD_PLUGINS; the
    environment for subprocesses."""
    (tmp_path / "toy_method.py").write_text(example_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(PLUGINS_ENV, "toy_method")
    environ = {**os.environ, PLUGINS_ENV: "toy_method",
               "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    yield environ
    METHODS.forget(NAME)
    sys.modules.pop("toy_method", None)


def latprune(args: list[str], environ: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from service.cli import main; main()", *args]
    return subprocess.run(command, env=environ, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_example_registers_with_its_schema(plugin):
    info = get_method(NAME)
    assert NAME in METHODS and "Random channel importance" in info.description
    assert info.params_schema()["properties"]["seed_offset"]["maximum"] == 1000
    assert not info.trains and not info.produces_cohort


def test_the_api_lists_the_example_and_validates_its_params(plugin, env):  # noqa: F811 - the fixture
    methods = env.client.get("/v1/methods", headers=env.key()).json()
    toy = next(m for m in methods if m["name"] == NAME)
    assert "seed_offset" in toy["params_schema"]["properties"]
    job = {"method": NAME, "arch": "resnet20", "dataset": "synthetic:4x16", "budget": {"kind": "flops", "value": 0.5},
           "params": {"seed_offset": -1}}
    bad = env.client.post("/v1/jobs", headers=env.key(), json=job)
    assert bad.status_code == 422 and "seed_offset" in bad.text


@pytest.mark.slow
def test_the_cli_lists_and_runs_the_example(plugin, tmp_path):
    listed = latprune(["methods"], plugin, tmp_path)
    assert listed.returncode == 0 and NAME in listed.stdout, listed.stderr[-2000:]
    out = tmp_path / "out"
    run = latprune(["prune", "--arch", "resnet20", "--dataset", "synthetic:4x16", "--method", NAME, "--budget",
                    "flops=0.5", "--epochs", "1", "--batch-size", "32", "--out", str(out)], plugin, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == NAME and report["method_info"]["score_scale"] == "global"
    assert report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"] and (out / "model.onnx").is_file()


@pytest.mark.slow
def test_the_bench_runs_the_example(plugin, tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "methods.py"), "--tiny", "--methods", NAME,
               "--home", str(tmp_path / "bench")]
    run = subprocess.run(command, env=plugin, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(rf"resnet20 60% {NAME} seed 0: measured [0-9.]+ ms", run.stdout), run.stdout[-3000:]
    row = rf"\| resnet20 \| 60% of [0-9.]+ ms = [0-9.]+ ms \| {NAME} \| 1 \|"
    assert re.search(row, run.stdout), run.stdout[-3000:]
