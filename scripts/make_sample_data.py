"""Regenerate the embedded Fashion-MNIST sample in vqkit/sample_data/fashion-mnist/.

The sample is the first 1,500 training and the first 500 test records of Fashion-MNIST,
written as IDX files compressed with gzip level 9 (no stored name, mtime 0, so the output is
byte-for-byte reproducible):

    python scripts/make_sample_data.py /path/to/fashion-mnist
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqkit.data.datasets import load_dataset, sample_dir  # noqa: E402
from vqkit.fsutil import atomic_write_bytes  # noqa: E402

COUNTS = {"train": 1500, "test": 500}
PREFIX = {"train": "train", "test": "t10k"}


def write_gz(path: Path, payload: bytes) -> None:
    atomic_write_bytes(path, gzip.compress(payload, compresslevel=9, mtime=0))
    print(f"{path}: {path.stat().st_size:,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with the full Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=sample_dir(), help="output folder")
    args = parser.parse_args()

    for split, n in COUNTS.items():
        ds = load_dataset(f"fashion-mnist:{args.source}", split=split)  # validates the source
        images = ds.images[:n].numpy()  # (n, 1, 28, 28) uint8
        labels = ds.labels[:n].numpy().astype("uint8")
        prefix = PREFIX[split]
        write_gz(
            args.out / f"{prefix}-images-idx3-ubyte.gz",
            struct.pack(">IIII", 2051, n, ds.height, ds.width) + images.tobytes(),
        )
        write_gz(
            args.out / f"{prefix}-labels-idx1-ubyte.gz",
            struct.pack(">II", 2049, n) + labels.tobytes(),
        )


if __name__ == "__main__":
    main()
