"""`latprune cohort`: the table and the Pareto PNG, from a local cohort directory or from the API."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.cli import app
from service.client import Client
from tests.service.test_api_cohort import device, make_cohort

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def test_local_cohort_directory(tmp_path):
    members = [{"id": 0, "resolution": 32, "macs": 30_000_000, "params": 200_000, "accuracy": 0.95,
                "latency_ms": {"cpu": {"predicted_ms": 3.0, "measured_ms": 3.3}}},
               {"id": 1, "resolution": 24, "macs": 12_000_000, "params": 150_000, "accuracy": 0.93,
                "latency_ms": {"cpu": {"predicted_ms": 1.5, "measured_ms": None}}}]
    (tmp_path / "cohort.json").write_text(json.dumps({"method": "ofa", "arch": "resnet20", "dataset": "d",
                                                      "members": members, "pareto": {"cpu": [1, 0]}}))
    result = runner.invoke(app, ["cohort", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "3.300 m" in result.output and "1.500" in result.output and "95.00" in result.output
    assert (tmp_path / "pareto.png").read_bytes().startswith(PNG)


def test_not_a_cohort_fails_in_one_line(tmp_path):
    result = runner.invoke(app, ["cohort", str(tmp_path)])
    assert result.exit_code != 0 and "no cohort.json" in result.output and "Traceback" not in result.output


def test_job_cohort_from_the_api(env, tmp_path, monkeypatch):
    headers = env.key()
    phone = device(env, headers, "phone")
    job = make_cohort(env, headers, [(16, 0.9, 900_000, {phone: (5.0, None)}), (12, 0.8, 400_000, {phone: (2.0, 2.1)})])

    def in_process(cls, settings):  # noqa: ANN001, ANN202 - the API app itself instead of a server
        api = Client.__new__(Client)
        api.http = TestClient(env.client.app, headers=headers)
        return api

    monkeypatch.setattr(Client, "from_settings", classmethod(in_process))
    png = tmp_path / "plot.png"
    result = runner.invoke(app, ["cohort", str(job), "--png", str(png)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "phone ms" in result.output and "2.100 m" in result.output
    assert png.read_bytes().startswith(PNG)
    missing = runner.invoke(app, ["cohort", "999999"])
    assert missing.exit_code != 0 and "404" in missing.output
