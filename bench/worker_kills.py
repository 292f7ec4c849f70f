"""Worker kills on both stacks: every job must end, none may run twice.

    python bench/worker_kills.py                   # 3 kills of each kind on each stack
    python bench/worker_kills.py --kills 5 --stack embedded

For each kill a tiny job is submitted and, once it has made progress, one of three things dies by SIGKILL:
`child` (the pool process running the task; the worker's main process survives and hands the task back),
`main` (the worker's main process alone: its pool process, orphaned, may finish the task it runs) or `whole`
(the main process and its pool processes at once). After a `main` or `whole` kill a new worker is
started. Stacks: `embedded` (SQLite + kombu's SQLAlchemy transport, what `latprune up` runs) and `production`
(PostgreSQL + Redis, private servers started here; Redis hands a dead worker's task back after the visibility
timeout, set to VISIBILITY_S for the run).

Per job it checks: the job ended (else lost), it succeeded with attempts = 2 (one run killed, one resumed), its
events show one start per attempt, and it has one subnet with three artifacts (else duplicated). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.workers.conftest import Stack, make_stack  # noqa: E402 - after the path set-up
from tests.workers.private_servers import PrivatePostgres, PrivateRedis  # noqa: E402
from tests.workers.test_worker_e2e import _events  # noqa: E402

KINDS = ("child", "main", "whole")
VISIBILITY_S = 15
TERMINAL = ("succeeded", "failed", "cancelled")


@contextmanager
def stack_of(kind: str, base: Path) -> Iterator[Stack]:
    """A stack (API client + worker) of `kind` under `base`."""
    if kind == "embedded":
        yield from_generator(make_stack(base, f"sqlite:///{base / 'latprune.db'}",
                                        f"sqla+sqlite:///{base / 'broker.db'}", "prune"))
        return
    redis_server, postgres = PrivateRedis(base / "redis"), PrivatePostgres()
    redis_server.start()
    postgres.start()
    try:
        yield from_generator(make_stack(base, postgres.url, redis_server.url, "prune",
                                        {"LATPRUNE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S)}))
    finally:
        redis_server.stop()
        postgres.close()


def from_generator(gen: Iterator[Stack]) -> Stack:
    """The stack a make_stack generator yields; the generator is kept so that it is closed (worker stopped) with
    the stack."""
    stack = next(gen)
    stack._gen = gen  # type: ignore[attr-defined]
    return stack


def wait(predicate, timeout_s: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def kill(stack: Stack, kind: str) -> None:
    """SIGKILL the part of the worker that `kind` names, and start a new worker if the old one is gone."""
    children = stack.worker_children()
    targets = {"child": children[:1], "main": [stack.worker.pid], "whole": [stack.worker.pid, *children]}[kind]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if kind != "child":
        stack.worker.wait(timeout=30)
        stack.start_new_worker()


def one_kill(stack: Stack, kind: str, timeout_s: float) -> dict:
    """Submit a job, kill `kind` under it, and judge how it ended."""
    job = stack.submit(epochs=8)
    if not wait(lambda: stack.job(job["id"])["progress"] > 0.05, 180):
        return {"kind": kind, "job": job["id"], "outcome": "never started"}
    kill(stack, kind)
    ended = wait(lambda: stack.job(job["id"])["state"] in TERMINAL, timeout_s)
    done = stack.job(job["id"])
    starts = [d.get("attempt") for k, d in _events(stack, job["id"]) if k == "state" and "attempt" in d]
    subnets = stack.client.get(f"/v1/jobs/{job['id']}/subnets", headers=stack.headers).json()
    duplicated = starts != list(range(1, len(starts) + 1)) or len(starts) != done["attempts"] or len(subnets) > 1 \
        or any(len(s["artifacts"]) != 3 for s in subnets)
    outcome = "lost" if not ended else "duplicated" if duplicated else done["state"]
    return {"kind": kind, "job": job["id"], "outcome": outcome, "attempts": done["attempts"],
            "error": done["error"]}


def run(stack_kind: str, kills: int, timeout_s: float) -> list[dict]:
    base = Path(tempfile.mkdtemp(prefix=f"latprune-kills-{stack_kind}-"))
    rows = []
    with stack_of(stack_kind, base) as stack:
        try:
            for kind in KINDS:
                for _ in range(kills):
                    started = time.monotonic()
                    row = one_kill(stack, kind, timeout_s)
                    row.update(stack=stack_kind, seconds=round(time.monotonic() - started))
                    print(row, flush=True)
                    rows.append(row)
        finally:
            stack._gen.close()  # type: ignore[attr-defined]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stack | kill | kills | succeeded | failed | lost | duplicated | attempts |",
             "|---|---|---|---|---|---|---|---|"]
    for stack_kind in dict.fromkeys(r["stack"] for r in rows):
        for kind in KINDS:
            group = [r for r in rows if r["stack"] == stack_kind and r["kind"] == kind]
            if not group:
                continue
            count = {o: sum(r["outcome"] == o for r in group) for o in ("succeeded", "failed", "lost", "duplicated")}
            attempts = sorted({r.get("attempts") for r in group if r.get("attempts") is not None})
            lines.append(f"| {stack_kind} | {kind} | {len(group)} | {count['succeeded']} | {count['failed']} | "
                         f"{count['lost']} | {count['duplicated']} | {', '.join(map(str, attempts))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="kills of each kind on each stack")
    parser.add_argument("--stack", choices=("embedded", "production"), action="append")
    parser.add_argument("--timeout", type=float, default=240, help="seconds a job may take after the kill")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for stack_kind in args.stack or ["embedded", "production"]:
        rows += run(stack_kind, args.kills, args.timeout)
    print(table(rows))
    bad = [r for r in rows if r["outcome"] not in ("succeeded", "failed")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
