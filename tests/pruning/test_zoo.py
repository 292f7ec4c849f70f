import pickle

import pytest
import torch
from safetensors.torch import save_file

from pruning import zoo


@pytest.mark.parametrize("arch", ["resnet20", "vgg16_bn", "resnet18", "mobilenet_v2"])
def test_build_respects_classes_and_channels(arch):
    model = zoo.build_model(arch, num_classes=7, in_channels=1).eval()
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 7)


def test_unknown_arch_lists_known():
    with pytest.raises(zoo.ArchError, match="known: .*resnet20"):
        zoo.build_model("resnet21")


def test_describe_rebuild_round_trip_keeps_pruned_widths(tmp_path):
    model = zoo.build_model("resnet20", 10, 3)
    arch = zoo.describe(model, "resnet20", 10, 3, 32)
    arch["layers"]["layer1.0.conv1"]["out_channels"] = 5
    arch["layers"]["layer1.0.bn1"]["num_features"] = 5
    arch["layers"]["layer1.0.conv2"]["in_channels"] = 5
    zoo.save_arch(arch, tmp_path / "arch.json")
    rebuilt = zoo.rebuild(zoo.load_arch(tmp_path / "arch.json"))
    assert rebuilt.layer1[0].conv1.out_channels == 5
    assert rebuilt(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    zoo.save_weights(rebuilt, tmp_path / "w.safetensors")
    again, _ = zoo.load_pruned(tmp_path / "arch.json", tmp_path / "w.safetensors")
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def test_rebuild_rejects_inconsistent_arch():
    arch = zoo.describe(zoo.build_model("resnet20"), "resnet20", 10, 3, 32)
    arch["layers"]["layer1.0.conv1"]["out_channels"] = 0
    with pytest.raises(zoo.ArchError, match="positive integer"):
        zoo.rebuild(arch)
    arch = zoo.describe(zoo.build_model("resnet20"), "resnet20", 10, 3, 32)
    arch["layers"]["nope"] = {"type": "Conv2d"}
    with pytest.raises(zoo.ArchError, match="does not have"):
        zoo.rebuild(arch)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_weights_validates(tmp_path):
    model = zoo.build_model("resnet20")
    bad_shape = _state(model)
    bad_shape["fc.weight"] = torch.zeros(3, 3)
    save_file(bad_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(zoo.WeightsError, match="fc.weight: shape"):
        zoo.load_weights(zoo.build_model("resnet20"), tmp_path / "shape.safetensors")

    nan = _state(model)
    nan["conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(zoo.WeightsError, match="NaN"):
        zoo.load_weights(zoo.build_model("resnet20"), tmp_path / "nan.safetensors")

    missing = _state(model)
    del missing["fc.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(zoo.WeightsError, match="missing"):
        zoo.load_weights(zoo.build_model("resnet20"), tmp_path / "missing.safetensors")

    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"fc.weight": [1, 2]}))
    with pytest.raises(zoo.WeightsError, match="not a valid safetensors"):
        zoo.load_weights(zoo.build_model("resnet20"), tmp_path / "pickle.safetensors")

    save_file(_state(model), str(tmp_path / "ok.safetensors"))
    with pytest.raises(zoo.WeightsError, match="limit"):
        zoo.load_weights(zoo.build_model("resnet20"), tmp_path / "ok.safetensors", max_bytes=100)
    loaded = zoo.load_weights(zoo.build_model("resnet20"), tmp_path / "ok.safetensors")
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)
