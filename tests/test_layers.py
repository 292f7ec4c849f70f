"""The package layers (docs/engine.md, "Layers"): every import, at module level or inside a function, goes down
the stack service/workers -> latency -> pruning, and the API never imports the workers' Celery modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages it must never import
FORBIDDEN = {
    "pruning": {"latency", "service", "workers"},
    "latency": {"service", "workers"},
    # The API process sends tasks by name (service/contracts.py); the workers import the service, not back.
    "service": {"workers"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in the file, relative imports excluded."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def violations(package: str, forbidden: set[str]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for name, line in sorted(imported_packages(path)) if name in forbidden]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_go_down_the_layers(package):
    assert violations(package, FORBIDDEN[package]) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from workers.celery_app import make_celery\n    import latency.timing\n")
    assert imported_packages(module) == {("workers", 2), ("latency", 3)}
