from __future__ import annotations

import pytest

from latency.device import (
    DeviceError,
    DeviceSpec,
    EnvironmentFingerprint,
    current_fingerprint,
    load_device,
    make_device,
    save_device,
)


def test_device_spec_json_round_trip(tmp_path):
    spec = make_device(name="edge-1", runtime="onnxruntime", provider="CPUExecutionProvider", threads=2, batch=4,
                       resolutions=[64, 32, 64], channel_multiple=8)
    assert spec.provider == "cpu"
    assert spec.resolutions == [32, 64]
    path = save_device(spec, tmp_path / "devices" / "edge-1.json")
    assert load_device(path) == spec
    assert DeviceSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("fields, words", [
    ({"name": "Bad/Name"}, "device name"),
    ({"name": "ok", "provider": "nosuch"}, "unknown onnxruntime provider"),
    ({"name": "ok", "precision": "fp16"}, "fp16 needs a GPU"),
    ({"name": "ok", "runtime": "torch", "provider": "openvino"}, "runtime torch supports"),
    ({"name": "ok", "threads": 0}, "threads"),
    ({"name": "ok", "resolutions": [2]}, "resolutions"),
])
def test_bad_device_specs_give_one_line_errors(fields, words):
    with pytest.raises(DeviceError) as err:
        make_device(**fields)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_load_device_rejects_garbage(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("{not json")
    with pytest.raises(DeviceError, match="not valid JSON"):
        load_device(path)
    with pytest.raises(DeviceError, match="no device file"):
        load_device(tmp_path / "missing.json")


def test_fingerprint_round_trip_and_mismatches():
    spec = make_device(name="cpu1", threads=1)
    fp = current_fingerprint(spec)
    assert fp.logical_cores >= 1 and fp.threads == 1 and fp.cpu_model
    assert EnvironmentFingerprint.model_validate_json(fp.model_dump_json()) == fp
    assert fp.mismatches(fp) == []
    other = current_fingerprint(make_device(name="cpu1", threads=2))
    diffs = fp.mismatches(other)
    assert diffs == ["threads: 1 != 2"]


def test_each_runtime_has_a_backend_that_says_what_it_times(tmp_path):
    import pytest

    from latency.backends import BACKENDS, backend_for
    from latency.device import DeviceSpec

    assert set(BACKENDS) == {"onnxruntime", "torch"}
    onnx = backend_for(DeviceSpec(name="o"))
    torch_backend = backend_for(DeviceSpec(name="t", runtime="torch"))
    assert onnx.uses_onnx and not torch_backend.uses_onnx
    with pytest.raises(ValueError, match="no ONNX file"):
        onnx.runner(DeviceSpec(name="o"), tmp_path / "missing.onnx", None, (1, 3, 8, 8))
    with pytest.raises(ValueError, match="needs the model"):
        torch_backend.runner(DeviceSpec(name="t", runtime="torch"), tmp_path / "m.onnx", None, (1, 3, 8, 8))
