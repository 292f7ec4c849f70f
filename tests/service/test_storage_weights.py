"""Artifact store (atomic, confined to its root) and torch-free safetensors checks."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest

from service.storage import ArtifactStore, StorageError, sha256_file
from service.weights import WeightsRejected, check_against, check_finite, read_header


def test_store_put_and_confinement(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    src = tmp_path / "a.bin"
    src.write_bytes(b"hello")
    stored = store.put_file(src, "jobs/1/a.bin")
    assert stored.size_bytes == 5 and stored.sha256 == sha256_file(src)
    assert store.verify("jobs/1/a.bin", stored.sha256)
    for bad in ("../x", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(StorageError):
            store.resolve(bad)
    with pytest.raises(StorageError, match="limit"):
        store.put_stream(io.BytesIO(b"x" * 100), "jobs/1/b.bin", max_bytes=10)
    assert not store.exists("jobs/1/b.bin")
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def _safetensors(tensors: dict[str, tuple[str, list[int], bytes]], path):  # noqa: ANN001
    header, offset, data = {}, 0, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_header_checks(tmp_path):
    ok = _safetensors({"w": ("F32", [2], np.array([1, 2], "<f4").tobytes())}, tmp_path / "ok.st")
    assert read_header(ok)["w"]["shape"] == [2]
    wrong = _safetensors({"w": ("F32", [3], np.array([1, 2], "<f4").tobytes())}, tmp_path / "w.st")
    with pytest.raises(WeightsRejected, match="does not match its shape"):
        read_header(wrong)
    odd = _safetensors({"w": ("C64", [1], b"\0" * 8)}, tmp_path / "c.st")
    with pytest.raises(WeightsRejected, match="not supported"):
        read_header(odd)
    trailing = tmp_path / "t.st"
    trailing.write_bytes(ok.read_bytes() + b"junk")
    with pytest.raises(WeightsRejected, match="trailing"):
        read_header(trailing)


def test_bfloat16_nan_found(tmp_path):
    bf16_nan = struct.pack("<H", 0x7FC0)
    bf16_one = struct.pack("<H", 0x3F80)
    path = _safetensors({"ok": ("BF16", [1], bf16_one), "bad": ("BF16", [2], bf16_one + bf16_nan)}, tmp_path / "b")
    with pytest.raises(WeightsRejected, match="'bad' contains NaN"):
        check_finite(path, read_header(path))


def test_check_against_layout():
    header = {"w": {"dtype": "F32", "shape": [2, 3]}, "n": {"dtype": "F32", "shape": []}}
    expected = {"w": {"shape": [2, 3], "is_float": True}, "n": {"shape": [], "is_float": False}}
    with pytest.raises(WeightsRejected, match="integer dtype"):
        check_against(header, expected)
    with pytest.raises(WeightsRejected, match="missing"):
        check_against({"w": header["w"]}, expected)
