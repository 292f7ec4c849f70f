"""Keeps the children of `latprune up` running: a child that exits is started again after a backoff.

A worker killed by the kernel (out of memory) or by hand must not take the API down with it, nor leave jobs
without a worker: the supervisor restarts it, and the new worker picks up what the old one held (the broker
redelivers it, or on the embedded broker workers.recovery publishes it again).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Child:
    """One supervised process: how to start it, and its restart state."""

    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    next_start_at: float | None = None


@dataclass
class Supervisor:
    """Restart exited children with exponential backoff (`min_backoff_s` doubling up to `max_backoff_s`).

    The backoff starts over once a child has run `stable_s` seconds, so a crash loop (a bad setting, a port in use)
    slows down while a rare death is repaired at once.
    """

    children: list[Child]
    log: Callable[[str], None]
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    stable_s: float = 60.0
    clock: Callable[[], float] = field(default=time.monotonic)

    def adopt(self, name: str, proc: subprocess.Popen) -> None:
        """Record an already started child's process."""
        child = self.child(name)
        child.proc, child.started_at, child.backoff_s = proc, self.clock(), self.min_backoff_s

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def poll(self) -> None:
        """Notice exited children and start those whose backoff has passed; never raises for a failed start."""
        now = self.clock()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                self._schedule_restart(child, now)
            if child.proc is None and child.next_start_at is not None and now >= child.next_start_at:
                self._restart(child, now)

    def _schedule_restart(self, child: Child, now: float) -> None:
        code = child.proc.returncode
        if now - child.started_at >= self.stable_s:
            child.backoff_s = self.min_backoff_s
        child.proc, child.next_start_at = None, now + child.backoff_s
        self.log(f"{child.name} exited with code {code}; restarting it in {child.backoff_s:g} s")
        child.backoff_s = min(max(child.backoff_s, self.min_backoff_s) * 2, self.max_backoff_s)

    def _restart(self, child: Child, now: float) -> None:
        try:
            child.proc = child.start()
        except OSError as exc:
            child.next_start_at = now + child.backoff_s
            self.log(f"could not restart {child.name} ({exc}); trying again in {child.backoff_s:g} s")
            return
        child.started_at, child.next_start_at = now, None
        child.restarts += 1
        self.log(f"restarted {child.name} (pid {child.proc.pid}, restart {child.restarts})")

    def processes(self) -> list[subprocess.Popen]:
        """The children's current processes (to stop them)."""
        return [c.proc for c in self.children if c.proc is not None]
