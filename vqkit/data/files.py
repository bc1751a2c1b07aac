"""Reading dataset files whole: every read is checked, and an official distribution file (known
name and size) must match its published md5; gzip errors are named. ``DataError`` is what every
problem with a dataset's input raises, naming the file and what is wrong."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

from vqkit.errors import VqkitError


class DataError(VqkitError, ValueError):
    """Unusable input data; the message names the file (or spec) and the problem."""


# md5 of the official distribution files, keyed by (file name, size in bytes). The size is in
# the key because MNIST and Fashion-MNIST share file names; a file with an official name but
# another size (e.g. a re-compressed copy) is not a known file and is not checked.
OFFICIAL_MD5: dict[tuple[str, int], str] = {
    # MNIST
    ("train-images-idx3-ubyte.gz", 9_912_422): "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ("train-labels-idx1-ubyte.gz", 28_881): "d53e105ee54ea40749a09fcbcd1e9432",
    ("t10k-images-idx3-ubyte.gz", 1_648_877): "9fb629c4189551a2d022fa330f9573f3",
    ("t10k-labels-idx1-ubyte.gz", 4_542): "ec29112dd5afa0611ce80d1b7f02629c",
    # Fashion-MNIST
    ("train-images-idx3-ubyte.gz", 26_421_880): "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ("train-labels-idx1-ubyte.gz", 29_515): "25c81989df183df01b3e8a0aad5dffbe",
    ("t10k-images-idx3-ubyte.gz", 4_422_102): "bef4ecab320f06d8554ea6380940ec79",
    ("t10k-labels-idx1-ubyte.gz", 5_148): "bb300cfdad3c16e7a12a480ee83cd310",
    # CIFAR-10, binary version (only these two batches have published per-file md5s)
    ("data_batch_1.bin", 30_730_000): "5dd7e06a14cb22eb9f671a540d1b7c25",
    ("test_batch.bin", 30_730_000): "803d5f7f4d78ea53de84dbe85f74fb6d",
}


def read_checked(path: Path) -> bytes:
    """Whole file contents; an official file (known name and size) must match its md5."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror})") from e
    expected = OFFICIAL_MD5.get((path.name, len(data)))
    if expected is not None:
        got = hashlib.md5(data).hexdigest()
        if got != expected:
            raise DataError(
                f"{path}: checksum mismatch: expected md5 {expected}, got {got} "
                "(the file is corrupt or modified; download it again)"
            )
    return data


def gunzip(path: Path, data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except EOFError as e:
        raise DataError(f"{path}: truncated gzip file (incomplete download?)") from e
    # BadGzipFile covers a bad header and a CRC or length mismatch; zlib.error a corrupt stream.
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file ({e})") from e
