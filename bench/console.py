"""The console's pages with 200 jobs in the database: how long each page's requests take (run from bench/api.py).

A page is what the browser fetches for it: the HTML shell, its stylesheet and ES modules (cold, no cache), then the
page's API calls. They are sent one after another on one keep-alive connection, which is an upper bound: the
browser fetches the modules, and a page's API calls, in parallel.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from api import (
    ROOT,
    Connection,
    Requests,
    cpu_by_pid,
    cpu_used,
    free_port,
    percentile,
    prepare,
    process_tree,
    run_async,
    uvicorn_options,
    wait_ready,
)

JOBS = 200
COHORT_MEMBERS = 24
DEVICES = 3
POLL_S = 2.0  # the jobs list's refresh
STATES = ("succeeded", "succeeded", "failed", "running", "queued", "cancelled")


def _report(i: int) -> dict:
    """A single-subnet job's report of the usual size (widths and keep counts of resnet20's groups)."""
    counts = [8 + (i + g) % 8 for g in range(12)]
    return {"method": "l1", "arch": "resnet20", "dataset": "synthetic:10x32", "resolution": 32,
            "dense": {"macs": 40_550_000, "params": 272_474, "accuracy": 0.91},
            "pruned": {"macs": 20_000_000 + i, "params": 130_000, "accuracy": 0.89},
            "keep_counts": counts, "group_sizes": [16] * 4 + [32] * 4 + [64] * 4,
            "widths": {f"layer{g}.conv": c for g, c in enumerate(counts)},
            "latency_ms": {"dense": {"predicted": 0.66, "measured": 0.64},
                           "pruned": {"predicted": 0.33, "measured": 0.32, "readings_ms": [0.33, 0.32, 0.31]}}}


def seed(database: str, key: str) -> dict:
    """200 jobs of the key's tenant in every state (succeeded ones with a subnet and its three files), one cohort
    of 24 members, 3 devices with a predictor each: the ids the pages need."""
    from sqlalchemy import select

    from service.auth import hash_key
    from service.db import session_scope
    from service.models import ApiKey, Artifact, Device, Job, Predictor, Subnet

    held = {"predicted_ms": [0.1 * k for k in range(1, 41)], "measured_ms": [0.1 * k + 0.01 for k in range(1, 41)]}
    with session_scope(database) as s:
        tenant = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        spec = {"runtime": "onnxruntime", "provider": "cpu", "threads": 1, "batch": 1, "resolutions": [32],
                "precision": "fp32", "channel_multiple": 1}
        devices = [Device(tenant_id=tenant, name=f"dev{d}", spec={**spec, "name": f"dev{d}"}, queue=f"profile.dev{d}")
                   for d in range(DEVICES)]
        s.add_all(devices)
        s.flush()
        for d in devices:
            s.add(Predictor(device_id=d.id, arch="resnet20", resolution=32, samples_requested=200, state="ready",
                            metrics={"test": {"absolute_ms": {"n": 40, "mape": 4.0, "within_5": 0.6,
                                                              "within_10": 0.9, "spearman": 0.97}},
                                     "held_out": held}, reference_ms=0.66))
        jobs = []
        for i in range(JOBS):
            state = STATES[i % len(STATES)]
            cohort = i == JOBS - 1
            job = Job(tenant_id=tenant, state="succeeded" if cohort else state, method="ofa" if cohort else "l1",
                      arch="resnet20", dataset="synthetic:10x32", budget_kind="flops", budget_value=0.5, epochs=5,
                      params={}, request={}, request_hash=str(i), progress=1.0 if state == "succeeded" else 0.4,
                      stage="finetune", report=_report(i) if state == "succeeded" else None)
            s.add(job)
            s.flush()
            jobs.append(job)
            if job.state == "succeeded":
                for member in range(COHORT_MEMBERS if cohort else 1):
                    subnet = Subnet(job_id=job.id, member=member, arch_json={}, widths=_report(member)["widths"],
                                    resolution=32 - 4 * (member % 3), macs=20_000_000 - 10_000 * member,
                                    params=130_000, accuracy=0.9 - 0.001 * member,
                                    latency={str(d.id): {"predicted_ms": 0.3 + 0.01 * member, "measured_ms": None}
                                             for d in devices})
                    s.add(subnet)
                    s.flush()
                    s.add_all([Artifact(subnet_id=subnet.id, format=f, path=f"x/{subnet.id}/{f}", sha256="0" * 64,
                                        size_bytes=1) for f in ("onnx", "safetensors", "arch")])
        single = next(j.id for j in jobs if j.state == "succeeded" and j.method == "l1")
        return {"job": single, "cohort": jobs[-1].id, "devices": [d.id for d in devices]}


def pages(ids: dict) -> dict[str, list[str]]:
    """Every page's requests after the shell, as its module sends them on first paint."""
    job, cohort = ids["job"], ids["cohort"]
    return {
        "jobs (newest 50)": ["/v1/jobs?limit=50&offset=0"],
        "jobs, one state": ["/v1/jobs?limit=50&offset=0&state=succeeded"],
        "job (succeeded)": [f"/v1/jobs/{job}", f"/v1/jobs/{job}/subnets", "/v1/devices"],
        "submit": ["/v1/methods", "/v1/devices"],
        "devices": ["/v1/devices", *(f"/v1/devices/{d}/predictors" for d in ids["devices"])],
        f"cohort ({COHORT_MEMBERS} members)": [f"/v1/jobs/{cohort}", f"/v1/jobs/{cohort}/subnets", "/v1/devices"],
    }


def shell() -> list[str]:
    assets = ROOT / "service" / "console"
    return ["/", "/console/console.css", *(f"/console/js/{p.name}" for p in sorted((assets / "js").glob("*.js")))]


async def _load(conn: Connection, req: Requests, paths: list[str]) -> float:
    start = time.perf_counter()
    for path in paths:
        status, body = await conn.send(req.get(path))
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status}: {body[:200]!r}")
    return time.perf_counter() - start


@dataclass
class PageRun:
    seconds: list[float]  # per page load
    cpu_ms: float | None  # the API process's CPU time per page load


async def _page(req: Requests, paths: list[str], loads: int, watchers: int) -> list[float]:
    """One user loading the page `loads` times while `watchers` others keep a jobs list open (it polls every 2 s)."""
    times: list[float] = []
    done = asyncio.Event()

    async def watcher(k: int) -> None:
        conn = Connection(req.port)
        await asyncio.sleep(POLL_S * k / max(watchers, 1))  # spread out, as people open pages at different times
        while not done.is_set():
            await _load(conn, req, ["/v1/jobs?limit=50&offset=0"])
            try:
                await asyncio.wait_for(done.wait(), POLL_S)
            except TimeoutError:
                pass
        conn.close()

    async def user() -> None:
        conn = Connection(req.port)
        for _ in range(loads):
            times.append(await _load(conn, req, paths))
            await asyncio.sleep(0.01)  # a person clicks; this only keeps the user from starving the watchers
        conn.close()
        done.set()

    await asyncio.gather(user(), *(watcher(k) for k in range(watchers)))
    return times


def measure(req: Requests, plan: dict[str, list[str]], watchers: int, loads: int,
            pids: list[int]) -> dict[str, PageRun]:
    """Page by page: one user loads the page `loads` times while `watchers` others have the jobs list open; the
    API's CPU time per load (without watchers only: theirs would count too)."""
    out = {}
    for name, paths in plan.items():
        before = cpu_by_pid(pids)
        seconds = run_async(_page(req, paths, loads, watchers))
        cpu = 1000 * cpu_used(before, cpu_by_pid(pids)) / len(seconds) if not watchers else None
        out[name] = PageRun(seconds, cpu)
    return out


def run(stack: str, watchers: list[int], loads: int) -> list[tuple[int, dict[str, PageRun]]]:
    """Start an API on a fresh seeded database and load the pages with each number of others watching."""
    with tempfile.TemporaryDirectory(prefix="latprune-console-") as tmp:
        env, key, cleanup = prepare(stack, Path(tmp))
        ids = seed(env["LATPRUNE_DATABASE_URL"], key)
        port = free_port()
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host",
                                "127.0.0.1", "--port", str(port), "--log-level", "warning", *uvicorn_options()],
                               cwd=ROOT, env=env)
        req = Requests(port, key)
        plan = {"shell (HTML, CSS, modules)": shell(), **pages(ids)}
        try:
            wait_ready(port, api)
            pids = process_tree(api.pid)
            measure(req, plan, 0, 5, pids)  # warm-up: pools, the methods table, the OS page cache
            return [(n, measure(req, plan, n, loads, pids)) for n in watchers]
        finally:
            api.terminate()
            api.wait(timeout=30)
            cleanup()


SECTION = "## Console"
NOTES = """A page's time is its requests sent one after another on one keep-alive connection: the shell (HTML,
stylesheet and every ES module, uncached: a first visit) or a page's API calls. The browser fetches the modules,
and a page's API calls, in parallel, and later visits revalidate the modules (304), so a page in the browser takes
at most this. One user loads each page in turn; in the second run 20 other users have the jobs list open at the
same time (it polls every 2 s). The CPU column is the API process's user + system time per page load (without the
watchers), which moves less than latency on this shared machine: the load average above says how busy it was
with other work. The jobs list shows 50 jobs a page; with 200 jobs in the database its query counts them all."""


def rows(stack: str, results: list[tuple[int, dict[str, PageRun]]]) -> list[str]:
    names = {"embedded": "embedded (SQLite)", "production": "production (PostgreSQL)"}
    out = []
    for watchers, runs in results:
        for page, run_ in runs.items():
            ms = [1000 * t for t in run_.seconds]
            cpu = "–" if run_.cpu_ms is None else f"{run_.cpu_ms:.1f}"
            out.append(f"| {names[stack]} | {watchers} | {page} | {statistics.median(ms):.1f} | "
                       f"{percentile(ms, 95):.1f} | {cpu} | {len(ms)} |")
    return out


def section(results: dict[str, list[tuple[int, dict[str, PageRun]]]]) -> str:
    lines = [SECTION, "",
             f"`python bench/api.py --part console`: the console's pages with {JOBS} jobs of one tenant in the "
             f"database ({COHORT_MEMBERS}-member cohort, {DEVICES} devices with predictors); one API process, "
             "loopback, 2-core machine shared with other work (load average "
             f"{Path('/proc/loadavg').read_text().split()[0]} at the end). Target: p95 under 200 ms.", "",
             "| stack | others watching the jobs list | page | p50 ms | p95 ms | API CPU ms per load | loads |",
             "|---|---|---|---|---|---|---|"]
    for stack, result in results.items():
        lines += rows(stack, result)
    return "\n".join([*lines, "", NOTES, ""])


def main(args) -> None:  # noqa: ANN001 - bench/api.py's parsed arguments
    """The "Console" section of docs/benchmarks.md: every page on each stack."""
    results = {stack: run(stack, args.console_watchers or [0, 20], args.console_loads)
               for stack in args.stack or ["embedded", "production"]}
    text = section(results)
    print(text)
    if not args.no_write:
        from docsection import write_section

        write_section(SECTION, text)
