"""Dataset references: every scheme loads, splits are deterministic and disjoint, unsafe or bad refs are rejected."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from pruning import data
from pruning.data import DatasetRefError, load_dataset, make_loaders, parse_dataset_ref, stratified_split


def write_pngs(directory: Path, count: int, colour: tuple[int, int, int], size: int = 12) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = tuple(min(255, c + 5 * i) for c in colour)
        Image.new("RGB", (size, size + 3), pixels).save(directory / f"img{i}.png")


def write_mnist(raw: Path, train_per_class: int, test_per_class: int) -> None:
    """MNIST's idx-ubyte files (magic, counts, raw uint8), the format torchvision reads without pickle."""
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = bytes(i % 10 for i in range(10 * per_class))
        n = len(labels)
        images = bytes((label * 25 + j) % 256 for label in labels for j in range(28 * 28))
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels)


def labels_of(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


# --- builtin:digits ---------------------------------------------------------------------------------------


def test_digits_shapes_classes_and_sizes():
    splits = load_dataset("builtin:digits")
    assert (splits.num_classes, splits.in_channels, splits.resolution) == (10, 1, 32)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert abs(len(splits.val) - 0.15 * 1797) < 10 and abs(len(splits.test) - 0.15 * 1797) < 10
    image, label = splits.train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert set(labels_of(splits.test)) == set(range(10))
    train_images = splits.train.tensors[0]
    assert abs(float(train_images.mean())) < 1e-3 and abs(float(train_images.std()) - 1) < 1e-3


def test_digits_resolution_override():
    splits = load_dataset("builtin:digits", resolution=16)
    assert splits.resolution == 16 and splits.train[0][0].shape == (1, 16, 16)


def test_digits_split_is_deterministic_and_independent_of_global_rng():
    data._digits_tensors.cache_clear()
    torch.manual_seed(1)
    first = load_dataset("builtin:digits")
    data._digits_tensors.cache_clear()
    torch.manual_seed(999)
    torch.rand(100)
    second = load_dataset("builtin:digits")
    for name in ("train", "val", "test"):
        a, b = getattr(first, name).tensors, getattr(second, name).tensors
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_digits_splits_are_disjoint_stratified_and_match_loaded_labels():
    from sklearn.datasets import load_digits

    targets = load_digits().target.tolist()
    train_idx, val_idx, test_idx = stratified_split(targets, data.SPLIT_FRACTIONS)
    assert not set(train_idx) & set(val_idx) and not set(train_idx) & set(test_idx)
    assert not set(val_idx) & set(test_idx)
    assert sorted(train_idx + val_idx + test_idx) == list(range(len(targets)))
    for label in range(10):
        in_test = sum(1 for i in test_idx if targets[i] == label)
        assert abs(in_test - 0.15 * targets.count(label)) <= 1
    splits = load_dataset("builtin:digits")
    assert splits.test.tensors[1].tolist() == [targets[i] for i in test_idx]


# --- synthetic --------------------------------------------------------------------------------------------


def test_synthetic_shapes_labels_and_determinism():
    splits = load_dataset("synthetic:4x8")
    assert (splits.num_classes, splits.in_channels, splits.resolution) == (4, 3, 8)
    assert len(splits.train) > len(splits.val) > 0 and len(splits.test) > 0
    image, _ = splits.train[5]
    assert image.shape == (3, 8, 8)
    assert set(labels_of(splits.train)) == {0, 1, 2, 3}
    again = load_dataset("synthetic:4x8")
    assert torch.equal(again.train[5][0], image)
    assert not torch.equal(splits.train[5][0], splits.val[5][0])


def test_synthetic_resolution_argument_overrides_ref():
    assert load_dataset("synthetic:3x8", resolution=12).train[0][0].shape == (3, 12, 12)


# --- imagefolder ------------------------------------------------------------------------------------------


def test_imagefolder_train_val_test_layout(tmp_path):
    root = tmp_path / "root"
    for split, count in (("train", 6), ("val", 3), ("test", 2)):
        write_pngs(root / "shapes" / split / "cat", count, (200, 10, 10))
        write_pngs(root / "shapes" / split / "dog", count, (10, 10, 200))
    splits = load_dataset("imagefolder:shapes", data_root=root, resolution=16)
    assert (splits.num_classes, splits.in_channels, splits.resolution) == (2, 3, 16)
    assert splits.class_names == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 4)
    image, label = splits.val[0]
    assert image.shape == (3, 16, 16) and label == 0
    assert labels_of(splits.test) == [0, 0, 1, 1]


def test_imagefolder_train_val_layout_carves_val_from_train(tmp_path):
    root = tmp_path / "root"
    for split, count in (("train", 10), ("val", 3)):
        write_pngs(root / "ds" / split / "a", count, (200, 10, 10))
        write_pngs(root / "ds" / split / "b", count, (10, 10, 200))
    splits = load_dataset("imagefolder:ds", data_root=root)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 6)
    assert splits.train[0][0].shape == (3, 32, 32)


def test_imagefolder_single_folder_is_split_deterministically(tmp_path):
    root = tmp_path / "root"
    for name, colour in (("a", (250, 0, 0)), ("b", (0, 250, 0)), ("c", (0, 0, 250))):
        write_pngs(root / "flat" / name, 10, colour)
    first = load_dataset("imagefolder:flat", data_root=root)
    second = load_dataset("imagefolder:flat", data_root=root)
    assert first.num_classes == 3
    assert (len(first.train), len(first.val), len(first.test)) == (18, 6, 6)
    assert first.train.indices == second.train.indices
    all_indices = first.train.indices + first.val.indices + first.test.indices
    assert sorted(all_indices) == list(range(30))
    assert sorted(set(labels_of(first.test))) == [0, 1, 2]


def test_imagefolder_absolute_path_inside_root_is_accepted(tmp_path):
    root = tmp_path / "root"
    write_pngs(root / "flat" / "a", 4, (250, 0, 0))
    write_pngs(root / "flat" / "b", 4, (0, 250, 0))
    splits = load_dataset(f"imagefolder:{root / 'flat'}", data_root=root)
    assert splits.num_classes == 2


def test_imagefolder_rejects_parent_traversal(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    write_pngs(tmp_path / "x" / "a", 2, (1, 2, 3))
    with pytest.raises(DatasetRefError, match=r"'\.\.'"):
        parse_dataset_ref("imagefolder:../x")
    with pytest.raises(DatasetRefError, match=r"'\.\.'"):
        load_dataset("imagefolder:../x", data_root=root)
    with pytest.raises(DatasetRefError, match=r"'\.\.'"):
        load_dataset("imagefolder:sub/../../x", data_root=root)


def test_imagefolder_rejects_absolute_path_outside_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    write_pngs(outside / "a", 2, (1, 2, 3))
    write_pngs(outside / "b", 2, (3, 2, 1))
    with pytest.raises(DatasetRefError, match="outside the data root"):
        load_dataset(f"imagefolder:{outside}", data_root=root)


def test_imagefolder_rejects_symlinked_directory_leaving_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    write_pngs(outside / "a", 2, (1, 2, 3))
    write_pngs(outside / "b", 2, (3, 2, 1))
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DatasetRefError, match="symlink"):
        load_dataset("imagefolder:escape", data_root=root)


def test_imagefolder_rejects_symlinked_files_leaving_root(tmp_path):
    root = tmp_path / "root"
    write_pngs(root / "ds" / "a", 2, (1, 2, 3))
    write_pngs(root / "ds" / "b", 2, (3, 2, 1))
    write_pngs(tmp_path / "secret", 1, (9, 9, 9))
    (root / "ds" / "b" / "stolen.png").symlink_to(tmp_path / "secret" / "img0.png")
    with pytest.raises(DatasetRefError, match="leaves the data root"):
        load_dataset("imagefolder:ds", data_root=root)


def test_imagefolder_missing_root_missing_path_and_bad_layout(tmp_path):
    with pytest.raises(DatasetRefError, match="data root"):
        load_dataset("imagefolder:ds", data_root=None)
    with pytest.raises(DatasetRefError, match="not an existing directory"):
        load_dataset("imagefolder:ds", data_root=tmp_path / "nope")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DatasetRefError, match="no directory 'ds'"):
        load_dataset("imagefolder:ds", data_root=root)
    write_pngs(root / "loose", 3, (1, 2, 3))  # images but no class folders
    with pytest.raises(DatasetRefError, match="expected <dir>/train/<class>/<image>"):
        load_dataset("imagefolder:loose", data_root=root)
    write_pngs(root / "only_train" / "train" / "a", 3, (1, 2, 3))
    with pytest.raises(DatasetRefError, match="neither val/ nor test/"):
        load_dataset("imagefolder:only_train", data_root=root)


def test_imagefolder_mismatched_classes_between_splits(tmp_path):
    root = tmp_path / "root"
    write_pngs(root / "ds" / "train" / "a", 2, (1, 2, 3))
    write_pngs(root / "ds" / "train" / "b", 2, (1, 2, 3))
    write_pngs(root / "ds" / "val" / "a", 2, (1, 2, 3))
    write_pngs(root / "ds" / "val" / "c", 2, (1, 2, 3))
    with pytest.raises(DatasetRefError, match="must match"):
        load_dataset("imagefolder:ds", data_root=root)


# --- torchvision ------------------------------------------------------------------------------------------


def test_torchvision_mnist_from_local_files(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", train_per_class=10, test_per_class=2)
    splits = load_dataset("torchvision:mnist", data_root=tmp_path)
    assert splits.ref == "torchvision:MNIST"
    assert (splits.num_classes, splits.in_channels, splits.resolution) == (10, 1, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert sorted(labels_of(splits.val)) == list(range(10))
    image, label = splits.test[3]
    assert image.shape == (1, 32, 32) and label == 3
    native = load_dataset("torchvision:MNIST", data_root=tmp_path, resolution=28)
    assert native.test[0][0].shape == (1, 28, 28)


def test_torchvision_mnist_under_name_subfolder(tmp_path):
    write_mnist(tmp_path / "MNIST" / "MNIST" / "raw", train_per_class=10, test_per_class=1)
    assert len(load_dataset("torchvision:MNIST", data_root=tmp_path).test) == 10


def test_torchvision_missing_files_says_where_and_never_downloads(tmp_path):
    with pytest.raises(DatasetRefError, match="never downloads") as caught:
        load_dataset("torchvision:CIFAR10", data_root=tmp_path)
    assert str(tmp_path / "CIFAR10") in str(caught.value)
    with pytest.raises(DatasetRefError, match="data root"):
        load_dataset("torchvision:CIFAR10", data_root=None)


def test_torchvision_corrupt_file_is_reported(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", train_per_class=2, test_per_class=1)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DatasetRefError, match="could not be read"):
        load_dataset("torchvision:MNIST", data_root=tmp_path)


# --- reference syntax -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, message",
    [
        ("digits", "no scheme"),
        ("s3:bucket/x", "unknown dataset scheme 's3'"),
        ("builtin:iris", "unknown builtin dataset"),
        ("synthetic:10", "synthetic:<classes>x<resolution>"),
        ("synthetic:1x32", "classes must be in"),
        ("synthetic:10x2", "resolution must be in"),
        ("torchvision:ImageNet", "unsupported torchvision dataset"),
        ("imagefolder:", "empty"),
    ],
)
def test_bad_refs_are_rejected_with_clear_messages(ref, message):
    with pytest.raises(DatasetRefError, match=message):
        parse_dataset_ref(ref)
    with pytest.raises(ValueError):
        load_dataset(ref)


def test_unknown_scheme_names_accepted_forms():
    with pytest.raises(DatasetRefError) as caught:
        load_dataset("http://example.com/data")
    for form in ("builtin:digits", "synthetic:", "imagefolder:", "torchvision:"):
        assert form in str(caught.value)


def test_parse_is_canonical_and_never_touches_disk():
    assert str(parse_dataset_ref("TorchVision:cifar10")) == "torchvision:CIFAR10"
    assert parse_dataset_ref("synthetic:10x32").num_classes == 10
    assert parse_dataset_ref("imagefolder:/definitely/not/here").name == "/definitely/not/here"


def test_resolution_out_of_range_is_rejected():
    with pytest.raises(DatasetRefError, match="resolution"):
        load_dataset("builtin:digits", resolution=2)


# --- loaders ----------------------------------------------------------------------------------------------


def test_make_loaders_shuffle_is_seeded():
    splits = load_dataset("synthetic:4x8")
    first = [y.tolist() for _, y in make_loaders(splits, batch_size=16, seed=3)[0]]
    second = [y.tolist() for _, y in make_loaders(splits, batch_size=16, seed=3)[0]]
    other = [y.tolist() for _, y in make_loaders(splits, batch_size=16, seed=4)[0]]
    assert first == second and first != other
    _, val_loader, test_loader = make_loaders(splits, batch_size=16, seed=3)
    assert [int(y) for _, ys in val_loader for y in ys] == labels_of(splits.val)
    assert sum(len(ys) for _, ys in test_loader) == len(splits.test)


def test_make_loaders_drops_ragged_last_train_batch():
    splits = load_dataset("synthetic:4x8")  # 128 training images
    train_loader = make_loaders(splits, batch_size=127)[0]
    assert [len(y) for _, y in train_loader] == [127]
    whole = make_loaders(splits, batch_size=500)[0]
    assert [len(y) for _, y in whole] == [len(splits.train)]


def test_augment_changes_train_images_only():
    plain = load_dataset("synthetic:4x8")
    augmented = load_dataset("synthetic:4x8", augment=True)
    torch.manual_seed(0)
    views = [augmented.train[0][0] for _ in range(8)]
    assert all(view.shape == (3, 8, 8) for view in views)
    assert any(not torch.equal(view, plain.train[0][0]) for view in views)
    assert torch.equal(augmented.val[0][0], plain.val[0][0])
