"""POST /v1/models: only safetensors weights that match the architecture are kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.db import session_scope
from service.models import Model


def upload(env, headers, path: Path, arch: str = "resnet20", **form):  # noqa: ANN001
    with open(path, "rb") as f:
        return env.client.post("/v1/models", headers=headers, data={"arch": arch, **form},
                               files={"weights": (path.name, f, "application/octet-stream")})


def stored_files(env) -> list[Path]:  # noqa: ANN001
    root = env.settings.artifact_dir
    return sorted(p for p in root.rglob("*") if p.is_file())


def model_rows(env) -> int:  # noqa: ANN001
    with session_scope(env.database_url) as s:
        return s.scalar(select(func.count()).select_from(Model))


def test_upload_valid_weights(env, weights_dir):
    headers = env.key()
    r = upload(env, headers, weights_dir / "good.safetensors", name="base")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["arch"] == "resnet20" and body["num_classes"] == 10 and body["name"] == "base"
    assert len(body["sha256"]) == 64
    assert env.client.get(f"/v1/models/{body['id']}", headers=headers).json()["sha256"] == body["sha256"]
    assert [m["id"] for m in env.client.get("/v1/models", headers=headers).json()] == [body["id"]]


@pytest.mark.parametrize(("name", "form", "needle"), [
    ("pickle.safetensors", {}, "not a safetensors file"),
    ("truncated.safetensors", {}, "truncated"),
    ("shapes.safetensors", {}, "shape"),
    ("nan.safetensors", {}, "NaN"),
    ("good.safetensors", {"in_channels": "1"}, "shape"),
])
def test_bad_weights_rejected_and_nothing_kept(env, weights_dir, name, form, needle):
    before_files, before_rows = stored_files(env), model_rows(env)
    r = upload(env, env.key(), weights_dir / name, **form)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]
    assert stored_files(env) == before_files
    assert model_rows(env) == before_rows


def test_unknown_arch_rejected(env, weights_dir):
    r = upload(env, env.key(), weights_dir / "good.safetensors", arch="resnet21")
    assert r.status_code == 422 and "unknown architecture" in r.json()["detail"]


def test_oversized_upload_refused(env, tmp_path):
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (env.settings.max_upload_bytes + 200_000))
    before_files, before_rows = stored_files(env), model_rows(env)
    r = upload(env, env.key(), big)
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]
    assert stored_files(env) == before_files and model_rows(env) == before_rows
