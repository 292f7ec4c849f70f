"""Architectures by name, and the arch.json description that rebuilds a pruned model without pickle."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCH_FORMAT = "latprune.arch/1"
CIFAR_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Layer types whose shapes arch.json records; everything else is rebuilt from the architecture name.
SHAPED_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


class ArchError(ValueError):
    """Unknown architecture or an arch.json that does not describe a buildable model."""


class WeightsError(ValueError):
    """Weights that do not match the architecture (keys, shapes, dtypes, non-finite values)."""


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; projection shortcut (1x1 conv + BN) when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ArchError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class CifarVGG(nn.Module):
    """VGG-16 with BN for small inputs; adaptive pooling makes it resolution-independent."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def known_archs() -> list[str]:
    """Names accepted by build_model: the CIFAR models and torchvision's classification models."""
    from torchvision import models

    return sorted([*CIFAR_RESNET_DEPTHS, "vgg16_bn"]) + sorted(
        n for n in models.list_models(module=models) if n != "vgg16_bn"
    )


def build_model(arch: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A freshly initialised dense model of architecture `arch` (no pretrained weights)."""
    if arch in CIFAR_RESNET_DEPTHS:
        return CifarResNet(CIFAR_RESNET_DEPTHS[arch], num_classes, in_channels)
    if arch == "vgg16_bn":
        return CifarVGG(num_classes, in_channels)
    from torchvision import models

    if arch not in models.list_models(module=models):
        raise ArchError(f"unknown architecture {arch!r}; known: {', '.join(known_archs())}")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=True)
    model = models.get_model(arch, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    set_submodule(model, name, _conv_like(conv, in_channels, conv.out_channels, conv.groups))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     groups, conv.bias is not None, conv.padding_mode)


def describe(model: nn.Module, arch: str, num_classes: int, in_channels: int, resolution: int) -> dict:
    """The arch.json of `model`: architecture name plus the shape of every conv, linear and BN layer."""
    layers: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            layers[name] = {"type": "Conv2d", "in_channels": m.in_channels,
                            "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            layers[name] = {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            layers[name] = {"type": type(m).__name__, "num_features": m.num_features}
    return {"format": ARCH_FORMAT, "arch": arch, "num_classes": num_classes, "in_channels": in_channels,
            "resolution": resolution, "layers": layers}


def widths(arch_json: Mapping) -> dict[str, int]:
    """Output width of every conv/linear/BN layer named in an arch.json."""
    out = {}
    for name, spec in arch_json["layers"].items():
        out[name] = spec.get("out_channels", spec.get("out_features", spec.get("num_features")))
    return out


def rebuild(arch_json: Mapping) -> nn.Module:
    """Build the (possibly pruned) model an arch.json describes, with fresh weights."""
    if arch_json.get("format") != ARCH_FORMAT:
        raise ArchError(f"arch.json format must be {ARCH_FORMAT!r}, got {arch_json.get('format')!r}")
    try:
        model = build_model(arch_json["arch"], int(arch_json["num_classes"]), int(arch_json["in_channels"]))
        layers = arch_json["layers"]
    except KeyError as exc:
        raise ArchError(f"arch.json lacks field {exc}") from None
    dense = dict(model.named_modules())
    for name, spec in layers.items():
        if name not in dense:
            raise ArchError(f"arch.json names layer {name!r}, which {arch_json['arch']} does not have")
        set_submodule(model, name, _reshaped(dense[name], spec, name))
    missing = [n for n, m in dense.items() if isinstance(m, SHAPED_TYPES) and n not in layers]
    if missing:
        raise ArchError(f"arch.json lacks layers {missing[:5]}")
    return model


def _positive(spec: Mapping, key: str, name: str) -> int:
    value = spec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArchError(f"layer {name!r}: {key} must be a positive integer, got {value!r}")
    return value


def _reshaped(module: nn.Module, spec: Mapping, name: str) -> nn.Module:
    kind = spec.get("type")
    if kind != type(module).__name__:
        raise ArchError(f"layer {name!r} is {type(module).__name__} in the architecture, arch.json says {kind}")
    if isinstance(module, nn.Conv2d):
        cin, cout = _positive(spec, "in_channels", name), _positive(spec, "out_channels", name)
        groups = _positive(spec, "groups", name)
        if cin % groups or cout % groups:
            raise ArchError(f"layer {name!r}: channels {cin}->{cout} not divisible by groups {groups}")
        return _conv_like(module, cin, cout, groups)
    if isinstance(module, nn.Linear):
        return nn.Linear(_positive(spec, "in_features", name), _positive(spec, "out_features", name),
                         module.bias is not None)
    return type(module)(_positive(spec, "num_features", name), module.eps, module.momentum, module.affine,
                        module.track_running_stats)


def save_arch(arch_json: Mapping, path: str | Path) -> None:
    """Write arch.json."""
    Path(path).write_text(json.dumps(arch_json, indent=1))


def load_arch(path: str | Path) -> dict:
    """Read arch.json (plain JSON; never executed)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ArchError(f"{path} is not valid JSON: {exc}") from None


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's state dict as safetensors (contiguous, de-aliased copies)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise WeightsError unless `state` has exactly the model's keys, shapes, float dtypes, finite values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise WeightsError(f"weights do not match the architecture: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, ref in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise WeightsError(f"{key}: shape {tuple(t.shape)} but the architecture needs {tuple(ref.shape)}")
        if ref.is_floating_point() != t.is_floating_point():
            raise WeightsError(f"{key}: dtype {t.dtype} but the architecture needs {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{key}: contains NaN or Inf")


def load_weights(model: nn.Module, path: str | Path, max_bytes: int | None = None) -> nn.Module:
    """Load safetensors weights into `model` after validating them against it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = Path(path).stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise WeightsError(f"weights file is {size} bytes; the limit is {max_bytes}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"not a valid safetensors file: {exc}") from None
    check_state(model, state)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    return model


def load_pruned(arch_path: str | Path, weights_path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model from arch.json + safetensors."""
    arch_json = load_arch(arch_path)
    return load_weights(rebuild(arch_json), weights_path), arch_json


def param_count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def default_resolution(arch: str) -> int:
    """Natural input resolution: 32 for the CIFAR models, 224 for torchvision's (overridable)."""
    return 32 if arch in CIFAR_RESNET_DEPTHS or arch == "vgg16_bn" else 224

