from __future__ import annotations

import pytest

from latency.device import current_fingerprint, make_device
from latency.samples import LatencySample, SampleStore, StoreError


def sample(key: str, ms: float = 1.0) -> LatencySample:
    fp = current_fingerprint(make_device(name="cpu1"))
    return LatencySample(key=key, kind="random", arch="resnet20", resolution=16, keep_counts=[3, 4],
                         latency_ms=ms, iqr_ratio=0.01, reference_ms=2.0, reference_iqr_ratio=0.01, ratio=ms / 2,
                         runs=10, measured_at=1.0, fingerprint=fp)


def test_append_and_load(tmp_path):
    store = SampleStore(tmp_path / "p" / "a.jsonl")
    assert store.load() == []
    store.append(sample("a"))
    store.append(sample("b", 2.0))
    assert [s.key for s in store.load()] == ["a", "b"]
    assert store.load()[1].latency_ms == 2.0


def test_interrupted_write_is_dropped_and_overwritten(tmp_path):
    store = SampleStore(tmp_path / "a.jsonl")
    store.append(sample("a"))
    with store.path.open("a") as fh:
        fh.write(sample("half").model_dump_json()[:40])  # the process died mid-line
    assert [s.key for s in store.load()] == ["a"]
    store.append(sample("b"))
    assert [s.key for s in store.load()] == ["a", "b"]
    assert store.path.read_text().count("\n") == 2


def test_corrupt_line_is_an_error_naming_the_line(tmp_path):
    store = SampleStore(tmp_path / "a.jsonl")
    store.append(sample("a"))
    with store.path.open("a") as fh:
        fh.write("{\"key\": 1}\n")
    with pytest.raises(StoreError, match=r"a.jsonl:2"):
        store.load()
