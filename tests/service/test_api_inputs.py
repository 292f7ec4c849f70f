"""Hostile numbers and ids: non-finite JSON numbers, integers past 64 bits, odd device references -> 4xx."""

from __future__ import annotations

import json

import pytest

from tests.service.test_api_cohort import device, make_cohort
from tests.service.test_api_jobs import JOB, job_rows

BIG = 2**63  # one past the largest 64-bit signed integer: SQLite cannot bind it
INT4 = 2**31  # one past PostgreSQL's INTEGER, the type of every id column
HUGE = "99999999999999999999"


def post_raw(env, path: str, headers: dict, text: str):  # noqa: ANN001
    """POST `text` as a JSON body verbatim (json.dumps would refuse NaN only with allow_nan=False)."""
    return env.client.post(path, headers={**headers, "Content-Type": "application/json"}, content=text)


def job_text(**changes: str) -> str:
    """JOB as JSON text with some values replaced by raw JSON literals."""
    fields = {k: json.dumps(v) for k, v in JOB.items()}
    fields.update(changes)
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


@pytest.mark.parametrize(("changes", "loc", "literal"), [
    ({"budget": '{"kind": "flops", "value": NaN}'}, ["body", "budget", "value"], "NaN"),
    ({"budget": '{"kind": "macs", "value": 1e309}'}, ["body", "budget", "value"], "1e309"),
    ({"lr": "1e309"}, ["body", "lr"], "1e309"),
    ({"lr": "-Infinity"}, ["body", "lr"], "-Infinity"),
    ({"method": '"wgates"', "params": '{"lambda_init": 1e309}'}, ["body", "params", "lambda_init"], "1e309"),
    ({"params": '{"x": [1, {"y": Infinity}]}'}, ["body", "params", "x", 1, "y"], "Infinity"),
])
def test_non_finite_job_numbers_answer_422_naming_the_field(env, changes, loc, literal):
    before, sent = job_rows(env), len(env.recorder.sent)
    r = post_raw(env, "/v1/jobs", env.key(), job_text(**changes))
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert [e["loc"] for e in errors] == [loc]
    assert errors[0]["type"] == "finite_number" and errors[0]["input"] == literal
    assert "finite" in errors[0]["msg"]
    assert job_rows(env) == before and len(env.recorder.sent) == sent


@pytest.mark.parametrize("literal", ["NaN", "1e309", "Infinity"])
def test_non_finite_device_budget_refused(env, literal):
    headers = env.key()
    r = post_raw(env, "/v1/devices", headers, f'{{"name": "x", "latency_budget_ms": {literal}}}')
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "latency_budget_ms"]
    assert env.client.get("/v1/devices", headers=headers).json() == []


def test_overlong_integer_and_deep_nesting_in_a_body_answer_422(env):
    headers = env.key()
    long_int = post_raw(env, "/v1/jobs", headers, job_text(epochs="9" * 5000))
    assert long_int.status_code == 422, long_int.text
    assert long_int.json()["detail"][0]["loc"] == ["body", "epochs"]
    deep = post_raw(env, "/v1/jobs", headers, job_text(params='{"a": ' + "[" * 50_000 + "]" * 50_000 + "}"))
    assert deep.status_code == 422, deep.text
    assert "nested" in deep.json()["detail"][0]["msg"]


def id_routes(job: int, dev: int, model: int, big: int) -> list[tuple[str, str]]:
    """Every route with an id in its path, once with each id replaced by `big`."""
    return [
        ("GET", f"/v1/jobs/{big}"), ("POST", f"/v1/jobs/{big}/cancel"), ("GET", f"/v1/jobs/{big}/events"),
        ("GET", f"/v1/jobs/{big}/subnets"), ("GET", f"/v1/jobs/{big}/cohort"),
        ("GET", f"/v1/jobs/{big}/pareto.png"), ("GET", f"/v1/jobs/{big}/checkpoint?device={dev}"),
        ("POST", f"/v1/jobs/{big}/subnets/predict?device={dev}"),
        ("GET", f"/v1/jobs/{job}/checkpoint?device={big}"), ("POST", f"/v1/jobs/{job}/subnets/predict?device={big}"),
        ("GET", f"/v1/jobs/{job}/pareto.png?device={big}"),
        ("GET", f"/v1/devices/{big}"), ("GET", f"/v1/devices/{big}/predictors"),
        ("GET", f"/v1/models/{big}"),
    ]


def test_ids_out_of_range_answer_404_or_422(env):
    headers = env.key()
    dev = device(env, headers, "d1", budget=5.0)
    job = make_cohort(env, headers, [(16, 0.9, 100, {dev: (1.0, None)})])
    for big in (INT4, BIG, HUGE, -BIG - 1):
        for method, path in id_routes(job, dev, 1, big):
            r = env.client.request(method, path, headers=headers)
            assert r.status_code in (404, 422), (method, path, r.status_code, r.text)
        r = env.client.post(f"/v1/devices/{big}/profile", headers=headers, json={"arch": "resnet20"})
        assert r.status_code in (404, 422), (big, r.text)


def test_query_and_body_integers_out_of_range_answer_422(env):
    headers = env.key()
    for big in (INT4, BIG):
        assert env.client.get(f"/v1/jobs?offset={big}", headers=headers).status_code == 422
    fields = [{"model_id": n} for n in (INT4, BIG)]
    fields += [{"budget": {"kind": "latency_ms", "value": 1, "device_id": n}} for n in (INT4, BIG)]
    for field in fields:
        before = job_rows(env)
        r = env.client.post("/v1/jobs", headers=headers, json={**JOB, **field})
        assert r.status_code in (404, 422), r.text
        assert job_rows(env) == before


def test_event_cursor_out_of_range_answers_422_not_a_broken_stream(env):
    headers = env.key()
    job = env.client.post("/v1/jobs", headers=headers, json=JOB).json()["id"]
    for big in (INT4, BIG):
        r = env.client.get(f"/v1/jobs/{job}/events?after={big}&follow=false", headers=headers)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["query", "after"]
        r = env.client.get(f"/v1/jobs/{job}/events?follow=false", headers={**headers, "Last-Event-ID": str(big)})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["header", "last-event-id"]


@pytest.mark.parametrize("ref", ["%C2%B2", HUGE])
def test_device_reference_that_is_not_an_id_answers_404(env, ref):
    headers = env.key()
    dev = device(env, headers, "d2")
    job = make_cohort(env, headers, [(16, 0.9, 100, {dev: (1.0, None)})])
    for method, path in [("GET", f"/v1/jobs/{job}/checkpoint?device={ref}"),
                         ("POST", f"/v1/jobs/{job}/subnets/predict?device={ref}"),
                         ("GET", f"/v1/jobs/{job}/pareto.png?device={ref}")]:
        r = env.client.request(method, path, headers=headers)
        assert r.status_code == 404, (path, r.text)
        assert "device" in r.json()["detail"]


def test_non_finite_latency_query_refused(env):
    headers = env.key()
    dev = device(env, headers, "d3")
    job = make_cohort(env, headers, [(16, 0.9, 100, {dev: (1.0, None)})])
    for value in ("nan", "inf", "1e309"):
        r = env.client.get(f"/v1/jobs/{job}/checkpoint?device={dev}&latency_ms={value}", headers=headers)
        assert r.status_code == 422, (value, r.text)


def test_nul_characters_answer_422(env, weights_dir):
    # PostgreSQL text cannot hold NUL: these reached the database and answered 500 there.
    headers = env.key()
    with open(weights_dir / "good.safetensors", "rb") as f:
        r = env.client.post("/v1/models", headers=headers, data={"arch": "resnet20", "name": "a\x00b"},
                            files={"weights": ("w.safetensors", f)})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"], r.text
    r = post_raw(env, "/v1/jobs", headers, job_text(dataset='"synthetic:4x16"', method='"l1"',
                                                     params='{"allocation": "uni\\u0000form"}'))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "params", "allocation"], r.text
    dev = device(env, headers, "d4")
    job = make_cohort(env, headers, [(16, 0.9, 100, {dev: (1.0, None)})])
    r = env.client.get(f"/v1/jobs/{job}/checkpoint?device=d%004", headers=headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "device"], r.text


def test_long_or_nul_file_name_becomes_a_storable_model_name(env, weights_dir):
    headers = env.key()
    with open(weights_dir / "good.safetensors", "rb") as f:
        r = env.client.post("/v1/models", headers=headers, data={"arch": "resnet20"},
                            files={"weights": ("w" * 300 + ".safetensors", f)})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "w" * 128
