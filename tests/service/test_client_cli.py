"""The Python client and the CLI verbs over real HTTP: submit, jobs, watch, download, cancel, admin, db."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from service.auth import create_key
from service.cli import app
from service.client import ApiError, Client
from service.db import session_scope
from service.models import Artifact, Job, JobEvent, Subnet
from service.settings import get_settings
from service.storage import ArtifactStore

runner = CliRunner()


@pytest.fixture
def key(live) -> str:
    with session_scope(live.settings.database_url) as s:
        return create_key(s, "cli")[0]


@pytest.fixture
def cli(live, key, monkeypatch):
    """Run `latprune ...` against the live API with the given key."""
    monkeypatch.setenv("LATPRUNE_HOME", str(live.settings.home))
    monkeypatch.setenv("LATPRUNE_DATABASE_URL", live.settings.database_url)
    monkeypatch.setenv("LATPRUNE_API_URL", live.url)
    monkeypatch.setenv("LATPRUNE_API_KEY", key)

    def invoke(*args: str):  # noqa: ANN202
        get_settings.cache_clear()
        try:
            return runner.invoke(app, list(args))
        finally:
            get_settings.cache_clear()

    return invoke


def _finished_job(live, key: str, state: str = "succeeded") -> int:
    client = Client(live.url, key)
    job = client.submit({"method": "l1", "arch": "resnet20", "dataset": "builtin:digits",
                         "budget": {"kind": "flops", "value": 0.5}})
    store = ArtifactStore(live.settings.artifact_dir)
    src = live.settings.home / f"m{job['id']}.onnx"
    src.write_bytes(b"onnx bytes %d" % job["id"])
    with session_scope(live.settings.database_url) as s:
        row = s.get(Job, job["id"])
        row.state, row.progress = state, 1.0 if state == "succeeded" else 0.3
        row.error = None if state == "succeeded" else "boom"
        s.add(JobEvent(job_id=row.id, kind="progress", data={"stage": "dense", "fraction": 0.3, "epoch": 1,
                                                              "epochs": 2, "loss": 1.5}))
        s.add(JobEvent(job_id=row.id, kind="state", data={"state": state}))
        subnet = Subnet(job_id=row.id, member=0, arch_json={}, widths={}, resolution=32, macs=5, params=5,
                        accuracy=0.9, latency={})
        s.add(subnet)
        s.flush()
        stored = store.put_file(src, f"t/{row.id}/model.onnx")
        s.add(Artifact(subnet_id=subnet.id, format="onnx", path=stored.path, sha256=stored.sha256,
                       size_bytes=stored.size_bytes))
    return job["id"]


def test_client_round_trip(live, key, tmp_path):
    client = Client(live.url, key)
    assert client.health()["status"] == "ok"
    device = client.create_device(name="pi")
    assert client.find_device("pi")["id"] == device["id"] == client.find_device(device["id"])["id"]
    with pytest.raises(ApiError) as err:
        client.submit({"method": "l1", "arch": "resnet20", "dataset": "builtin:digits",
                       "budget": {"kind": "flops", "value": 2}})
    assert err.value.status == 422 and "budget" in str(err.value)
    job_id = _finished_job(live, key)
    events = list(client.events(job_id))
    assert [e.kind for e in events] == ["progress", "state", "end"]
    path, headers = client.download(job_id, "pi", tmp_path)
    assert path.read_bytes() == b"onnx bytes %d" % job_id
    assert headers["x-checkpoint-sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_submit_jobs_cancel(cli, live):
    r = cli("submit", "--arch", "resnet20", "--dataset", "builtin:digits", "--budget", "flops=0.4",
            "--param", "allocation=uniform", "--idempotency-key", "k1")
    assert r.exit_code == 0, r.output
    job_id = int(r.output.split()[1])
    assert live.recorder.sent[-1] == ("prune.run", [job_id], "prune")
    again = cli("submit", "--arch", "resnet20", "--dataset", "builtin:digits", "--budget", "flops=0.4",
                "--param", "allocation=uniform", "--idempotency-key", "k1")
    assert again.output.split()[1] == str(job_id)
    listing = cli("jobs")
    assert listing.exit_code == 0 and str(job_id) in listing.output
    r = cli("cancel", str(job_id))
    assert r.exit_code == 0 and "cancelled" in r.output


def test_cli_latency_budget_names_a_device(cli):
    r = cli("submit", "--arch", "resnet20", "--dataset", "builtin:digits", "--budget", "latency_ms=2@ghost")
    assert r.exit_code == 2 and "device ghost not found" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize(("args", "needle"), [
    (["--budget", "flops=7"], "fraction"),
    (["--budget", "speed=3"], "unknown budget kind"),
    (["--budget", "flops=0.5", "--method", "nope"], "unknown method"),
    (["--budget", "flops=0.5", "--dataset", "imagefolder:../x"], "'..'"),
])
def test_cli_bad_submissions_are_one_line(cli, args, needle):
    base = {"--arch": "resnet20", "--dataset": "builtin:digits"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    r = cli("submit", *[x for pair in base.items() for x in pair])
    assert r.exit_code != 0 and needle in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 3


def test_cli_watch_and_download(cli, live, key, tmp_path):
    ok = _finished_job(live, key)
    r = cli("watch", str(ok))
    assert r.exit_code == 0 and "succeeded" in r.output
    bad = _finished_job(live, key, state="failed")
    r = cli("watch", str(bad))
    assert r.exit_code == 1 and "boom" in r.output
    phone = Client(live.url, key).create_device(name="phone")
    r = cli("download", str(ok), "--device", "phone", "--out", str(tmp_path / "x.onnx"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.onnx").read_bytes() == b"onnx bytes %d" % ok
    with session_scope(live.settings.database_url) as s:
        s.scalar(select(Subnet).where(Subnet.job_id == ok)).latency = {
            str(phone["id"]): {"predicted_ms": 2.0, "measured_ms": 2.5}}
    r = cli("download", str(ok), "--device", "phone", "--latency-ms", "1", "--out", str(tmp_path / "y.onnx"))
    assert r.exit_code == 2 and "fastest takes 2.5 ms" in r.output and not (tmp_path / "y.onnx").exists()
    r = cli("download", str(ok), "--device", "phone", "--latency-ms", "1", "--fastest-if-over",
            "--out", str(tmp_path / "y.onnx"))
    text = " ".join(r.output.split())  # rich wraps lines at the terminal width
    assert r.exit_code == 0 and "over the budget" in text and "fastest takes 2.5 ms" in text, r.output
    assert (tmp_path / "y.onnx").read_bytes() == b"onnx bytes %d" % ok
    r = cli("download", str(bad), "--device", "phone")
    assert r.exit_code == 2 and "is failed" in r.output


def test_cli_unreachable_api(cli, monkeypatch):
    monkeypatch.setenv("LATPRUNE_API_URL", "http://127.0.0.1:9")
    r = cli("jobs")
    assert r.exit_code == 2 and "cannot reach the API" in r.output


def test_cli_admin_and_db(cli, live, tmp_path, monkeypatch):
    r = cli("admin", "create-key", "--tenant", "newco")
    assert r.exit_code == 0
    new_key = r.output.strip()
    assert Client(live.url, new_key).jobs()["total"] == 0
    r = cli("admin", "revoke-key", new_key[:10])
    assert r.exit_code == 0
    with pytest.raises(ApiError):
        Client(live.url, new_key).jobs()
    assert cli("admin", "create-key", "--tenant", "Bad Name!").exit_code == 2
    monkeypatch.setenv("LATPRUNE_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    assert "empty" in cli("db", "current").output
    r = cli("db", "upgrade")
    assert r.exit_code == 0 and "0002_device_queue" in r.output


@pytest.mark.slow
def test_many_concurrent_requests_do_not_exhaust_the_pool(live, key):
    import asyncio

    import httpx

    from service.db import POOL_SIZE

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=9 * POOL_SIZE)
        async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {key}"},
                                     limits=limits, timeout=60) as http:
            job = {"method": "l1", "arch": "resnet20", "dataset": "builtin:digits",
                   "budget": {"kind": "flops", "value": 0.5}}
            calls = [http.get("/v1/jobs") for _ in range(3 * POOL_SIZE)]
            calls += [http.post("/v1/jobs", json=job) for _ in range(3 * POOL_SIZE)]
            calls += [http.get("/v1/devices") for _ in range(3 * POOL_SIZE)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    codes = asyncio.run(asyncio.wait_for(burst(), 90))
    assert codes.count(200) == 6 * POOL_SIZE and codes.count(201) == 3 * POOL_SIZE
