"""CIFAR-10 in its binary version: whichever ``data_batch_*.bin`` files are present (train) and
``test_batch.bin`` (test), with the class names of ``batches.meta.txt`` when it is there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vqkit.data.files import DataError, read_checked
from vqkit.data.idx import check_labels

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + R, G, B planes


def load_cifar10(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 3, 32, 32) and labels int64 (N,) from the CIFAR-10 batch files."""
    if split == "train":
        paths = [root / f"data_batch_{k}.bin" for k in range(1, 6)]
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise DataError(
                f"{root}: no CIFAR-10 training batch (data_batch_1.bin ... data_batch_5.bin)"
            )
    else:
        paths = [root / "test_batch.bin"]
        if not paths[0].is_file():
            raise DataError(f"{root}: missing test_batch.bin")

    images, labels = [], []
    for path in paths:
        data = read_checked(path)
        if len(data) == 0 or len(data) % _CIFAR_RECORD:
            raise DataError(
                f"{path}: truncated or not a CIFAR-10 batch: {len(data)} bytes is not a "
                f"multiple of the {_CIFAR_RECORD}-byte record"
            )
        records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
        check_labels(path, records[:, 0])
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def cifar10_class_names(root: Path) -> list[str]:
    """Class names from batches.meta.txt if present (one per line), else the standard ten."""
    meta = root / "batches.meta.txt"
    if not meta.is_file():
        return CIFAR10_CLASSES
    names = [line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != 10:
        raise DataError(f"{meta}: expected 10 class names, one per line, found {len(names)}")
    return names
