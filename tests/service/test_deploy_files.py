"""docker-compose.yml, the Dockerfile and the wheel (Docker cannot run here: their structure is checked)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
LATPRUNE_SERVICES = ("migrate", "api", "worker-gpu", "worker-cpu")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_wiring():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"api", "worker-gpu", "worker-cpu", "redis", "postgres", "flower", "migrate"}
    for name in ("api", "worker-gpu", "worker-cpu", "redis", "postgres", "flower"):
        assert "test" in services[name]["healthcheck"], name
    for name in LATPRUNE_SERVICES:
        service = services[name]
        assert service["image"] == "latprune:latest" and service["build"] == "."
        env = service["environment"]
        db = make_url(env["LATPRUNE_DATABASE_URL"])
        postgres = services["postgres"]["environment"]
        assert (db.drivername, db.host, db.port, db.username, db.password, db.database) == (
            "postgresql+psycopg", "postgres", 5432, postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"])
        assert re.fullmatch(r"redis://redis:6379/\d+", env["LATPRUNE_BROKER_URL"])
        assert "artifacts:/var/lib/latprune" in service["volumes"]
        assert env["LATPRUNE_ARTIFACT_DIR"].startswith("/var/lib/latprune/")
    for name in ("api", "worker-gpu", "worker-cpu"):
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["latprune", "db", "upgrade"]
    assert "service.app:create_app" in services["api"]["command"] and "--factory" in services["api"]["command"]
    assert "8000:8000" in services["api"]["ports"]


def test_compose_workers_and_volumes():
    compose = _compose()
    services = compose["services"]
    gpu = services["worker-gpu"]
    command = gpu["command"]
    assert command[command.index("-Q") + 1] == "prune"
    (reservation,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]
    cpu_command = " ".join(services["worker-cpu"]["command"])
    assert "-Q" in cpu_command and "profile." in cpu_command and "--concurrency 1" in cpu_command
    assert "deploy" not in services["worker-cpu"]
    assert "redis://redis:6379/0" in " ".join(services["flower"]["command"])
    named = set(compose["volumes"])
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert used <= named and {"pgdata", "redisdata", "artifacts"} <= named


def test_dockerfile_installs_the_package():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert re.search(r'pip install .*"\.\[service\]"', text)
    for package in ("pruning", "latency", "service", "workers", "migrations"):
        assert f"COPY {package} ./{package}" in text
    assert "USER latprune" in text and "EXPOSE 8000" in text


def test_wheel_ships_the_migrations(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("pruning", "latency", "service", "workers", "migrations"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("latprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"migrations/env.py", "migrations/script.py.mako", "migrations/versions/0001_initial_schema.py",
            "service/app.py", "workers/tasks.py"} <= names
    # The console is served from the installed package (the Docker image does not install in place).
    assert {"service/console/index.html", "service/console/console.css", "service/console/js/app.js"} <= names
    assert {f"service/console/js/{p.name}" for p in (ROOT / "service" / "console" / "js").glob("*.js")} <= names
