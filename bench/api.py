"""API throughput on loopback: job submission latency under 100 concurrent clients (closed and open loop), job status
reads per second, the API's CPU time per request, and its resident memory (it never imports torch).

    python bench/api.py                       # both stacks; writes the "Service API" section of docs/benchmarks.md
    python bench/api.py --stack embedded      # SQLite + kombu's SQLAlchemy transport (what `latprune up` runs)
    python bench/api.py --stack production    # PostgreSQL + Redis (the docker-compose set-up, on this machine)
    python bench/api.py --stack production --api-workers 2 --api-workers 4   # one run per process count

Each run starts its own API (uvicorn) on a fresh database; no Celery worker runs, so submitted jobs stay queued
and only the API, the database and the broker are measured. The load generator is one process speaking HTTP/1.1
over raw asyncio streams with keep-alive (no HTTP client library), so that its own CPU time per request is a small
fraction of the server's; it reports that time next to the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POSTGRES_URL = os.environ.get("LATPRUNE_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
JOB = {"method": "l1", "arch": "resnet20", "dataset": "synthetic:10x32", "budget": {"kind": "flops", "value": 0.5}}
TICKS = os.sysconf("SC_CLK_TCK")
Pids = Callable[[], list[int]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (uvicorn's worker processes)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *map(int, out)]


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process so far."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the processes alive at the end used in between (those started in between count whole)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def rss_mib(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def torch_loaded(pids: list[int]) -> bool:
    """True if any of the processes has torch's shared library mapped."""
    return any("libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in pids)


def backend_pids(stack: str) -> list[int]:
    """PostgreSQL and Redis server processes now (their CPU time is part of a production request's cost; PostgreSQL
    starts a process per connection, so ask again at the end of each phase)."""
    if stack == "embedded":
        return []
    out = subprocess.run(["pgrep", "-x", "postgres|redis-server"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def prepare(stack: str, home: Path) -> tuple[dict[str, str], str, Callable[[], None]]:
    """Environment of a fresh stack, an API key in it, and a clean-up function."""
    from sqlalchemy import create_engine, text

    from service.auth import create_key
    from service.db import dispose_engines, session_scope
    from service.migrate import upgrade

    cleanup = dispose_engines
    if stack == "embedded":
        database, broker = f"sqlite:///{home / 'latprune.db'}", f"sqla+sqlite:///{home / 'broker.db'}"
    else:
        import redis

        schema = f"lp_bench_{secrets.token_hex(3)}"
        admin = create_engine(POSTGRES_URL)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        database, broker = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", "redis://127.0.0.1:6379/14"
        redis.Redis.from_url(broker).flushdb()

        def cleanup() -> None:
            dispose_engines()
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            redis.Redis.from_url(broker).flushdb()

    upgrade(database)
    with session_scope(database) as session:
        key, _ = create_key(session, "bench")
    env = {**os.environ, "LATPRUNE_HOME": str(home), "LATPRUNE_DATABASE_URL": database,
           "LATPRUNE_BROKER_URL": broker}
    return env, key, cleanup


class Connection:
    """One keep-alive HTTP/1.1 connection sending prepared requests and reading Content-Length responses."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            start = lower.index(b"content-length:") + 15
            length = int(lower[start:lower.index(b"\r\n", start)])
            body = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            raise
        if b"connection: close" in lower:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Requests:
    """Prepared request bytes for one API and key."""

    port: int
    key: str

    def _head(self, method: str, path: str) -> str:
        return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAuthorization: Bearer {self.key}\r\n"

    def post_job(self) -> bytes:
        body = json.dumps(JOB).encode()
        head = self._head("POST", "/v1/jobs") + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body

    def get(self, path: str) -> bytes:
        return (self._head("GET", path) + "\r\n").encode()


@dataclass
class Phase:
    """What one load phase measured."""

    seconds: list[float] = field(default_factory=list)  # per request
    done: int = 0
    errors: int = 0
    wall: float = 0.0
    api_cpu: float = 0.0
    backend_cpu: float = 0.0
    client_cpu: float = 0.0

    def per_request_ms(self, cpu: float) -> float:
        return 1000 * cpu / max(self.done, 1)


async def _measured(phase: Phase, api: list[int], backend: Pids, body: Awaitable[None]) -> Phase:
    api0, back0 = cpu_by_pid(api), cpu_by_pid(backend())
    client0, wall0 = time.process_time(), time.perf_counter()
    await body
    phase.wall = time.perf_counter() - wall0
    phase.client_cpu = time.process_time() - client0
    phase.api_cpu, phase.backend_cpu = cpu_used(api0, cpu_by_pid(api)), cpu_used(back0, cpu_by_pid(backend()))
    return phase


async def _one(conn: Connection, raw: bytes, phase: Phase, expect: int) -> float | None:
    start = time.perf_counter()
    try:
        status, body = await conn.send(raw)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        phase.errors += 1
        return None
    if status != expect:
        raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    phase.done += 1
    return time.perf_counter() - start


async def closed_loop(req: Requests, clients: int, per_client: int, api: list[int], backend: Pids) -> Phase:
    """`clients` connections, each submitting `per_client` jobs back to back."""
    phase, raw = Phase(), req.post_job()

    async def client() -> None:
        conn = Connection(req.port)
        for _ in range(per_client):
            took = await _one(conn, raw, phase, 201)
            if took is not None:
                phase.seconds.append(took)
        conn.close()

    async def run() -> None:
        await asyncio.gather(*(client() for _ in range(clients)))

    return await _measured(phase, api, backend, run())


async def open_loop(req: Requests, clients: int, rate: float, seconds: float, api: list[int],
                    backend: Pids) -> Phase:
    """`clients` connections submitting `rate` jobs/s in all, each on its own fixed schedule. A request's latency
    counts from its scheduled time, so a connection still waiting for its previous answer delays (and charges) the
    next one instead of hiding the backlog (no coordinated omission)."""
    phase, raw, period = Phase(), req.post_job(), clients / rate
    conns = [Connection(req.port) for _ in range(clients)]
    for conn in conns:  # connect first: the schedule measures requests, not TCP handshakes
        await conn.send(req.get("/healthz"))
    start = time.perf_counter() + 0.2
    rng = random.Random(0)

    async def client(conn: Connection) -> None:
        due = start + rng.random() * period
        while due < start + seconds:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if await _one(conn, raw, phase, 201) is not None:
                phase.seconds.append(time.perf_counter() - due)
            due += period
        conn.close()

    async def run() -> None:
        await asyncio.gather(*(client(c) for c in conns))

    return await _measured(phase, api, backend, run())


async def status_reads(req: Requests, job_ids: list[int], clients: int, seconds: float, api: list[int],
                       backend: Pids) -> Phase:
    """As many GET /v1/jobs/{id} as `clients` connections complete in `seconds`."""
    phase = Phase()
    raws = [req.get(f"/v1/jobs/{i}") for i in job_ids]

    async def client(offset: int) -> None:
        conn = Connection(req.port)
        deadline, i = time.perf_counter() + seconds, offset
        while time.perf_counter() < deadline:
            await _one(conn, raws[i % len(raws)], phase, 200)
            i += 1
        conn.close()

    async def run() -> None:
        await asyncio.gather(*(client(k) for k in range(clients)))

    return await _measured(phase, api, backend, run())


def run_async(coro: Awaitable) -> object:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def uvicorn_options() -> list[str]:
    """uvloop and httptools when installed (they cut uvicorn's own per-request cost); no access log."""
    options = ["--no-access-log"]
    for module, option in (("uvloop", ["--loop", "uvloop"]), ("httptools", ["--http", "httptools"])):
        try:
            __import__(module)
            options += option
        except ImportError:
            pass
    return options


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the API did not start")


@dataclass
class Result:
    stack: str
    workers: int
    closed: Phase
    opened: list[tuple[float, Phase]]
    reads: Phase
    read_seconds: float
    idle_rss: float
    busy_rss: float
    torch: bool


def run_stack(stack: str, workers: int, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix="latprune-bench-") as tmp:
        env, key, cleanup = prepare(stack, Path(tmp))
        port = free_port()
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host",
                                "127.0.0.1", "--port", str(port), "--workers", str(workers), "--log-level", "warning",
                                *uvicorn_options()], cwd=ROOT, env=env)
        req = Requests(port, key)
        try:
            wait_ready(port, api)
            pids, backend = process_tree(api.pid), lambda: backend_pids(stack)
            # Warm-up: every API process lists the zoo's architectures once and fills its pools.
            run_async(closed_loop(req, workers * 4, 3, pids, backend))
            pids = process_tree(api.pid)
            idle_rss = rss_mib(pids)
            closed = run_async(closed_loop(req, args.clients, args.per_client, pids, backend))
            opened = [(rate, run_async(open_loop(req, args.clients, rate, args.open_seconds, pids, backend)))
                      for rate in args.open_rate]
            listing = run_async(Connection(port).send(req.get("/v1/jobs?limit=500")))
            ids = [j["id"] for j in json.loads(listing[1])["items"]]
            reads = run_async(status_reads(req, ids, args.read_clients, args.read_seconds, pids, backend))
            busy_rss, torch = rss_mib(pids), torch_loaded(pids)
        finally:
            api.terminate()
            api.wait(timeout=30)
            cleanup()
    return Result(stack, workers, closed, opened, reads, args.read_seconds, idle_rss, busy_rss, torch)


def _cpu(stack: str, phase: Phase) -> str:
    api = f"{phase.per_request_ms(phase.api_cpu):.2f}"
    if stack != "embedded":
        api += f" + {phase.per_request_ms(phase.backend_cpu):.2f}"
    return api


def _dropped(phase: Phase) -> str:
    return f" ({phase.errors} dropped)" if phase.errors else ""


def rows(results: list[Result]) -> list[str]:
    """The markdown tables: latency and throughput, then CPU time per request and memory."""
    names = {"embedded": "embedded (SQLite, SQLAlchemy broker)", "production": "production (PostgreSQL, Redis)"}
    out = ["| stack | API processes | closed loop p50 / p99 ms | closed loop submits/s | open loop: rate/s, "
           "p50 / p99 ms | status reads/s |", "|---|---|---|---|---|---|"]
    for r in results:
        ms = [t * 1000 for t in r.closed.seconds]
        opened = "; ".join(f"{rate:g}/s: {percentile([t * 1000 for t in p.seconds], 50):.0f} / "
                           f"{percentile([t * 1000 for t in p.seconds], 99):.0f}{_dropped(p)}" for rate, p in r.opened)
        out.append(f"| {names[r.stack]} | {r.workers} | {statistics.median(ms):.0f} / {percentile(ms, 99):.0f} | "
                   f"{r.closed.done / r.closed.wall:.0f}{_dropped(r.closed)} | {opened} | "
                   f"{r.reads.done / r.read_seconds:.0f}{_dropped(r.reads)} |")
    out += ["", "| stack | server CPU ms per submission | server CPU ms per status read | load generator CPU ms "
            "per request | API RSS MiB (idle / loaded) | torch in the API |", "|---|---|---|---|---|---|"]
    for r in results:
        client = (r.closed.client_cpu + r.reads.client_cpu) / max(r.closed.done + r.reads.done, 1) * 1000
        out.append(f"| {names[r.stack]} | {_cpu(r.stack, r.closed)} | {_cpu(r.stack, r.reads)} | {client:.2f} | "
                   f"{r.idle_rss:.0f} / {r.busy_rss:.0f} | {'yes' if r.torch else 'no'} |")
    return out


SECTION = "## Service API"
NOTES = """No Celery worker runs, so only the API, the database and the broker are measured. The machine is shared:
throughput and latency move between runs, CPU time per request much less. Server CPU is the API processes' user +
system time over a phase divided by the requests served (production: plus the PostgreSQL and Redis server
processes' time, after the "+"). Closed loop: every client submits its next job as soon as the previous one is
answered, so each request queues behind the others; a p99 under 50 ms with 100 such clients needs 100 / 0.05 =
2000 submissions/s, which on 2 cores leaves 1 ms of CPU per submission for server and load generator together.
A submission costs several times that (request validation, one INSERT and commit, and a Celery publish of about
0.8 ms on either broker), so that target is out of reach on 2 Python cores. Open loop: the same 100 connections
submit at a fixed total rate, each on its own schedule, latency counted from the scheduled time (a late answer
delays and charges the next request): the load of 100 users submitting now and then, and the one to hold against
the 50 ms p99. Status reads: one API process serves at most 1000 / (server CPU ms per read) reads/s; several
processes (`--api-workers`) share the 2 cores with the load generator. On the embedded stack every write goes
through SQLite's single writer lock, for which several processes wait on their event loops."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=["embedded", "production"], action="append",
                        help="default: both")
    parser.add_argument("--api-workers", type=int, action="append",
                        help="uvicorn processes (repeatable: one run each; default 1 embedded, 2 production)")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-client", type=int, default=5, help="closed loop: jobs each client submits")
    parser.add_argument("--open-rate", type=float, action="append",
                        help="open loop: submissions/s of all clients together (repeatable; default 100)")
    parser.add_argument("--open-seconds", type=float, default=10.0)
    parser.add_argument("--read-clients", type=int, default=32)
    parser.add_argument("--read-seconds", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--part", choices=["api", "console"], action="append",
                        help="api: the sections above; console: the console's pages with 200 jobs (default: both)")
    parser.add_argument("--console-watchers", type=int, action="append",
                        help="console: other users with the jobs list open (repeatable; default 0 and 20)")
    parser.add_argument("--console-loads", type=int, default=40, help="console: loads of each page per run")
    args = parser.parse_args()
    args.open_rate = args.open_rate or [100.0]
    if "console" in (args.part or ["api", "console"]):
        import console  # bench/ is first on sys.path when run as a script

        console.main(args)
    if "api" not in (args.part or ["api", "console"]):
        return

    results = [run_stack(stack, workers, args) for stack in args.stack or ["embedded", "production"]
               for workers in args.api_workers or [1 if stack == "embedded" else 2]]
    rates = ", ".join(f"{r:g}" for r in args.open_rate)
    text = "\n".join([
        SECTION, "",
        f"`python bench/api.py`: {args.clients} concurrent clients submit {args.per_client} jobs each back to back "
        f"(closed loop), then submit at {rates} jobs/s in all for {args.open_seconds:g} s (open loop), then "
        f"{args.read_clients} clients read job status for {args.read_seconds:g} s; loopback, keep-alive connections, "
        "2-core machine shared with other work.", "",
        *rows(results), "", NOTES, ""])
    print(text)
    if not args.no_write:
        from docsection import write_section  # bench/ is first on sys.path when run as a script

        write_section(SECTION, text)


if __name__ == "__main__":
    main()
