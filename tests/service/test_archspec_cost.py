"""The architecture-spec helper: one cheap subprocess per architecture, bounded in number and in cache size."""

from __future__ import annotations

import resource
import threading
import time

import pytest

from pruning.zoo import build_model
from service import engine_info
from tests.service.test_api_models import model_rows, upload


@pytest.fixture
def fresh_cache(monkeypatch):  # noqa: ANN001, ANN201
    """engine_info with empty caches, restored afterwards."""
    monkeypatch.setattr(engine_info, "_states", type(engine_info._states)())
    return engine_info


def counted_helper(monkeypatch) -> list[list[str]]:  # noqa: ANN001
    calls: list[list[str]] = []
    real = engine_info._run_archspec

    def counting(args: list[str]) -> dict:
        calls.append(list(args))
        return real(args)

    monkeypatch.setattr(engine_info, "_run_archspec", counting)
    return calls


@pytest.mark.slow
def test_one_helper_per_architecture_and_shapes_match_a_real_build(monkeypatch, fresh_cache):
    calls = counted_helper(monkeypatch)
    for arch in ("resnet20", "squeezenet1_0", "mobilenet_v3_small"):
        for num_classes, in_channels in ((10, 3), (7, 1), (1000, 4)):
            got = engine_info.expected_state(arch, num_classes, in_channels)
            model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
            real = {k: {"shape": list(v.shape), "is_float": v.is_floating_point()}
                    for k, v in model.state_dict().items()}
            assert got == real, (arch, num_classes, in_channels)
    assert len(calls) == 3, calls


def test_helpers_run_at_most_two_at_a_time(monkeypatch, fresh_cache):
    running, peak, lock = 0, 0, threading.Lock()

    def slow_helper(args: list[str]) -> dict:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.2)
        with lock:
            running -= 1
        return {"error": "fake"}

    monkeypatch.setattr(engine_info, "_spawn", slow_helper)
    threads = [threading.Thread(target=lambda a=a: pytest.raises(engine_info.EngineInputError,
                                                                 engine_info.expected_state, a, 10, 3))
               for a in ("resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn", "alexnet")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= peak <= engine_info.MAX_HELPERS == 2


def test_cache_is_bounded(monkeypatch, fresh_cache):
    monkeypatch.setattr(engine_info, "_spawn", lambda args: {"state": {}, "exact": True})
    for i in range(engine_info.CACHE_ENTRIES + 50):
        engine_info.expected_state(f"arch{i}", 10, 3)
    assert len(engine_info._states) == engine_info.CACHE_ENTRIES


@pytest.mark.slow
def test_architecture_over_the_size_limit_refused_before_reading_weights(env, tmp_path):
    tiny = tmp_path / "tiny.safetensors"
    header = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    tiny.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    before = model_rows(env)
    r = upload(env, env.key(), tiny, arch="vit_h_14")
    assert r.status_code == 422, r.text
    assert "vit_h_14 has 630,777,610 parameters" in r.json()["detail"]
    assert "LATPRUNE_MAX_ARCH_PARAMS" in r.json()["detail"]
    # Building vit_h_14's real weights took 3.3 GiB; the helper (every one this process waited for) stays far below.
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 1024 * 1024
    assert model_rows(env) == before


def test_architecture_without_an_exact_template_is_asked_per_shape(monkeypatch, fresh_cache):
    asked: list[list[str]] = []

    def helper(args: list[str]) -> dict:
        asked.append(args)
        if args[0] == "--template":
            return {"state": {"w": {"shape": [20, 3], "is_float": True}}, "exact": False}
        return {"state": {"w": {"shape": [2 * int(args[1]), int(args[2])], "is_float": True}}}

    monkeypatch.setattr(engine_info, "_spawn", helper)
    assert engine_info.expected_state("odd", 5, 1) == {"w": {"shape": [10, 1], "is_float": True}}
    assert engine_info.expected_state("odd", 5, 1) == {"w": {"shape": [10, 1], "is_float": True}}
    assert asked == [["--template", "odd"], ["odd", "5", "1"]]
