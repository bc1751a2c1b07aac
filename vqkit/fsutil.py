"""Atomic file writes: a file either has its old content or its complete new content.

Every file vqkit writes goes through here, so that killing the process at any instant never
leaves a half-written checkpoint, image or code map behind. Arrays are read back through
``read_npy``, which never unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over ``path``.

    The rename is atomic on POSIX file systems; the data is fsync'ed first so that a power
    loss cannot leave a renamed but empty file. On failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file readable by its owner only; give it the mode that open() would,
    # so that a checkpoint, image or report can be shared like any other file the user writes.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success rename it to ``path``.

    ``path`` must be absent or an empty folder, unless ``replace``: then the old folder is
    renamed aside, the new one renamed into place and the old one deleted, so that at every
    instant ``path`` is the complete old folder, absent, or the complete new one (never a mix).
    Every file is fsync'ed before the rename. On failure the temporary folder is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is its owner's only; as mkdir would
    old: Path | None = None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if replace and path.is_dir() and any(path.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_npy(path: Path, mmap: bool = False, error: type[Exception] = ValueError) -> np.ndarray:
    """A .npy array (memory-mapped read-only with ``mmap``), refusing anything else without
    ever unpickling; a missing, foreign or torn file raises ``error`` naming the file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise error(f"{path}: missing (no such file)") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    if magic != b"\x93NUMPY":
        # np.load would try other formats first and report "pickled data", which misleads.
        raise error(f"{path}: not a .npy file (no NumPy .npy header)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise error(f"{path}: not a readable .npy array ({e})") from None


def check_replaceable(out: Path, overwrite: bool, kinds: tuple[str, ...], what: str,
                      error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless a folder may be written at ``out``: it is absent, or ``overwrite``
    is set and ``out`` is a folder whose ``manifest.json`` names one of ``kinds`` (``what``
    describes them in the message), so that a mistyped -o never removes an unrelated folder."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise error(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    try:
        kind = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if not out.is_dir() or out.is_symlink() or kind not in kinds:
        raise error(f"{out}: exists and is not {what}; refusing to replace it")


def move_folder_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``, replacing an existing folder there.

    Two folders cannot be swapped atomically, so the old one is first renamed aside (and back
    if the second rename fails): a crash between the two renames leaves both complete folders
    under their hidden names, never a partial one at ``out``.
    """
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)
