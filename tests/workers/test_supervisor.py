"""The supervisor of `latprune up`: exited children come back after a backoff that grows while they keep dying
and starts over once they have run a while."""

from __future__ import annotations

from service.supervisor import Child, Supervisor


class FakeProc:
    _next_pid = 100

    def __init__(self) -> None:
        FakeProc._next_pid += 1
        self.pid, self.returncode = FakeProc._next_pid, None

    def poll(self) -> int | None:
        return self.returncode


def test_restarts_with_growing_backoff_that_resets_after_a_stable_run():
    now = [0.0]
    started: list[FakeProc] = []
    messages: list[str] = []

    def start() -> FakeProc:
        started.append(FakeProc())
        return started[-1]

    sup = Supervisor([Child("worker", start)], messages.append, min_backoff_s=1, max_backoff_s=4, stable_s=60,
                     clock=lambda: now[0])
    sup.adopt("worker", start())

    def die_and_restart_after(delay: float) -> None:
        started[-1].returncode = -9
        sup.poll()
        now[0] += delay - 0.01
        sup.poll()
        assert started[-1].returncode == -9, "restarted before its backoff"
        now[0] += 0.01
        sup.poll()
        assert started[-1].returncode is None, "not restarted after its backoff"

    for delay in (1, 2, 4, 4):  # a crash loop slows down, up to the maximum
        die_and_restart_after(delay)
    now[0] += 60  # a stable run: the next death is repaired at once again
    die_and_restart_after(1)
    assert sup.child("worker").restarts == 5 and sup.processes() == [started[-1]]
    assert messages[0] == "worker exited with code -9; restarting it in 1 s"
    assert messages[1] == f"restarted worker (pid {started[1].pid}, restart 1)"


def test_a_failed_start_is_retried():
    now = [0.0]
    attempts = []

    def start() -> FakeProc:
        attempts.append(now[0])
        if len(attempts) == 1:
            raise OSError("no such file")
        return FakeProc()

    messages: list[str] = []
    sup = Supervisor([Child("API", start)], messages.append, clock=lambda: now[0])
    dead = FakeProc()
    dead.returncode = 1
    sup.adopt("API", dead)
    for t in (0.0, 1.0, 2.0, 3.0):
        now[0] = t
        sup.poll()
    assert attempts == [1.0, 3.0] and sup.processes() and "could not restart API (no such file)" in messages[1]
