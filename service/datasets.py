"""Dataset references checked at submission, without torch: syntax, that the data is there, and its shape.

The worker reads the data with pruning.data; what it would refuse there (a missing folder, torchvision files that
were never placed, weights with the wrong classifier or input channels) is refused here, before a job row exists.
"""

from __future__ import annotations

from pathlib import Path

from pruning.datarefs import (
    IMAGEFOLDER_LAYOUT,
    TORCHVISION_DATASETS,
    DatasetRef,
    DatasetRefError,
    parse_dataset_ref,
    resolve_under_root,
)
from service.engine_info import EngineInputError

# pruning.data builds builtin:digits as 10 classes of 1-channel images; synthetic and image folders are RGB.
BUILTIN_SHAPES = {"digits": (10, 1)}
RGB = 3
# What torchvision's own loaders look for under their root (CIFAR's extracted folders, the MNIST family's
# <Name>/raw folder, SVHN's .mat files); pruning.data tries <data root>/<Name> and then the data root itself.
TORCHVISION_MARKERS = {
    "CIFAR10": ("cifar-10-batches-py",), "CIFAR100": ("cifar-100-python",), "MNIST": ("MNIST",),
    "FashionMNIST": ("FashionMNIST",), "KMNIST": ("KMNIST",), "SVHN": ("train_32x32.mat",),
}


def check_dataset(ref: str, data_root: Path) -> DatasetRef:
    """The parsed reference; EngineInputError if it is malformed, leaves the data root, or its data is missing."""
    try:
        parsed = parse_dataset_ref(ref)
        if parsed.scheme == "imagefolder":
            _imagefolder_dir(parsed, data_root)
        elif parsed.scheme == "torchvision":
            _check_torchvision(parsed, data_root)
    except DatasetRefError as exc:
        raise EngineInputError(str(exc)) from None
    return parsed


def _imagefolder_dir(parsed: DatasetRef, data_root: Path) -> Path:
    directory = resolve_under_root(parsed.name, data_root.resolve())
    if not directory.is_dir():
        raise DatasetRefError(f"{parsed}: no directory {parsed.name!r} under the data root {data_root}; "
                              f"{IMAGEFOLDER_LAYOUT}")
    if _class_count(directory) < 2:
        raise DatasetRefError(f"{parsed}: fewer than 2 class folders; {IMAGEFOLDER_LAYOUT}")
    return directory


def _class_count(directory: Path) -> int:
    # pruning.data's rule: the classes are the sub-folders of train/ when it exists, else of the folder itself
    # (torchvision's ImageFolder counts every sub-folder, hidden ones too).
    classes_dir = directory / "train" if (directory / "train").is_dir() else directory
    return sum(1 for p in classes_dir.iterdir() if p.is_dir())


def _check_torchvision(parsed: DatasetRef, data_root: Path) -> None:
    places = [data_root / parsed.name, data_root]
    markers = TORCHVISION_MARKERS[parsed.name]
    if not any((place / marker).exists() for place in places for marker in markers):
        looked = " and ".join(str(p) for p in places)
        raise DatasetRefError(f"{parsed}: no {parsed.name} files in {looked} (torchvision's on-disk layout, e.g. "
                              f"{places[0] / markers[0]}); latprune never downloads datasets, so place them first")


def dataset_shape(parsed: DatasetRef, data_root: Path) -> tuple[int, int]:
    """(classes, input channels) of a checked reference, as the worker will load it."""
    if parsed.scheme == "builtin":
        return BUILTIN_SHAPES[parsed.name]
    if parsed.scheme == "synthetic":
        return parsed.num_classes or 2, RGB
    if parsed.scheme == "torchvision":
        info = TORCHVISION_DATASETS[parsed.name]
        return info.num_classes, info.in_channels
    return _class_count(_imagefolder_dir(parsed, data_root)), RGB
