"""Behaviour tests for vqkit.data.datasets: real dataset files, the embedded sample, and broken inputs."""

from __future__ import annotations

import gzip
import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SHARED, needs_shared

from vqkit.data import datasets as data
from vqkit.data.cifar import CIFAR10_CLASSES
from vqkit.data.datasets import (
    FASHION_MNIST_CLASSES,
    DataError,
    find_fashion_mnist,
    from_model,
    load_dataset,
    sample_dir,
    to_model,
)

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_BATCH1_COUNTS = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]


# --------------------------------------------------------------------------------------------
# Helpers writing small synthetic files


def _idx_images(n: int, rows: int = 28, cols: int = 28) -> bytes:
    pixels = np.random.default_rng(n).integers(0, 256, n * rows * cols, dtype=np.uint8)
    return struct.pack(">IIII", 2051, n, rows, cols) + pixels.tobytes()


def _idx_labels(labels: list[int]) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + bytes(labels)


def _write_idx_set(
    root: Path, images: bytes, labels: bytes, split: str = "train", gz: bool = True
) -> tuple[Path, Path]:
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    image_path = root / f"{prefix}-images-idx3-ubyte{suffix}"
    label_path = root / f"{prefix}-labels-idx1-ubyte{suffix}"
    image_path.write_bytes(gzip.compress(images) if gz else images)
    label_path.write_bytes(gzip.compress(labels) if gz else labels)
    return image_path, label_path


def _cifar_records(labels: list[int]) -> bytes:
    rng = np.random.default_rng(len(labels))
    pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return b"".join(bytes([y]) + row.tobytes() for y, row in zip(labels, pixels))


def _png(path: Path, size=(8, 6), colour=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 4])


# --------------------------------------------------------------------------------------------
# Pixel convention


def test_pixel_convention_round_trip():
    x = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    y = to_model(x)
    assert y.dtype == torch.float32
    assert y.min().item() == -1.0 and y.max().item() == 1.0
    assert torch.equal(from_model(y), x)
    assert from_model(torch.tensor([-3.0, 0.0, 2.5])).tolist() == [0, 128, 255]


# --------------------------------------------------------------------------------------------
# Real files and the embedded sample


def test_embedded_sample():
    train = load_dataset(f"fashion-mnist:{sample_dir()}", "train")
    test = load_dataset(f"fashion:{sample_dir()}", "test")
    assert (len(train), len(test)) == (1500, 500)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and isinstance(label, int)
    assert train.class_names == FASHION_MNIST_CLASSES and train.num_classes == 10
    size = sum(p.stat().st_size for p in sample_dir().glob("*.gz"))
    assert size < 1_000_000


@needs_shared
def test_embedded_sample_is_the_head_of_the_real_test_set():
    sample = load_dataset(f"fashion:{sample_dir()}", "test")
    full = load_dataset(f"fashion-mnist:{SHARED / 'fashion-mnist'}", "test")
    assert len(full) == 10_000
    assert torch.equal(sample.images, full.images[:500])
    assert torch.equal(sample.labels, full.labels[:500])


@needs_shared
def test_real_mnist_test_split():
    ds = load_dataset(f"mnist:{SHARED / 'mnist'}", "test")
    assert len(ds) == 10_000 and (ds.channels, ds.height, ds.width) == (1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == MNIST_TEST_COUNTS
    images, labels = ds.batch(torch.tensor([0, 5, 9999]))
    assert images.shape == (3, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels[0].item() == 7  # the famous first test digit
    assert torch.equal(from_model(to_model(images)), images)


@needs_shared
def test_real_cifar10():
    root = SHARED / "cifar10"
    test = load_dataset(f"cifar10:{root}", "test")
    assert len(test) == 10_000 and test[0][0].shape == (3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.class_names[0] == "airplane" and test.class_names[9] == "truck"
    # Record 0: label byte, then the red plane row-major.
    raw = np.fromfile(root / "test_batch.bin", np.uint8, count=3073)
    image, label = test[0]
    assert label == raw[0] and image[0].flatten().tolist() == raw[1:1025].tolist()
    train = load_dataset(f"cifar10:{root}", "train")  # only data_batch_1.bin is present
    assert torch.bincount(train.labels).tolist() == CIFAR_BATCH1_COUNTS


def test_idx_resize():
    ds = load_dataset(f"fashion:{sample_dir()}", "test", image_size=32)
    assert ds.images.shape == (500, 1, 32, 32) and (ds.height, ds.width) == (32, 32)
    assert ds.images.dtype == torch.uint8


# --------------------------------------------------------------------------------------------
# Broken IDX files


def test_idx_uncompressed_accepted(tmp_path):
    _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 1, 9]), gz=False)
    ds = load_dataset(f"mnist:{tmp_path}")
    assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 9]


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_truncated_payload(tmp_path, gz):
    _write_idx_set(tmp_path, _idx_images(3)[:-10], _idx_labels([0, 1, 2]), gz=gz)
    expected = 16 + 3 * 28 * 28
    pattern = rf"train-images-idx3-ubyte.*truncated: expected {expected} bytes.*got {expected - 10}"
    with pytest.raises(DataError, match=pattern):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_trailing_bytes(tmp_path):
    _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 1, 2]) + b"x")
    pattern = r"train-labels-idx1-ubyte\.gz: trailing bytes: expected 11 bytes"
    with pytest.raises(DataError, match=pattern):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_wrong_magic(tmp_path):
    # Labels where the images should be: a classic mix-up.
    _write_idx_set(tmp_path, _idx_labels([0, 1, 2]), _idx_labels([0, 1, 2]))
    pattern = r"train-images-idx3-ubyte\.gz: .*magic number 2049, expected 2051"
    with pytest.raises(DataError, match=pattern):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_truncated_gzip(tmp_path):
    image_path, _ = _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 1, 2]))
    image_path.write_bytes(image_path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated gzip"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_gzip_crc_error(tmp_path):
    _, label_path = _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 1, 2]))
    blob = bytearray(label_path.read_bytes())
    blob[-8] ^= 0xFF  # first byte of the CRC32 in the gzip trailer
    label_path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: corrupt gzip.*CRC"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_not_gzip(tmp_path):
    image_path, _ = _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 1, 2]))
    image_path.write_bytes(_idx_images(3))  # raw IDX under a .gz name
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: corrupt gzip"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_label_out_of_range(tmp_path):
    _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 12, 3]))
    pattern = r"train-labels-idx1-ubyte\.gz: label 12 at record 1 is out of range"
    with pytest.raises(DataError, match=pattern):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_count_mismatch(tmp_path):
    _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 1]))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_missing_file(tmp_path):
    _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 1, 2]))
    with pytest.raises(DataError, match=r"missing t10k-images-idx3-ubyte\.gz"):
        load_dataset(f"fashion:{tmp_path}", "test")


def test_idx_official_file_checksum_mismatch(tmp_path):
    # Official name and size of Fashion-MNIST's test labels, wrong content.
    _write_idx_set(tmp_path, _idx_images(3), _idx_labels([0, 1, 2]), split="test")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(5_148))
    pattern = r"t10k-labels-idx1-ubyte\.gz: checksum mismatch: expected md5 bb300cfd"
    with pytest.raises(DataError, match=pattern):
        load_dataset(f"fashion-mnist:{tmp_path}", "test")


# --------------------------------------------------------------------------------------------
# Broken CIFAR-10 files


def test_cifar_train_uses_the_batches_present(tmp_path):
    (tmp_path / "data_batch_2.bin").write_bytes(_cifar_records([3, 4]))
    (tmp_path / "data_batch_5.bin").write_bytes(_cifar_records([9]))
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.labels.tolist() == [3, 4, 9] and ds.images.shape == (3, 3, 32, 32)
    assert ds.class_names == CIFAR10_CLASSES  # no batches.meta.txt: the standard names


def test_cifar_no_batches(tmp_path):
    with pytest.raises(DataError, match=r"no CIFAR-10 training batch"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match=r"missing test_batch\.bin"):
        load_dataset(f"cifar10:{tmp_path}", "test")


def test_cifar_truncated(tmp_path):
    (tmp_path / "test_batch.bin").write_bytes(_cifar_records([1, 2])[:-1])
    pattern = r"test_batch\.bin: truncated .*6145 bytes is not a multiple of the 3073"
    with pytest.raises(DataError, match=pattern):
        load_dataset(f"cifar10:{tmp_path}", "test")


def test_cifar_label_out_of_range(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(_cifar_records([1, 10]))
    with pytest.raises(DataError, match=r"data_batch_1\.bin: label 10 at record 1"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar_official_file_checksum_mismatch(tmp_path):
    (tmp_path / "test_batch.bin").write_bytes(bytes(30_730_000))  # official size, all zeros
    pattern = r"test_batch\.bin: checksum mismatch: expected md5 803d5f7f"
    with pytest.raises(DataError, match=pattern):
        load_dataset(f"cifar10:{tmp_path}", "test")


# --------------------------------------------------------------------------------------------
# Image folders


def test_folder_class_subfolders_give_labels(tmp_path):
    for name in ("dog", "cat"):
        for k in range(3):
            _png(tmp_path / name / f"{k}.PNG")
    ds = load_dataset(f"folder:{tmp_path}", "all")
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert [label for _, label in ds] == [0, 0, 0, 1, 1, 1]
    images, labels = ds.batch(torch.tensor([5, 0]))
    assert images.shape == (2, 3, 6, 8) and labels.tolist() == [1, 0]
    # Without train/ and test/ folders, every 10th file (sorted) is a test file.
    assert len(load_dataset(f"folder:{tmp_path}", "test")) == 1
    assert len(load_dataset(f"folder:{tmp_path}", "train")) == 5


def test_folder_train_test_subfolders(tmp_path):
    _png(tmp_path / "train" / "a" / "1.png")
    _png(tmp_path / "train" / "b" / "1.png")
    _png(tmp_path / "test" / "b" / "1.jpg")  # labels must agree with train even without "a"
    test = load_dataset(f"folder:{tmp_path}", "test")
    assert test.class_names == ["a", "b"] and [y for _, y in test] == [1]
    assert len(load_dataset(f"folder:{tmp_path}", "train")) == 2


def test_folder_unlabelled(tmp_path):
    for k in range(3):
        _png(tmp_path / "nested" / "deeper" / f"{k}.png")
    _png(tmp_path / "top.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}", "all")
    # "nested" holds images, so it is a class; top.bmp sits outside the class folders.
    assert ds.class_names == ["nested"] and len(ds) == 3
    flat = tmp_path / "nested" / "deeper"
    ds = load_dataset(f"folder:{flat}", "all")
    assert ds.num_classes is None and ds.class_names is None and {y for _, y in ds} == {0}


def test_folder_differing_sizes_need_image_size(tmp_path):
    _png(tmp_path / "a.png", size=(8, 6))
    _png(tmp_path / "b.png", size=(10, 12))
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        load_dataset(f"folder:{tmp_path}", "all")
    ds = load_dataset(f"folder:{tmp_path}", "all", image_size=4)
    assert ds.batch(torch.tensor([0, 1]))[0].shape == (2, 3, 4, 4)


def test_folder_corrupt_files(tmp_path, caplog):
    for k in range(3):
        _png(tmp_path / f"good{k}.png")
    _truncated_jpeg(tmp_path / "cut.jpg")
    # Header readable, pixels not: the error comes when the item is read, naming the file.
    ds = load_dataset(f"folder:{tmp_path}", "all", image_size=6)
    with pytest.raises(DataError, match=r"cut\.jpg: cannot decode image"):
        ds[0]
    (tmp_path / "junk.jpeg").write_bytes(b"\x00" * 100)
    # Without image_size every header is read, so a non-image fails at once.
    with pytest.raises(DataError, match=r"junk\.jpeg: cannot decode image"):
        load_dataset(f"folder:{tmp_path}", "all")
    with caplog.at_level(logging.WARNING, logger="vqkit"):
        ds = load_dataset(f"folder:{tmp_path}", "all", skip_bad=True)
    assert ds.skipped == 2 and len(ds) == 3
    assert "skipped 2 unreadable" in caplog.text


def test_folder_empty(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files"):
        load_dataset(f"folder:{tmp_path}", "all")


# --------------------------------------------------------------------------------------------
# Specs and locating Fashion-MNIST


@pytest.mark.parametrize(
    "spec,message",
    [
        ("data/mnist", "no 'KIND:' prefix"),
        ("imagenet:/tmp", "unknown kind 'imagenet'"),
        ("cifar10:", "no directory after the colon"),
    ],
)
def test_bad_specs_list_the_valid_kinds(spec, message):
    with pytest.raises(DataError, match=message) as info:
        load_dataset(spec)
    assert "mnist, fashion-mnist (or fashion), cifar10, folder" in str(info.value)


def test_spec_dir_must_exist(tmp_path):
    with pytest.raises(DataError, match="/no/such/dir is not an existing directory"):
        load_dataset("mnist:/no/such/dir")
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="not an existing directory"):
        load_dataset(f"folder:{tmp_path / 'file'}")


def test_bad_split(tmp_path):
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_dataset(f"mnist:{tmp_path}", "valid")


def test_find_fashion_mnist_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VQKIT_DATA", raising=False)
    monkeypatch.setattr(data, "_SYSTEM_FASHION_DIRS", ())
    spec, description = find_fashion_mnist()
    assert spec == f"fashion-mnist:{sample_dir()}"
    assert "2,000" in description and "--data DIR" in description and "VQKIT_DATA" in description

    full = tmp_path / "shared" / "data" / "fashion-mnist"
    full.mkdir(parents=True)
    for split in ("train", "test"):
        _write_idx_set(full, _idx_images(2), _idx_labels([0, 1]), split=split)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert find_fashion_mnist()[0] == f"fashion-mnist:{full}"  # found by walking up from cwd

    monkeypatch.setenv("VQKIT_DATA", str(tmp_path / "shared" / "data"))
    spec, description = find_fashion_mnist()
    assert spec == f"fashion-mnist:{full}" and "VQKIT_DATA" in description

    assert find_fashion_mnist(str(full))[0] == f"fashion-mnist:{full}"
    assert find_fashion_mnist(f"mnist:{full}")[0] == f"mnist:{full}"
    with pytest.raises(DataError, match="no Fashion-MNIST IDX files"):
        find_fashion_mnist(str(tmp_path / "work"))


def test_in_memory_copies_a_folder_set_once(tmp_path):
    from vqkit.data.datasets import TensorImageSet, in_memory

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((12, 10, 3), 40 * i + (cls == "b"), np.uint8)).save(tmp_path / cls / f"{i}.png")
    folder = load_dataset(f"folder:{tmp_path}", "all", image_size=8)
    cached = in_memory(folder, 1 << 30)
    assert isinstance(cached, TensorImageSet) and len(cached) == len(folder) == 6
    idx = torch.arange(6)
    assert torch.equal(cached.batch(idx)[0], folder.batch(idx)[0])
    assert torch.equal(cached.batch(idx)[1], folder.batch(idx)[1])
    assert cached.class_names == folder.class_names
    assert in_memory(cached, 1 << 30) is cached
    assert in_memory(folder, max_bytes=10) is folder
