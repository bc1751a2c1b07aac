"""Prepared image sets: a dataset decoded, cropped and resized once, into a uint8 array on disk
that every command reads in place (``prepared:SET``), for sets too large to decode on every read
or to hold in memory.

A prepared set is a folder::

    SET/manifest.json   {"kind": "vqkit-prepared-images", "format_version": 1, "source": spec,
                         "image_size": S or null, "shape": [N, C, H, W], "class_names": [...] or
                         null, "splits": {"train": [0, n_train], "test": [n_train, N]},
                         "skipped": [{"path", "error"}, ...]}
    SET/images.npy      uint8 (N, C, H, W), NumPy's .npy format, the train split's images first
    SET/labels.npy      int64 (N,)
    SET/files.jsonl     the source files, one JSON array per line: [path relative to the source
                        folder, bytes, sha256] (folder sources only)

``numpy.load("SET/images.npy", mmap_mode="r")`` maps it. vqkit reads batches with ``os.pread``
(sorted rows, neighbours coalesced into one read), so that a training run's resident memory does
not grow with the set: the kernel's page cache holds what is cached, and gives it back under
memory pressure. Opening a set checks the manifest, both arrays' .npy headers against its shape
and the file sizes, and never unpickles.

``prepare`` decodes in worker processes (``torch.utils.data.DataLoader``, in order) and writes
into ``.SET.partial`` beside the target, recording its progress there after every few seconds
of work; an interrupted prepare, run again with the same arguments, resumes where it stopped.
The finished folder is renamed into place, so ``SET`` is always absent or complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from vqkit.data.datasets import FolderImageSet, ImageSet, load_dataset
from vqkit.data.files import DataError
from vqkit.data.images import ImageError, decode_image
from vqkit.data.loader import usable_cpus
from vqkit.fsutil import (
    atomic_write_text,
    check_replaceable,
    fsync_dir,
    fsync_file,
    move_folder_into_place,
    read_npy,
)

log = logging.getLogger(__name__)

KIND = "vqkit-prepared-images"
FORMAT_VERSION = 1
SPLITS = ("train", "test", "all")
# Files per task handed to a worker: enough to amortise sending the pixels back, few enough
# that an interrupted prepare loses little and the progress bar moves.
CHUNK_FILES = 64
# Seconds of work between two progress records of an unfinished prepare.
SAVE_EVERY = 5.0
# Buffers one preadv may fill (POSIX IOV_MAX on Linux).
_IOV_MAX = 1024


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` made: the set's folder, its images per split, the files skipped as
    unreadable, the files that an earlier interrupted run had already done, and the seconds."""

    path: Path
    counts: dict[str, int]
    skipped: int
    resumed: int
    seconds: float


# --------------------------------------------------------------------------------------------
# Reading


class PreparedImageSet(ImageSet):
    """One split of a prepared set, read through ``os.pread`` without loading it.

    Item i is (uint8 (C, H, W), int label); ``batch(indices)`` reads the rows of a batch in
    sorted order, one ``pread`` per run of neighbouring rows. ``images`` is the split's
    read-only memory map.

    Args:
        root: the prepared set's folder.
        split: "train", "test" or "all".
    """

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        root = Path(root)
        manifest = read_manifest(root)
        if split not in SPLITS:
            raise DataError(f"prepared:{root}: unknown split {split!r}; a prepared set has splits "
                            f"{', '.join(SPLITS)}")
        n, c, h, w = manifest["shape"]
        self.root, self.manifest = root, manifest
        self.start, self.stop = (0, n) if split == "all" else manifest["splits"][split]
        self._array = _open_images(root / "images.npy", (n, c, h, w))
        labels = read_npy(root / "labels.npy", error=DataError)
        if labels.dtype != np.int64 or labels.shape != (n,):
            raise DataError(f"{root / 'labels.npy'}: holds {labels.dtype} {labels.shape}, but the "
                            f"manifest needs int64 ({n},)")
        classes = manifest["class_names"]
        if n and (labels.min() < 0 or labels.max() >= max(len(classes or []), 1)):
            raise DataError(f"{root / 'labels.npy'}: labels outside [0, {max(len(classes or []), 1)})")
        self.labels = torch.from_numpy(labels[self.start:self.stop].copy())
        self._row_bytes = c * h * w
        self._fd: int | None = None
        self._pid: int | None = None
        super().__init__(f"prepared:{root}", c, h, w, classes, skipped=len(manifest.get("skipped", [])))

    @property
    def images(self) -> np.ndarray:
        """The split's images, uint8 (N, C, H, W), a read-only memory map of ``images.npy``."""
        return self._array[self.start:self.stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        images, labels = self.batch(torch.tensor([i]))
        return images[0], int(labels[0])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items at ``indices`` (1-D int tensor of length B): uint8 (B, C, H, W), int64 (B,)."""
        idx = indices.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)}) for {self.spec}")
        # Rows are read in file order, each run of neighbouring rows with one preadv that
        # scatters it straight into the rows of ``out`` where the batch wants them.
        order = torch.argsort(idx).tolist()
        rows = (idx + self.start).tolist()
        out = torch.empty((len(rows), self.channels, self.height, self.width), dtype=torch.uint8)
        flat = memoryview(out.view(-1).numpy())  # B * C*H*W bytes, row k at k * row_bytes
        dest = [flat[k * self._row_bytes:(k + 1) * self._row_bytes] for k in range(len(rows))]
        fd = self._file()
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and j - i < _IOV_MAX and rows[order[j]] == rows[order[j - 1]] + 1:
                j += 1
            self._read_rows(fd, rows[order[i]], [dest[k] for k in order[i:j]])
            i = j
        return out, self.labels[idx]

    def _read_rows(self, fd: int, first: int, into: list[memoryview]) -> None:
        """Rows ``first, first + 1, ...`` into the buffers ``into``, one row each."""
        offset = self._array.offset + first * self._row_bytes
        want = len(into) * self._row_bytes
        got = os.preadv(fd, into, offset)
        while got < want:  # a short read (a signal, a huge run): go on where it stopped
            k, done = divmod(got, self._row_bytes)
            n = os.preadv(fd, [into[k][done:], *into[k + 1:]], offset + got)
            if n == 0:
                raise DataError(f"{self.root / 'images.npy'}: ends early (truncated while in use?)")
            got += n

    def _file(self) -> int:
        # One descriptor per process: a DataLoader worker forked from this one opens its own.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.root / "images.npy", os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


def read_manifest(root: Path) -> dict:
    """The checked manifest of the prepared set at ``root``; DataError saying what is wrong."""
    path = root / "manifest.json"
    if not root.is_dir():
        partial = _partial_dir(root)
        hint = (f"; {partial} holds an unfinished `vqkit prepare`: run it again to resume"
                if partial.is_dir() else "")
        raise DataError(f"prepared:{root}: no such prepared set{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"prepared:{root}: not a prepared set (no manifest.json); make one with "
                        "`vqkit prepare`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise DataError(f"{path}: not a vqkit prepared image set (kind is not {KIND!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {manifest.get('format_version')} is not supported "
                        f"(this vqkit reads version {FORMAT_VERSION})")
    shape, splits, names = manifest.get("shape"), manifest.get("splits"), manifest.get("class_names")
    good_shape = (isinstance(shape, list) and len(shape) == 4 and all(_is_int(v) and v >= 0 for v in shape)
                  and shape[1] in (1, 3) and shape[2] > 0 and shape[3] > 0)
    good_splits = (good_shape and isinstance(splits, dict) and set(splits) == {"train", "test"}
                   and splits["train"][0] == 0 and splits["train"][1] == splits["test"][0]
                   and splits["test"][1] == shape[0]
                   and all(isinstance(r, list) and len(r) == 2 and all(map(_is_int, r)) and r[0] <= r[1]
                           for r in splits.values()))
    good_names = names is None or isinstance(names, list) and all(isinstance(x, str) for x in names)
    bad = [name for name, ok in (("shape", good_shape), ("splits", good_splits), ("class_names", good_names))
           if not ok]
    if bad:
        raise DataError(f"{path}: invalid or missing {', '.join(bad)}")
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _open_images(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """``images.npy`` mapped read-only, checked against the manifest's shape and its own size."""
    array = read_npy(path, mmap=True, error=DataError)
    if array.dtype != np.uint8 or array.shape != shape or not array.flags.c_contiguous:
        raise DataError(f"{path}: holds {array.dtype} {array.shape}, but the manifest says uint8 {shape}")
    size, expected = path.stat().st_size, array.offset + math.prod(shape)
    if size != expected:
        raise DataError(f"{path}: {size} bytes, expected {expected} for uint8 {shape} (torn or altered)")
    return array


# --------------------------------------------------------------------------------------------
# Writing


class _Decode(torch.utils.data.Dataset):
    """Item ``c``: chunk ``c`` of the files decoded, as (pixels of the readable ones, uint8
    (n, C, H, W); one (bytes, sha256, error or None) per file)."""

    def __init__(self, files: list[Path], channels: int, image_size: int | None):
        self.files, self.channels, self.image_size = files, channels, image_size

    def __getitem__(self, c: int):
        pixels, info = [], []
        for path in self.files[c * CHUNK_FILES:(c + 1) * CHUNK_FILES]:
            try:
                data = path.read_bytes()
            except OSError as e:
                info.append((0, "", f"{path}: cannot read file ({e.strerror})"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            try:
                pixels.append(decode_image(data, self.image_size, self.channels, name=path))
            except ImageError as e:
                info.append((len(data), digest, str(e)))
                continue
            info.append((len(data), digest, None))
        stacked = torch.stack(pixels) if pixels else torch.empty(0, dtype=torch.uint8)
        return stacked, info


def prepare(spec: str, out: str | os.PathLike, image_size: int | None = None, workers: int | None = None,
            skip_bad: bool = False, overwrite: bool = False, progress: bool = False) -> PrepareResult:
    """Decode the dataset ``spec`` (both splits) once into the prepared set ``out``.

    Args:
        spec: the source, ``KIND:DIR`` as for ``load_dataset`` (folder, mnist, fashion-mnist, cifar10).
        out: the prepared set's folder; written as ``.OUT.partial`` and renamed when complete.
        image_size: centre-crop and resize every image to this side (required for folders whose
            files differ in size).
        workers: decoding processes for folder sources (None: one per usable CPU; 0: this process).
        skip_bad: drop unreadable files (listed in the manifest) instead of stopping at the first.
        overwrite: replace an existing prepared set at ``out``.
        progress: show a progress bar.

    Returns:
        a ``PrepareResult``. An interrupted call, repeated with the same arguments, resumes.
    """
    start = time.monotonic()
    out = Path(out)
    if spec.partition(":")[0].lower() == "prepared":
        raise DataError(f"{spec}: already a prepared set")
    _check_replaceable(out, overwrite)
    if workers is not None and workers < 0:
        raise DataError(f"the number of workers must be >= 0, got {workers}")
    sets = {split: load_dataset(spec, split, image_size=image_size) for split in ("train", "test")}
    first = sets["train"]
    if sets["test"].class_names != first.class_names or (sets["test"].height, sets["test"].width) != (
            first.height, first.width):
        raise DataError(f"{spec}: the train and test splits differ in classes or image size")
    c, h, w = first.channels, first.height, first.width
    folder = isinstance(first, FolderImageSet)
    files = [f for s in sets.values() for f in s.files] if folder else []
    labels = [y for s in sets.values() for y in (s.labels if folder else s.labels.tolist())]
    sizes = {split: len(s) for split, s in sets.items()}
    n = len(labels)
    root = Path(spec.partition(":")[2]).expanduser().resolve()
    plan = {"source": f"{spec.partition(':')[0].lower()}:{root}", "image_size": image_size,
            "shape": [n, c, h, w], "class_names": first.class_names, "splits": sizes,
            "chunk_files": CHUNK_FILES,
            "files": [[str(p), p.stat().st_size] for p in files]}
    plan_digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()

    tmp = _partial_dir(out)
    state = _resume_state(tmp, plan_digest)
    if state is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, c, h, w)).flush()
        if folder:
            (tmp / "files.jsonl").write_bytes(b"")
        state = {"plan": plan_digest, "chunks": 0, "rows": 0, "files_bytes": 0, "skipped": []}
        _save_state(tmp, state)
    resumed = state["chunks"] * CHUNK_FILES if folder else 0
    images = _Rows(tmp / "images.npy", c * h * w)
    row_labels = np.asarray(labels, dtype=np.int64)
    kept = np.ones(n, dtype=bool)  # which of the n images were readable
    for entry in state["skipped"]:
        kept[entry["index"]] = False

    with tqdm(total=n, initial=min(resumed, n), desc="prepare", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        if not folder:
            images.write(0, sets["train"].images.numpy())
            images.write(sizes["train"], sets["test"].images.numpy())
            state["rows"] = n
            bar.update(n)
        else:
            _decode_into(images, files, c, image_size, workers, skip_bad, tmp, state, kept, root, bar)

    # Unreadable files leave no row: copy the rows into an array of the right length.
    good = int(kept.sum())
    if good < n:
        open_memmap(tmp / "images.tmp.npy", mode="w+", dtype=np.uint8, shape=(good, c, h, w)).flush()
        compact = _Rows(tmp / "images.tmp.npy", c * h * w)
        for s in range(0, good, CHUNK_FILES):
            compact.write(s, images.read(s, min(CHUNK_FILES, good - s)))
        compact.close()
        images.close()
        os.replace(tmp / "images.tmp.npy", tmp / "images.npy")
    else:
        images.close()
    n_train = int(kept[:sizes["train"]].sum())
    with open(tmp / "labels.npy", "wb") as f:
        np.save(f, row_labels[kept])
    manifest = {
        "kind": KIND, "format_version": FORMAT_VERSION, "source": plan["source"], "image_size": image_size,
        "shape": [good, c, h, w], "class_names": first.class_names,
        "splits": {"train": [0, n_train], "test": [n_train, good]},
        "skipped": [{"path": e["path"], "error": e["error"]} for e in state["skipped"]],
    }
    for name in ("images.npy", "labels.npy", "files.jsonl") if folder else ("images.npy", "labels.npy"):
        fsync_file(tmp / name)
    (tmp / "progress.json").unlink()
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
    fsync_dir(tmp)
    _check_replaceable(out, overwrite)  # another process may have made it meanwhile
    move_folder_into_place(tmp, out)
    return PrepareResult(out, {"train": n_train, "test": good - n_train}, len(state["skipped"]), resumed,
                         time.monotonic() - start)


def _decode_into(images: _Rows, files: list[Path], channels: int, image_size: int | None,
                 workers: int | None, skip_bad: bool, tmp: Path, state: dict, kept: np.ndarray,
                 root: Path, bar: tqdm) -> None:
    """Decode ``files`` chunk by chunk from ``state["chunks"]`` on, writing the readable ones to
    consecutive rows of ``images`` and saving ``state`` every ``SAVE_EVERY`` seconds."""
    chunks = -(-len(files) // CHUNK_FILES)
    n_workers = min(usable_cpus() if workers is None else workers, chunks - state["chunks"])
    loader = torch.utils.data.DataLoader(
        _Decode(files, channels, image_size), batch_size=None, sampler=range(state["chunks"], chunks),
        num_workers=n_workers, prefetch_factor=2 if n_workers else None, generator=torch.Generator())
    lines: list[str] = []
    last_save = time.monotonic()
    with open(tmp / "files.jsonl", "r+b") as listing:
        listing.truncate(state["files_bytes"])  # lines past the last saved state are redone
        listing.seek(state["files_bytes"])
        for c, (pixels, info) in zip(range(state["chunks"], chunks), loader):
            base = c * CHUNK_FILES
            for k, (size, digest, error) in enumerate(info):
                path = files[base + k]
                if error is not None:
                    if not skip_bad:
                        raise DataError(f"{error} (pass --skip-bad to leave unreadable files out)")
                    log.warning("skipping %s", error)
                    state["skipped"].append({"index": base + k, "path": _relative(path, root), "error": error})
                    kept[base + k] = False
                lines.append(json.dumps([_relative(path, root), size, digest]) + "\n")
            images.write(state["rows"], pixels.numpy())
            state["rows"] += len(pixels)
            state["chunks"] = c + 1
            bar.update(len(info))
            if time.monotonic() - last_save >= SAVE_EVERY or c + 1 == chunks:
                images.sync()
                listing.write("".join(lines).encode())
                listing.flush()
                os.fsync(listing.fileno())
                lines.clear()
                state["files_bytes"] = listing.tell()
                _save_state(tmp, state)
                last_save = time.monotonic()


class _Rows:
    """Rows of a uint8 .npy file written and read with pwrite/pread, so that a prepare holds no
    more than a chunk of a set however large it is (a memory map would keep every written page)."""

    def __init__(self, path: Path, row_bytes: int):
        self.offset = np.load(path, mmap_mode="r").offset
        self.row_bytes = row_bytes
        self.fd = os.open(path, os.O_RDWR)

    def write(self, row: int, pixels: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(pixels)).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], self.offset + row * self.row_bytes + done)

    def read(self, row: int, count: int) -> np.ndarray:
        data = os.pread(self.fd, count * self.row_bytes, self.offset + row * self.row_bytes)
        return np.frombuffer(data, dtype=np.uint8)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def _partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _save_state(tmp: Path, state: dict) -> None:
    atomic_write_text(tmp / "progress.json", json.dumps(state))


def _resume_state(tmp: Path, plan_digest: str) -> dict | None:
    """The saved progress of an unfinished prepare of the same plan in ``tmp``, or None."""
    try:
        state = json.loads((tmp / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("plan") != plan_digest:
        log.warning("%s: an unfinished prepare of other images or settings; starting again", tmp)
        return None
    log.info("%s: resuming after %d chunks", tmp, state["chunks"])
    return state


def _check_replaceable(out: Path, overwrite: bool) -> None:
    check_replaceable(out, overwrite, (KIND,), "a vqkit prepared set", DataError)
