"""Dataset references (builtin:, synthetic:, imagefolder:, torchvision:) -> train/val/test Datasets and loaders."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from pruning.datarefs import (  # noqa: F401 - re-exported: the engine's callers know them from here
    ACCEPTED_FORMS,
    BUILTIN_DATASETS,
    DEFAULT_RESOLUTION,
    IMAGEFOLDER_LAYOUT,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    SYNTHETIC_MAX_CLASSES,
    TORCHVISION_DATASETS,
    DatasetRef,
    DatasetRefError,
    TorchvisionInfo,
    check_resolution,
    parse_dataset_ref,
    resolve_under_root,
)

# Fixed seed of every split latprune carves itself, so splits never depend on a global RNG.
SPLIT_SEED = 20240601
# Fraction of an official train set held out as val when the source has no val split of its own.
VAL_FRACTION = 0.1
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DatasetSplits:
    """Train/val/test Datasets yielding (image tensor CxHxW, int label), plus what a model needs to know."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    resolution: int
    ref: str
    class_names: list[str] = field(default_factory=list)


def load_dataset(
    ref: str, data_root: Path | None = None, resolution: int | None = None, augment: bool = False
) -> DatasetSplits:
    """Resolve a dataset reference into train/val/test splits; augment adds random crop (+flip) to train only."""
    parsed = parse_dataset_ref(ref)
    if resolution is not None:
        check_resolution(resolution)
    if parsed.scheme == "builtin":
        splits = _load_digits(resolution or DEFAULT_RESOLUTION)
        flip_safe = False
    elif parsed.scheme == "synthetic":
        splits = _load_synthetic(parsed, resolution or parsed.resolution or DEFAULT_RESOLUTION)
        flip_safe = False
    elif parsed.scheme == "imagefolder":
        splits = _load_imagefolder(parsed, data_root, resolution or DEFAULT_RESOLUTION)
        flip_safe = True
    else:
        info = TORCHVISION_DATASETS[parsed.name]
        splits = _load_torchvision(parsed, info, data_root, resolution or DEFAULT_RESOLUTION)
        flip_safe = info.flip_safe
    if augment:
        splits.train = AugmentedDataset(splits.train, splits.resolution, flip=flip_safe)
    return splits


def make_loaders(
    splits: DatasetSplits,
    batch_size: int = 128,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool | None = None,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (shuffled by a seeded generator), val and test DataLoaders."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers, "pin_memory": pin_memory}
    train_loader = shuffled_loader(splits.train, batch_size, seed, num_workers, pin_memory)
    val_loader = DataLoader(splits.val, shuffle=False, **common)
    test_loader = DataLoader(splits.test, shuffle=False, **common)
    return train_loader, val_loader, test_loader


def shuffled_loader(data: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                    pin_memory: bool = False) -> DataLoader:
    """Training batches of `data`, reshuffled every epoch by a generator seeded with `seed`."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    # A last batch of one sample breaks BatchNorm in training mode; dropping the ragged batch avoids it and
    # loses nothing over several epochs because the order is reshuffled.
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator,
                      drop_last=len(data) > batch_size, num_workers=num_workers, pin_memory=pin_memory)


class AugmentedDataset(Dataset):
    """Random crop after zero padding (+ optional horizontal flip) on normalised tensors, using torch's RNG."""

    def __init__(self, base: Dataset, resolution: int, flip: bool):
        self.base = base
        self.resolution = resolution
        self.flip = flip
        self.pad = max(1, resolution // 8)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.base[index]
        padded = torch.nn.functional.pad(image, (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        image = padded[:, top : top + self.resolution, left : left + self.resolution]
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return image, label


class SyntheticImages(Dataset):
    """Deterministic learnable images: a fixed low-frequency pattern per class plus per-sample Gaussian noise."""

    def __init__(self, num_classes: int, resolution: int, count: int, seed: int, noise_std: float = 1.0):
        self.num_classes = num_classes
        self.resolution = resolution
        self.count = count
        self.seed = seed
        self.noise_std = noise_std
        pattern_generator = torch.Generator().manual_seed(SPLIT_SEED + 1000003 * num_classes)
        self.patterns = torch.randn(num_classes, 3, 4, 4, generator=pattern_generator)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        label = index % self.num_classes
        pattern = torch.nn.functional.interpolate(
            self.patterns[label : label + 1], size=(self.resolution,) * 2, mode="bilinear", align_corners=False
        )[0]
        noise_generator = torch.Generator().manual_seed(self.seed + index)
        noise = torch.randn(3, self.resolution, self.resolution, generator=noise_generator)
        return pattern + self.noise_std * noise, label


def stratified_split(targets: list[int], fractions: tuple[float, ...], seed: int = SPLIT_SEED) -> list[list[int]]:
    """Deterministic per-class split of indices into len(fractions) sorted index lists."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    parts: list[list[int]] = [[] for _ in fractions]
    generator = torch.Generator().manual_seed(seed)
    for target in sorted(by_class):
        members = by_class[target]
        order = torch.randperm(len(members), generator=generator).tolist()
        shuffled = [members[i] for i in order]
        # Later parts (val, test) get round(n * f) each; the first part takes the remainder.
        counts = [round(len(members) * f) for f in fractions[1:]]
        while sum(counts) >= len(members) and any(counts):
            counts[counts.index(max(counts))] -= 1
        start = len(members) - sum(counts)
        parts[0].extend(shuffled[:start])
        for part, count in zip(parts[1:], counts, strict=True):
            part.extend(shuffled[start : start + count])
            start += count
    return [sorted(part) for part in parts]


@functools.lru_cache(maxsize=4)
def _digits_tensors(resolution: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(
        images, size=(resolution, resolution), mode="bilinear", align_corners=False
    )
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx, test_idx = stratified_split(labels.tolist(), SPLIT_FRACTIONS)
    train_images = images[train_idx]
    mean, std = train_images.mean(), train_images.std()
    images = (images - mean) / std
    return (images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], images[test_idx], labels[test_idx])


def _load_digits(resolution: int) -> DatasetSplits:
    x_train, y_train, x_val, y_val, x_test, y_test = _digits_tensors(resolution)
    return DatasetSplits(
        train=TensorDataset(x_train, y_train),
        val=TensorDataset(x_val, y_val),
        test=TensorDataset(x_test, y_test),
        num_classes=10,
        in_channels=1,
        resolution=resolution,
        ref="builtin:digits",
        class_names=[str(i) for i in range(10)],
    )


def _load_synthetic(parsed: DatasetRef, resolution: int) -> DatasetSplits:
    classes = parsed.num_classes or 2
    # Per-class counts stay small: the set exists for tests and demos.
    per_class = {"train": 32, "val": 8, "test": 8}
    seeds = {"train": SPLIT_SEED, "val": SPLIT_SEED + 10_000_019, "test": SPLIT_SEED + 20_000_039}
    made = {
        name: SyntheticImages(classes, resolution, classes * count, seeds[name]) for name, count in per_class.items()
    }
    return DatasetSplits(
        train=made["train"],
        val=made["val"],
        test=made["test"],
        num_classes=classes,
        in_channels=3,
        resolution=resolution,
        ref=str(parsed),
        class_names=[str(i) for i in range(classes)],
    )


def _require_root(ref: DatasetRef, data_root: Path | None) -> Path:
    if data_root is None:
        raise DatasetRefError(f"{ref} needs a data root, and none is configured; set the data root directory")
    root = Path(data_root)
    if not root.is_dir():
        raise DatasetRefError(f"{ref}: the data root {root} is not an existing directory")
    return root.resolve()


def _image_transform(resolution: int, mean: tuple[float, ...], std: tuple[float, ...], native: int | None = None):
    from torchvision import transforms

    steps: list[Any] = []
    if native != resolution:
        steps += [transforms.Resize(resolution), transforms.CenterCrop(resolution)]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def _image_folder(directory: Path, root: Path, transform, ref: DatasetRef):
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    def is_valid_file(path: str) -> bool:
        if not path.lower().endswith(IMG_EXTENSIONS):
            return False
        if not Path(path).resolve().is_relative_to(root):
            relative = os.path.relpath(path, directory)
            raise DatasetRefError(f"{ref}: file {relative!r} is a symlink that leaves the data root {root}")
        return True

    try:
        return ImageFolder(str(directory), transform=transform, is_valid_file=is_valid_file)
    except FileNotFoundError as error:
        raise DatasetRefError(f"{ref}: {error}; {IMAGEFOLDER_LAYOUT}") from None


def _load_imagefolder(parsed: DatasetRef, data_root: Path | None, resolution: int) -> DatasetSplits:
    root = _require_root(parsed, data_root)
    directory = resolve_under_root(parsed.name, root)
    if not directory.is_dir():
        raise DatasetRefError(
            f"{parsed}: no directory {parsed.name!r} under the data root {root}; {IMAGEFOLDER_LAYOUT}"
        )
    transform = _image_transform(resolution, IMAGENET_MEAN, IMAGENET_STD)
    sub = {name: directory / name for name in ("train", "val", "test") if (directory / name).is_dir()}
    if "train" in sub:
        if "val" not in sub and "test" not in sub:
            raise DatasetRefError(f"{parsed}: found train/ but neither val/ nor test/; {IMAGEFOLDER_LAYOUT}")
        folders = {name: _image_folder(path, root, transform, parsed) for name, path in sub.items()}
        classes = folders["train"].classes
        for name, folder in folders.items():
            if folder.classes != classes:
                raise DatasetRefError(
                    f"{parsed}: {name}/ has classes {folder.classes} but train/ has {classes}; they must match"
                )
        train_all = folders["train"]
        if "val" in sub and "test" in sub:
            train, val, test = train_all, folders["val"], folders["test"]
        else:
            # One held-out folder plays the official test set (as torchvision's train=False does); val is
            # carved from train so that model selection never sees it.
            train_idx, val_idx = stratified_split(train_all.targets, (1 - VAL_FRACTION, VAL_FRACTION))
            train, val = Subset(train_all, train_idx), Subset(train_all, val_idx)
            test = folders["test"] if "test" in folders else folders["val"]
    else:
        whole = _image_folder(directory, root, transform, parsed)
        classes = whole.classes
        train_idx, val_idx, test_idx = stratified_split(whole.targets, SPLIT_FRACTIONS)
        train, val, test = Subset(whole, train_idx), Subset(whole, val_idx), Subset(whole, test_idx)
    if len(classes) < 2:
        raise DatasetRefError(f"{parsed}: found {len(classes)} class folder(s), need at least 2; {IMAGEFOLDER_LAYOUT}")
    return DatasetSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        in_channels=3,
        resolution=resolution,
        ref=str(parsed),
        class_names=list(classes),
    )


def _targets(dataset: Any) -> list[int]:
    values = getattr(dataset, "targets", None)
    if values is None:
        values = dataset.labels  # SVHN names them labels
    return [int(v) for v in values]


def _load_torchvision(
    parsed: DatasetRef, info: TorchvisionInfo, data_root: Path | None, resolution: int
) -> DatasetSplits:
    import torchvision.datasets as tv_datasets

    root = _require_root(parsed, data_root)
    native = 28 if info.in_channels == 1 else 32
    transform = _image_transform(resolution, info.mean, info.std, native=native)
    dataset_class = getattr(tv_datasets, info.class_name)
    candidates = [root / info.class_name, root]
    failures: list[str] = []
    for candidate in candidates:
        if not candidate.is_dir():
            continue
        try:
            if info.uses_split_arg:
                train_all = dataset_class(str(candidate), split="train", transform=transform, download=False)
                test = dataset_class(str(candidate), split="test", transform=transform, download=False)
            else:
                train_all = dataset_class(str(candidate), train=True, transform=transform, download=False)
                test = dataset_class(str(candidate), train=False, transform=transform, download=False)
        except RuntimeError:
            continue  # torchvision's "Dataset not found": try the next place
        except Exception as error:  # a present but unreadable file must not look like a missing one
            failures.append(f"{candidate}: {type(error).__name__}: {error}")
            continue
        break
    else:
        looked = " and ".join(str(c) for c in candidates)
        detail = f"; files there could not be read ({'; '.join(failures)})" if failures else ""
        raise DatasetRefError(
            f"{parsed}: no usable {info.class_name} files in {looked} (torchvision's on-disk layout){detail}; "
            "latprune never downloads datasets, so place the files there first"
        )
    train_idx, val_idx = stratified_split(_targets(train_all), (1 - VAL_FRACTION, VAL_FRACTION))
    classes = list(getattr(train_all, "classes", [str(i) for i in range(info.num_classes)]))
    return DatasetSplits(
        train=Subset(train_all, train_idx),
        val=Subset(train_all, val_idx),
        test=test,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        resolution=resolution,
        ref=str(parsed),
        class_names=classes,
    )
