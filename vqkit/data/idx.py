"""IDX files (MNIST, Fashion-MNIST): the four files of the train and test splits, gzip-compressed
or not, parsed and checked (magic number, sizes, labels)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from vqkit.data.files import DataError, gunzip, read_checked

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: Path, name: str) -> Path:
    for path in (root / f"{name}.gz", root / name):
        if path.is_file():
            return path
    raise DataError(f"{root}: missing {name}.gz (or uncompressed {name})")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX file of uint8 data with ``ndim`` dimensions (gzip-compressed if *.gz)."""
    data = read_checked(path)
    if path.suffix == ".gz":
        data = gunzip(path, data)
    header = 4 + 4 * ndim
    # Magic first: a wrong file (labels for images, say) is a clearer error than its length.
    got_magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and got_magic != magic:
        raise DataError(
            f"{path}: not an IDX file of this kind: magic number {got_magic}, expected {magic}"
        )
    if len(data) < header:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the IDX header")
    dims = list(struct.unpack_from(f">{ndim}I", data, 4))
    if 0 in dims[1:]:
        raise DataError(f"{path}: bad IDX dimensions {dims}")
    expected = header + math.prod(dims)
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing bytes"
        shape = " x ".join(map(str, dims))
        raise DataError(
            f"{path}: {problem}: expected {expected} bytes ({header}-byte header + {shape}), "
            f"got {len(data)}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def check_labels(path: Path, labels: np.ndarray, num_classes: int = 10) -> None:
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(
            f"{path}: label {labels[bad[0]]} at record {bad[0]} is out of range "
            f"0..{num_classes - 1} ({bad.size} bad labels)"
        )


def load_idx_pair(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 1, H, W) and labels int64 (N,) of an IDX image/label file pair."""
    image_name, label_name = IDX_NAMES[split]
    image_path, label_path = _find_idx(root, image_name), _find_idx(root, label_name)
    images = _read_idx(image_path, magic=2051, ndim=3)
    labels = _read_idx(label_path, magic=2049, ndim=1)
    if len(images) != len(labels):
        raise DataError(
            f"{root}: {image_path.name} has {len(images)} images but {label_path.name} "
            f"has {len(labels)} labels"
        )
    check_labels(label_path, labels)
    # Copy: frombuffer arrays are read-only views of the file bytes.
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))
