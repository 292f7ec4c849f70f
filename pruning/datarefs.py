"""Dataset references: syntax, the accepted forms, and path safety; no torch, so the API can validate them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

ACCEPTED_FORMS = (
    "builtin:digits, synthetic:<classes>x<resolution> (e.g. synthetic:10x32), "
    "imagefolder:<directory under the data root>, torchvision:<Name> (Name one of "
    "CIFAR10, CIFAR100, MNIST, FashionMNIST, KMNIST, SVHN)"
)
IMAGEFOLDER_LAYOUT = (
    "expected <dir>/train/<class>/<image> and <dir>/val/<class>/<image> (optionally <dir>/test/<class>/<image>), "
    "or a single <dir>/<class>/<image> tree that latprune splits 70/15/15"
)
BUILTIN_DATASETS = ("digits",)
DEFAULT_RESOLUTION = 32
MIN_RESOLUTION, MAX_RESOLUTION = 4, 1024
SYNTHETIC_MAX_CLASSES = 1000


class DatasetRefError(ValueError):
    """A dataset reference that is malformed, unknown, unsafe or points at missing data."""


@dataclass(frozen=True)
class TorchvisionInfo:
    """How to build one torchvision dataset from local files."""

    class_name: str
    in_channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    uses_split_arg: bool = False
    # Horizontal flips change the class of digits, so augmentation skips them there.
    flip_safe: bool = True


TORCHVISION_DATASETS: dict[str, TorchvisionInfo] = {
    "CIFAR10": TorchvisionInfo("CIFAR10", 3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": TorchvisionInfo("CIFAR100", 3, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "MNIST": TorchvisionInfo("MNIST", 1, 10, (0.1307,), (0.3081,), flip_safe=False),
    "FashionMNIST": TorchvisionInfo("FashionMNIST", 1, 10, (0.2860,), (0.3530,)),
    "KMNIST": TorchvisionInfo("KMNIST", 1, 10, (0.1918,), (0.3483,), flip_safe=False),
    "SVHN": TorchvisionInfo(
        "SVHN", 3, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), uses_split_arg=True, flip_safe=False
    ),
}


@dataclass(frozen=True)
class DatasetRef:
    """A parsed dataset reference; `str(ref)` gives its canonical text."""

    scheme: str
    name: str
    num_classes: int | None = None
    resolution: int | None = None

    def __str__(self) -> str:
        return f"{self.scheme}:{self.name}"


def parse_dataset_ref(ref: str) -> DatasetRef:
    """Validate a reference's syntax without touching the disk; raise DatasetRefError naming the accepted forms."""
    if not isinstance(ref, str) or ":" not in ref:
        raise DatasetRefError(f"dataset reference {ref!r} has no scheme; accepted forms: {ACCEPTED_FORMS}")
    scheme, _, rest = ref.partition(":")
    scheme = scheme.strip().lower()
    if not rest:
        raise DatasetRefError(f"dataset reference {ref!r} is empty after '{scheme}:'; accepted forms: {ACCEPTED_FORMS}")
    if "\x00" in rest:
        raise DatasetRefError(f"dataset reference {ref!r} contains a NUL character")
    if scheme == "builtin":
        if rest not in BUILTIN_DATASETS:
            raise DatasetRefError(f"unknown builtin dataset {rest!r}; builtin datasets: {', '.join(BUILTIN_DATASETS)}")
        return DatasetRef("builtin", rest)
    if scheme == "synthetic":
        match = re.fullmatch(r"(\d+)x(\d+)", rest)
        if not match:
            raise DatasetRefError(
                f"synthetic reference {ref!r} must be synthetic:<classes>x<resolution>, e.g. synthetic:10x32"
            )
        num_classes, resolution = int(match.group(1)), int(match.group(2))
        if not 2 <= num_classes <= SYNTHETIC_MAX_CLASSES:
            raise DatasetRefError(f"synthetic classes must be in 2..{SYNTHETIC_MAX_CLASSES}, got {num_classes}")
        check_resolution(resolution)
        return DatasetRef("synthetic", rest, num_classes=num_classes, resolution=resolution)
    if scheme == "imagefolder":
        parts = re.split(r"[\\/]", rest)
        if ".." in parts:
            raise DatasetRefError(
                f"imagefolder path {rest!r} contains '..'; give a path inside the data root without '..'"
            )
        return DatasetRef("imagefolder", rest)
    if scheme == "torchvision":
        canonical = {name.lower(): name for name in TORCHVISION_DATASETS}.get(rest.lower())
        if canonical is None:
            raise DatasetRefError(
                f"unsupported torchvision dataset {rest!r}; supported: {', '.join(TORCHVISION_DATASETS)}"
            )
        return DatasetRef("torchvision", canonical)
    raise DatasetRefError(f"unknown dataset scheme {scheme!r} in {ref!r}; accepted forms: {ACCEPTED_FORMS}")


def check_resolution(resolution: int) -> None:
    """Raise DatasetRefError unless the resolution is in the accepted range."""
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise DatasetRefError(f"resolution must be in {MIN_RESOLUTION}..{MAX_RESOLUTION} pixels, got {resolution}")


def resolve_under_root(path_text: str, root: Path) -> Path:
    """Resolve a user-given path under root (following symlinks); raise DatasetRefError if it leaves root."""
    if ".." in re.split(r"[\\/]", path_text):
        raise DatasetRefError(f"path {path_text!r} contains '..'; give a path inside the data root without '..'")
    candidate = PurePath(path_text)
    full = Path(candidate) if candidate.is_absolute() else root / candidate
    resolved = full.resolve()
    if not resolved.is_relative_to(root):
        if candidate.is_absolute() and not Path(os.path.normpath(full)).is_relative_to(root):
            raise DatasetRefError(
                f"path {path_text!r} is outside the data root {root}; give a path relative to the data root"
            )
        raise DatasetRefError(f"path {path_text!r} resolves (through a symlink) outside the data root {root}")
    return resolved
