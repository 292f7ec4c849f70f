"""The OpenAPI contract: timestamps carry a timezone, 4xx bodies match what the document declares."""

from __future__ import annotations

from datetime import datetime

import jsonschema_rs
import pytest

from tests.service.test_api_cohort import device

STAMPS = ("created_at", "started_at", "finished_at")


def aware(body: dict) -> None:
    for field in STAMPS:
        if body.get(field) is not None:
            assert datetime.fromisoformat(body[field]).tzinfo is not None, (field, body[field])


def test_timestamps_read_back_carry_a_timezone(env):
    headers = env.key()
    dev = device(env, headers, "tz-dev")
    job = env.client.post("/v1/jobs", headers=headers, json={
        "method": "l1", "arch": "resnet20", "dataset": "synthetic:4x16", "budget": {"kind": "flops", "value": 0.5}})
    job_id = job.json()["id"]
    predictor = env.client.post(f"/v1/devices/{dev}/profile", headers=headers, json={"arch": "resnet20"})
    bodies = [env.client.get(f"/v1/devices/{dev}", headers=headers).json(),
              *env.client.get("/v1/devices", headers=headers).json(),
              env.client.get(f"/v1/jobs/{job_id}", headers=headers).json(),
              *env.client.get("/v1/jobs", headers=headers).json()["items"],
              env.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).json(),
              predictor.json(), *env.client.get(f"/v1/devices/{dev}/predictors", headers=headers).json()]
    for body in bodies:
        aware(body)


def response_schema(openapi: dict, path: str, method: str, status: int) -> dict:
    content = openapi["paths"][path][method]["responses"][str(status)]["content"]["application/json"]
    return {**content["schema"], "components": openapi["components"]}


@pytest.mark.parametrize(("method", "path", "template", "kwargs", "status"), [
    ("post", "/v1/jobs", "/v1/jobs", {"json": {"method": "nope", "arch": "resnet20", "dataset": "builtin:digits",
                                                "budget": {"kind": "flops", "value": 0.5}}}, 422),
    ("post", "/v1/jobs", "/v1/jobs", {"json": {"surprise": 1}}, 422),
    ("get", "/v1/jobs/123456789", "/v1/jobs/{job_id}", {}, 404),
    ("get", "/v1/devices/123456789", "/v1/devices/{device_id}", {}, 404),
    ("get", "/v1/models/123456789", "/v1/models/{model_id}", {}, 404),
    ("post", "/v1/devices", "/v1/devices", {"content": b"{" + b" " * 2_000_000 + b"}"}, 413),
])
def test_error_bodies_match_the_declared_schema(env, method, path, template, kwargs, status):
    openapi = env.client.get("/openapi.json").json()
    r = env.client.request(method.upper(), path, headers={**env.key(), "Content-Type": "application/json"},
                           **kwargs)
    assert r.status_code == status, r.text
    jsonschema_rs.validate(response_schema(openapi, template, method, status), r.json())


def test_every_operation_declares_its_error_statuses(env):
    paths = env.client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            declared = set(operation["responses"])
            if path.startswith("/v1/"):
                assert "401" in declared, (method, path)
            if "{" in path:
                assert "404" in declared, (method, path)
            if method == "post":
                assert {"413", "422"} <= declared, (method, path)
    assert "409" in paths["/v1/devices"]["post"]["responses"]
    assert "409" in paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"]


def test_validation_errors_are_always_serializable():
    import asyncio
    import json

    from fastapi.exceptions import RequestValidationError

    from service.errors import ValidationErrorOut, validation_error_handler

    exc = RequestValidationError([{"loc": ("body", "x", 0), "msg": "m", "type": "t", "input": [float("nan"), b"\xff"],
                                   "ctx": {"error": ValueError("bad"), "limit": float("inf")}}])
    response = asyncio.run(validation_error_handler(None, exc))
    body = json.loads(response.body)
    assert response.status_code == 422
    assert body == {"detail": [{"loc": ["body", "x", 0], "msg": "m", "type": "t", "input": ["nan", "\ufffd"],
                                "ctx": {"error": "bad", "limit": "inf"}}]}
    ValidationErrorOut.model_validate(body)
