"""Property-based fuzzing of every operation from the OpenAPI document (schemathesis, in-process ASGI), on
SQLite and on PostgreSQL.

Asserts no server error, no status code the document does not declare and no response body that violates its
declared schema: per operation with generated (valid and invalid) inputs, and statefully, creating devices,
models and jobs and then reading them through the links schemathesis infers.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from service import engine_info
from service.app import create_app
from service.db import session_scope
from service.settings import Settings
from tests.service.conftest import Recorder, make_database

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
EXAMPLES = 12  # per operation, mode and backend: about two minutes in all on the 2-core machine
# An upload waits for the architecture helper (a Python process importing torch), slow on a loaded machine.
REQUEST_TIMEOUT_S = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fuzz_app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """An app on its own database of each backend, an admin key's headers, the database URL."""
    home = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    url = make_database(request.param, home, request)
    app = create_app(Settings(home=home, database_url=url, broker_url="memory://", max_upload_bytes=2_000_000),
                     dispatch=Recorder())
    # Ask the architecture helpers now, not inside a fuzzed request with its timeout.
    engine_info.expected_state("resnet20", 10, 3)
    # The PostgreSQL schema is the session's (conftest), shared with the other API tests; every run here is its
    # own tenant, and the session's teardown disposes of the engines.
    return app, tenant_headers(url, admin=True), url


def tenant_headers(url: str, admin: bool) -> dict[str, str]:
    """Authorization headers of a new tenant's key."""
    from service.auth import create_key

    with session_scope(url) as session:
        key, _ = create_key(session, f"fuzz-{secrets.token_hex(6)}", is_admin=admin)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def api_schema(fuzz_app):  # noqa: ANN001, ANN201
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app[0])


def bounded(case) -> None:  # noqa: ANN001
    """Event streams follow a running job until it ends; the fuzz reads what is there and stops."""
    if case.path.endswith("/events"):
        case.query = {**(case.query or {}), "follow": "false"}


def operations(api_schema) -> list:  # noqa: ANN001
    ops = [result.ok() for result in api_schema.get_all_operations()]
    assert len(ops) >= 20, [op.label for op in ops]
    return ops


# Plain hypothesis over schemathesis' strategies: its pytest plugin does not run on pytest 9.
@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation(api_schema, fuzz_app, mode):  # noqa: ANN001
    failures = []
    for operation in operations(api_schema):
        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):  # noqa: ANN001, ANN202
            bounded(case)
            case.call_and_validate(headers=dict(fuzz_app[1]), checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, operation.label  # nothing of it can be made invalid
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def steer(case, weights: bytes) -> None:  # noqa: ANN001
    """Generated devices, jobs and uploads rarely have a valid device name, a real method, architecture or
    weights file; make them so, in a way that depends only on the generated case (hypothesis replays runs), so
    that the stateful run creates rows and reads them back (the per-operation run covers the refusals)."""
    if case.method == "POST" and case.path == "/v1/devices" and isinstance(case.body, dict):
        digest = hashlib.sha256(repr(case.body.get("name")).encode()).hexdigest()[:8]
        case.body = {**case.body, "name": f"dev-{digest}"}
    if case.method == "POST" and case.path == "/v1/jobs" and isinstance(case.body, dict):
        case.body = {**case.body, "method": "l1", "arch": "resnet20", "dataset": "synthetic:10x32", "params": {}}
    if case.method == "POST" and case.path == "/v1/models" and isinstance(case.body, dict):
        case.body = {**case.body, "arch": "resnet20", "num_classes": 10, "in_channels": 3, "weights": weights}


@pytest.mark.slow
def test_create_then_read(api_schema, fuzz_app, weights_dir):  # noqa: ANN001
    url = fuzz_app[2]
    weights = (weights_dir / "good.safetensors").read_bytes()
    seen: Counter = Counter()

    class Workflow(api_schema.as_state_machine()):
        def setup(self) -> None:
            # Each run starts as a new tenant with no rows: what it lists and links to depends only on its own
            # steps, which hypothesis needs to replay a run.
            self.headers = tenant_headers(url, admin=False)

        def get_call_kwargs(self, case):  # noqa: ANN001, ANN202
            bounded(case)
            steer(case, weights)
            return {"headers": dict(self.headers), "timeout": REQUEST_TIMEOUT_S}

        def validate_response(self, response, case, additional_checks=(), **kwargs):  # noqa: ANN001, ANN202
            seen[(case.method, case.path, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS)

    Workflow.run(settings=settings(max_examples=40, stateful_step_count=10, deadline=None, derandomize=True,
                                   database=None, suppress_health_check=list(HealthCheck)))
    # Each kind of row was created, and read back: listed (the tenant is the run's own) or fetched by id.
    for created in ("/v1/devices", "/v1/jobs", "/v1/models"):
        reads = sum(n for (method, path, status), n in seen.items()
                    if method == "GET" and path.startswith(created) and status == 200)
        assert seen["POST", created, 201] and reads, "\n".join(map(str, sorted(seen.items())))
