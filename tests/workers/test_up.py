"""`latprune up`: one command starts API + worker; a device registered afterwards gets profiled on its queue."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.client import Client, load_client_config
from tests.workers.conftest import ROOT, TINY_JOB, wait_for

LATPRUNE = str(Path(sys.executable).parent / "latprune")


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_up(home: Path, port: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "LATPRUNE_HOME": str(home), "LATPRUNE_PORT": str(port)}
    # Unset: `latprune up` itself must give its worker one compute thread.
    for name in ("LATPRUNE_DATABASE_URL", "LATPRUNE_BROKER_URL", "LATPRUNE_API_KEY", "LATPRUNE_API_URL",
                 "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    with open(out, "w") as log:
        # SIGINT back to its default: a suite started in the background (SIGINT ignored, inherited) still sends
        # `latprune up` a Ctrl-C that Python turns into KeyboardInterrupt.
        proc = subprocess.Popen([LATPRUNE, "up"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: "Ctrl-C" in out.read_text() or proc.poll() is not None, 90, "latprune up to start")
    assert proc.poll() is None, out.read_text()
    return proc


def _children(proc: subprocess.Popen) -> list[int]:
    return [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]


def _worker_environ(up: subprocess.Popen) -> dict[str, str]:
    """The environment of the Celery worker that `latprune up` started."""
    children = _children(up)
    for pid in children:
        if b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes():
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    raise AssertionError(f"no celery worker among the children {children} of latprune up")


def test_worker_gets_one_thread_unless_the_user_chose(monkeypatch, tmp_path):
    from service.cli_service import worker_env
    from service.settings import Settings

    settings = Settings(home=tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    env = worker_env(settings)
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "3"
    assert env["LATPRUNE_WORKER_ALL_DEVICE_QUEUES"] == "1" and env["LATPRUNE_HOME"] == str(tmp_path)


def _stop(proc: subprocess.Popen, out: Path, signum: int = signal.SIGINT) -> None:
    children = _children(proc)
    assert len(children) == 2, children  # the API and the worker
    proc.send_signal(signum)
    proc.wait(timeout=60)
    assert proc.returncode == 0, out.read_text()[-2000:]
    assert "stopping" in out.read_text()
    for pid in children:  # reaped by `latprune up`, not left running without it
        assert not Path(f"/proc/{pid}").exists(), f"child {pid} of latprune up still runs"


@pytest.mark.slow
def test_up_serves_and_profiles_new_devices(tmp_path):
    port = _free_port()
    out = tmp_path / "up.out"
    proc = _start_up(tmp_path, port, out)
    try:
        worker_environ = _worker_environ(proc)
        assert worker_environ["OMP_NUM_THREADS"] == "1" and worker_environ["MKL_NUM_THREADS"] == "1"
        text = out.read_text()
        saved = load_client_config(tmp_path)
        assert saved["url"] == f"http://127.0.0.1:{port}" and saved["api_key"] in text.replace("\n", "")
        assert f"console: http://127.0.0.1:{port}/" in text
        page = httpx.get(f"{saved['url']}/")  # the console, from the running stack, with nothing else installed
        assert page.status_code == 200 and "/console/js/app.js" in page.text
        client = Client(saved["url"], saved["api_key"])
        device = client.create_device(name="here")
        predictor = client.profile(device["id"], "resnet20", 16, 12)

        def finished():  # noqa: ANN202
            rows = client.predictors(device["id"])
            return rows[0]["state"] in ("ready", "failed") and rows[0]

        done = wait_for(finished, 120, f"profiling on {device['queue']}; worker log:\n"
                                        f"{(tmp_path / 'logs' / 'worker.log').read_text()[-2000:]}")
        assert done["id"] == predictor["id"] and done["state"] == "ready", done["error"]
    finally:
        _stop(proc, out)
    assert f"Started consuming from {device['queue']}" in (tmp_path / "logs" / "worker.log").read_text()

    # A second start keeps the database and the saved key, and prints no new key.
    again = tmp_path / "up2.out"
    proc = _start_up(tmp_path, port, again)
    try:
        assert "admin API key" not in again.read_text()
        assert Client(saved["url"], saved["api_key"]).predictors(device["id"])[0]["state"] == "ready"
    finally:
        _stop(proc, again, signal.SIGTERM)  # as `kill`, docker stop or systemd would


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    import onnxruntime as ort

    port = _free_port()
    env = {**os.environ, "LATPRUNE_HOME": str(tmp_path / "home"), "LATPRUNE_PORT": str(port),
           "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    for name in ("LATPRUNE_DATABASE_URL", "LATPRUNE_BROKER_URL", "LATPRUNE_API_KEY", "LATPRUNE_API_URL"):
        env.pop(name, None)
    # The real demo's flow on a tiny dataset; a budget above the dense latency keeps it robust to noise.
    done = subprocess.run([LATPRUNE, "demo", "--dataset", "synthetic:4x16", "--resolution", "16", "--samples", "12",
                           "--epochs", "1", "--share", "1.2", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "LPNet ready" in done.stdout and "pruned ONNX for this-cpu" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith(("│ dense", "│ pruned"))]
    assert len(rows) == 2 and all(" ms" not in r and r.count("│") == 7 for r in rows)
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 16, 16]
    with socket.socket() as s:  # the stack the demo started is gone
        assert s.connect_ex(("127.0.0.1", port)) != 0


def _celery_pid(up: subprocess.Popen) -> int:
    return next(pid for pid in _children(up) if b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes())


@pytest.mark.slow
def test_up_restarts_a_killed_worker_and_api(tmp_path):
    port = _free_port()
    out = tmp_path / "up.out"
    proc = _start_up(tmp_path, port, out)
    try:
        saved = load_client_config(tmp_path)
        client = Client(saved["url"], saved["api_key"])
        job = client.submit({**TINY_JOB, "epochs": 12})
        wait_for(lambda: client.job(job["id"])["progress"] > 0.1, 120, "the job to make progress")
        worker = _celery_pid(proc)
        pool = [int(p) for p in subprocess.run(["pgrep", "-P", str(worker)], capture_output=True,
                                               text=True).stdout.split()]
        for pid in (worker, *pool):  # the whole worker, as the kernel's OOM killer or `kill -9` would
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "restarted worker" in out.read_text(), 30, "latprune up to restart its worker")
        done = wait_for(lambda: (j := client.job(job["id"]))["state"] in ("succeeded", "failed") and j, 180,
                        f"the job to end; worker log:\n{(tmp_path / 'logs' / 'worker.log').read_text()[-2000:]}")
        assert done["state"] == "succeeded" and done["attempts"] == 2, done["error"]

        api = next(pid for pid in _children(proc) if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(api, signal.SIGKILL)
        wait_for(lambda: "restarted API" in out.read_text(), 30, "latprune up to restart its API")
        assert wait_for(lambda: _answers(client, job["id"]), 60, "the restarted API to answer")
        assert proc.poll() is None
        assert "worker exited with code -9; restarting it in 1 s" in out.read_text()
    finally:
        _stop(proc, out)


def _answers(client: Client, job_id: int) -> bool:
    try:
        return client.job(job_id)["state"] == "succeeded"
    except Exception:  # noqa: BLE001 - not listening yet
        return False
