"""What would fail later in the worker is refused at submission: missing dataset roots, weights that do not fit
the job's dataset, safetensors headers that cannot be loaded."""

from __future__ import annotations

import struct

import pytest

from tests.service.test_api_jobs import JOB, job_rows
from tests.service.test_api_models import model_rows, stored_files, upload


def submit(env, headers, **changes):  # noqa: ANN001
    return env.client.post("/v1/jobs", headers=headers, json={**JOB, **changes})


def refused(env, headers, needle: str, **changes) -> None:  # noqa: ANN001
    before, sent = job_rows(env), len(env.recorder.sent)
    r = submit(env, headers, **changes)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"], r.text
    assert job_rows(env) == before and len(env.recorder.sent) == sent


def test_imagefolder_root_must_exist(env):
    headers = env.key()
    refused(env, headers, "no directory 'absent-folder'", dataset="imagefolder:absent-folder")
    (env.settings.data_root / "a-file").write_text("not a folder")
    refused(env, headers, "no directory 'a-file'", dataset="imagefolder:a-file")
    for name in ("cat", "dog"):
        (env.settings.data_root / "pets" / name).mkdir(parents=True, exist_ok=True)
    assert submit(env, headers, dataset="imagefolder:pets").status_code == 201


def test_torchvision_files_must_be_under_the_data_root(env):
    headers = env.key()
    refused(env, headers, "no CIFAR100 files", dataset="torchvision:CIFAR100")
    (env.settings.data_root / "KMNIST" / "raw").mkdir(parents=True, exist_ok=True)
    assert submit(env, headers, dataset="torchvision:kmnist").status_code == 201


def test_uploaded_weights_must_fit_the_jobs_dataset(env, weights_dir):
    headers = env.key()
    model = upload(env, headers, weights_dir / "good.safetensors").json()  # resnet20, 10 classes, 3 channels
    refused(env, headers, "10 classes", model_id=model["id"], dataset="synthetic:4x16")
    refused(env, headers, "3 input channels", model_id=model["id"], dataset="builtin:digits")
    for name in ("a", "b", "c"):
        (env.settings.data_root / "three" / "train" / name).mkdir(parents=True, exist_ok=True)
        (env.settings.data_root / "three" / "val" / name).mkdir(parents=True, exist_ok=True)
    refused(env, headers, "imagefolder:three has 3", model_id=model["id"], dataset="imagefolder:three")
    assert submit(env, headers, model_id=model["id"], dataset="synthetic:10x32").status_code == 201


def safetensors_bytes(header_json: str, data: bytes = b"\0\0\0\0") -> bytes:
    raw = header_json.encode()
    return struct.pack("<Q", len(raw)) + raw + data


TENSOR = '"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


@pytest.mark.parametrize(("header", "needle"), [
    ('{"__metadata__": {"k": ' + "9" * 5000 + "}, " + TENSOR + "}", "header"),
    ('{"__metadata__": ' + "[" * 50_000 + "]" * 50_000 + ", " + TENSOR + "}", "header"),
    ('{"__metadata__": {"k": 1}, ' + TENSOR + "}", "__metadata__"),
    ('{"__metadata__": {"k": ["a"]}, ' + TENSOR + "}", "__metadata__"),
    ('{"__metadata__": ["a", "b"], ' + TENSOR + "}", "__metadata__"),
    ('{"__metadata__": {"k": NaN}, ' + TENSOR + "}", "NaN"),
    ('{"__metadata__": {"k": "v"}, "t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "NaN"),
])
def test_unloadable_safetensors_header_refused_at_upload(env, tmp_path, header, needle):
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(header))
    before_files, before_rows = stored_files(env), model_rows(env)
    r = upload(env, env.key(), path)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"], r.text
    assert stored_files(env) == before_files and model_rows(env) == before_rows
