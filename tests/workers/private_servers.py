"""Private Redis and PostgreSQL servers for fault tests: started in a temporary directory on free ports, so a test
may stop and restart them without touching the shared servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), Path("/usr/local/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, up: bool, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if (s.connect_ex(("127.0.0.1", port)) == 0) == up:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not go {'up' if up else 'down'}")


class PrivateRedis:
    """redis-server with an append-only file, as docker-compose runs it: a restart keeps the queued tasks."""

    def __init__(self, directory: Path):
        self.dir, self.port, self.proc = directory, free_port(), None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.dir / "redis.log", "a")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                     stdout=log, stderr=subprocess.STDOUT)
        _wait_port(self.port, True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class PrivatePostgres:
    """A PostgreSQL cluster of its own (trust auth, user root, database postgres), run as the postgres user.

    Its directory is made directly under the system's temporary directory: the postgres user must reach it.
    """

    def __init__(self):
        self.dir, self.port = Path(tempfile.mkdtemp(prefix="latprune-pg-")), free_port()
        shutil.chown(self.dir, "postgres")
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "root", "--no-sync", "-E", "UTF8")

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://root@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"), "-w", "-o",
                 f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        _wait_port(self.port, True)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `immediate` is a crash (no shutdown checkpoint, clients cut off)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        _wait_port(self.port, False)

    def restart(self, down_s: float = 0.0, mode: str = "fast") -> None:
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)
