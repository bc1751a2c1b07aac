"""Code sets: a whole dataset's stage-1 code maps on disk, the input of a prior.

VQ-VAE-2 (Razavi et al. 2019), Algorithm 2, lines 1-7: run the trained encoder over the
training set once and keep the discrete codes, so that a prior trains on small integer maps
instead of re-encoding images every step. Layout of a code set folder::

    codes.npy        uint16 (N, h, w) (int32 when K > 65536): row i is image i's code map
    labels.npy       int64 (N,): class of image i, -1 where the dataset has no labels
    manifest.json    count, map shape, K, dtype, image size, classes, provenance (run, model
                     fingerprint, dataset spec and split); written last

Extracted with ``flip``, a set holds ``images`` = N/2 images twice: rows ``[0, images)`` are the
images' code maps and row ``images + i`` is the code map of image ``i`` mirrored left to right
(the encoder's codes of the mirrored image, not the mirrored map: the encoder is not
equivariant). A prior trains on both and is measured on the originals only
(``CodeSet.images``, ``CodeSet.with_flips``).

Both arrays are plain ``.npy`` files, memory-mapped on load and never unpickled. Extraction
streams batches into a memory-mapped ``codes.npy`` inside a temporary sibling folder
``.NAME.tmp-*``, fsyncs it, writes the manifest last and renames the folder into place: a
killed extraction leaves at most a ``.NAME.tmp-*`` folder without a manifest (safe to
delete), never a set that looks complete.

A VQ-VAE-2 (``extract_levels``) gives one such set per level, in sub-folders named after the
levels (``CODES/top``, ``CODES/bottom``, ...) with the same images in the same order, beside a
``manifest.json`` of kind ``vqkit-code-levels`` that lists them; the whole folder is written
and renamed the same way. The sets are those of the model's code maps (``VQVAEConfig.code_maps``),
so a residual level gives one set per stage (``CODES/top.0``, ``CODES/top.1``, ...; for a
one-level model ``CODES/codes.0``, ...), and a set's ``level_index`` is its map's place, top-first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from vqkit.data.datasets import ImageSet, to_model
from vqkit.data.loader import iter_batches
from vqkit.errors import UsageError, VqkitError
from vqkit.fsutil import (
    atomic_path,
    check_replaceable,
    fsync_dir,
    fsync_file,
    move_folder_into_place,
    read_npy,
)
from vqkit.nn.vqvae import VQVAE, StageOneConfig

FORMAT_VERSION = 1
KIND = "vqkit-codes"
# The folder that holds one code set per level of a VQ-VAE-2.
LEVELS_KIND = "vqkit-code-levels"
# Elements read per step when range-checking codes.npy: bounds the memory of the check.
_CHECK_CHUNK = 1 << 22


class CodeStoreError(VqkitError, ValueError):
    """A code set folder that cannot be used or written; the message names the file."""


@dataclass
class CodeSet:
    """A stored code set: ``codes`` (N, h, w) and ``labels`` (N,) as (memory-mapped) arrays
    and the ``manifest`` dict that describes them."""

    path: Path
    codes: np.ndarray
    labels: np.ndarray
    manifest: dict

    @property
    def codebook_size(self) -> int:
        return self.manifest["codebook_size"]

    @property
    def shape(self) -> tuple[int, int]:
        """The code map's (h, w)."""
        h, w = self.manifest["shape"]
        return h, w

    @property
    def num_classes(self) -> int | None:
        return self.manifest["num_classes"]

    @property
    def images(self) -> int:
        """The number of distinct images (half the maps of a set extracted with ``flip``)."""
        return self.manifest.get("images", self.manifest["count"])

    @property
    def flipped(self) -> bool:
        """Whether maps ``images + i`` are those of image ``i`` mirrored."""
        return self.images != len(self)

    def with_flips(self, indices: torch.Tensor) -> torch.Tensor:
        """The map indices of the images ``indices``: each image's own map and, in a flipped
        set, its mirror's."""
        return torch.cat([indices, indices + self.images]) if self.flipped else indices

    def __len__(self) -> int:
        return self.codes.shape[0]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps at ``indices`` (1-D integer tensor of length B): int64 (B, h, w), int64 (B,)."""
        if indices.dim() != 1 or indices.dtype == torch.bool or indices.is_floating_point() \
                or indices.is_complex():
            raise UsageError(f"indices must be a 1-D integer tensor, got {indices.dtype} "
                             f"{tuple(indices.shape)}")
        idx = indices.cpu().numpy()
        return (torch.from_numpy(self.codes[idx].astype(np.int64)),
                torch.from_numpy(self.labels[idx].astype(np.int64)))


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest stored dtype for codes in [0, codebook_size)."""
    return np.dtype(np.uint16 if codebook_size <= 65536 else np.int32)


def extract_codes(model: VQVAE, dataset: ImageSet, out: str | os.PathLike, *, batch_size: int = 256,
                  limit: int | None = None, progress: bool = True, overwrite: bool = False,
                  flip: bool = False, source: dict, workers: int | None = None) -> list[CodeSet]:
    """VQ-VAE-2 Algorithm 2, lines 1-7: encode the first ``limit`` images of ``dataset`` (all by
    default) once and store every code map. Returns the sets top-first.

    One code map gives one code set at ``out``; several (levels, or a residual level's stages)
    give one ordinary code set per map in ``out/<map name>/`` (``top``, [``middle``], ``bottom``,
    see ``level_names``; ``top.0``, ``top.1`` for stages), each manifest adding ``level`` (its
    name) and ``level_index`` (0 for the top map) to ``source``,
    beside ``out/manifest.json`` (kind ``vqkit-code-levels``) that lists them. Map ``i`` of every
    level is image ``i``: a lower level's prior trains on its maps with the maps of the levels
    above as conditioning.

    ``flip`` also stores the code maps of every image mirrored left to right, after the
    originals (rows ``n + i``; see the module docstring): exact augmentation for a prior, at
    twice the extraction time and space.

    ``workers`` processes decode a folder set ahead of the encoder (``vqkit.data.loader``).

    ``source`` is the provenance written into the manifests (JSON-serialisable; the command
    line gives ``run``, ``step``, ``fingerprint``, ``data`` and ``split``). An existing
    ``out`` is refused unless ``overwrite``, and then only if it is a code set itself. The whole
    folder is written under a temporary name and renamed into place once, so a killed
    extraction leaves no set that looks complete.
    """
    maps = model.config.code_maps()
    names = [m.name for m in maps] if len(maps) > 1 else None
    _extract(model, dataset, Path(out), names, batch_size=batch_size, limit=limit, progress=progress,
             overwrite=overwrite, flip=flip, source=source, workers=workers)
    return [load_codes(Path(out) / name) for name in names] if names else [load_codes(out)]


def _extract(model: VQVAE, dataset: ImageSet, out: Path, names: list[str] | None, *,
             batch_size: int, limit: int | None, progress: bool, overwrite: bool, flip: bool,
             source: dict, workers: int | None) -> None:
    """Encode into one code set at ``out`` (``names`` None), or one per level in ``out/<name>/``."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1, got {limit}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise UsageError(f"{dataset.spec}: no images to extract")
    config = model.config
    if dataset.channels != config.in_channels:
        raise UsageError(f"{dataset.spec}: images have {dataset.channels} channels but the model "
                         f"expects {config.in_channels}")
    try:
        shapes = config.map_shapes(dataset.height, dataset.width)
    except VqkitError as e:
        raise UsageError(f"{dataset.spec}: {e}") from None
    sizes = [m.codebook_size for m in config.code_maps()]
    count = 2 * n if flip else n
    folders = [Path()] if names is None else [Path(name) for name in names]
    # Serialise now: a provenance that is not JSON must fail before the long encoding pass.
    manifest_texts = []
    for level, ((h, w), k) in enumerate(zip(shapes, sizes)):
        level_source = source if names is None else {**source, "level": names[level], "level_index": level}
        manifest_texts.append(_json({
            "format_version": FORMAT_VERSION, "kind": KIND, "count": count, "images": n, "shape": [h, w],
            "codebook_size": k, "dtype": code_dtype(k).name,
            "image_size": [dataset.channels, dataset.height, dataset.width],
            "num_classes": dataset.num_classes, "class_names": dataset.class_names,
            "source": level_source,
        }))
    levels_text = None if names is None else _json({
        "format_version": FORMAT_VERSION, "kind": LEVELS_KIND, "count": count, "images": n, "levels": names,
        "source": source})
    _check_replaceable(out, overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for folder in folders:
            (tmp / folder).mkdir(exist_ok=True)
        codes = [open_memmap(tmp / folder / "codes.npy", mode="w+", dtype=code_dtype(k), shape=(count, h, w))
                 for folder, (h, w), k in zip(folders, shapes, sizes)]
        labels = [open_memmap(tmp / folder / "labels.npy", mode="w+", dtype=np.int64, shape=(count,))
                  for folder in folders]
        # Where each pass over the images goes: the originals, then (flip) their mirrors.
        passes = [(0, False), (n, True)] if flip else [(0, False)]
        with tqdm(total=count, desc="extract", unit="img", disable=not progress,
                  dynamic_ncols=True) as bar:
            for start, images, y in iter_batches(dataset, batch_size, limit=n, workers=workers, device=device):
                stop = start + len(images)
                for offset, mirrored in passes:
                    x = to_model(images.flip(-1) if mirrored else images).to(device)
                    # One encoder pass gives every code map of the same images.
                    for array, level_maps in zip(codes, model.encode(x)):
                        array[offset + start:offset + stop] = level_maps.cpu().numpy()
                    # Unlabelled folders give label 0 for every image; -1 says "no label".
                    for array in labels:
                        array[offset + start:offset + stop] = y.numpy() if dataset.num_classes is not None else -1
                    bar.update(stop - start)
        for array in codes + labels:
            array.flush()
        del codes, labels, array  # close the maps before the files are fsynced and renamed
        for folder, text in zip(folders, manifest_texts):
            for name in ("codes.npy", "labels.npy"):
                fsync_file(tmp / folder / name)
            _write_synced(tmp / folder / "manifest.json", text)
            fsync_dir(tmp / folder)
        if levels_text is not None:
            _write_synced(tmp / "manifest.json", levels_text)
        fsync_dir(tmp)
        _check_replaceable(out, overwrite)  # another process may have created it meanwhile
        move_folder_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def load_codes(path: str | os.PathLike, mmap: bool = True) -> CodeSet:
    """Open and validate the code set at ``path``; ``mmap`` maps the arrays instead of reading them.

    Checks the manifest, that both arrays are ``.npy`` files of the shape and dtype it states
    and that every code lies in [0, K) (one chunked pass over the file); any problem raises
    CodeStoreError naming the file.
    """
    path = Path(path)
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such code set folder"
        raise CodeStoreError(f"{path}: {what}")
    manifest = _read_manifest(path / "manifest.json")
    n = manifest["count"]
    h, w = manifest["shape"]
    k = manifest["codebook_size"]

    codes_path = path / "codes.npy"
    codes = read_npy(codes_path, mmap, CodeStoreError)
    if codes.dtype != np.dtype(manifest["dtype"]) or codes.shape != (n, h, w):
        raise CodeStoreError(f"{codes_path}: holds {codes.dtype} {codes.shape}, but the manifest "
                             f"says {manifest['dtype']} {(n, h, w)}")
    rows = max(1, _CHECK_CHUNK // (h * w))
    for start in range(0, n, rows):
        chunk = codes[start:start + rows]
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= k:
            bad = start + int(np.flatnonzero(((chunk < 0) | (chunk >= k)).any(axis=(1, 2)))[0])
            raise CodeStoreError(f"{codes_path}: codes must lie in [0, {k}), but map {bad} holds "
                                 f"values in [{int(codes[bad].min())}, {int(codes[bad].max())}]")

    labels_path = path / "labels.npy"
    labels = read_npy(labels_path, mmap, CodeStoreError)
    if labels.dtype != np.int64 or labels.shape != (n,):
        raise CodeStoreError(f"{labels_path}: holds {labels.dtype} {labels.shape}, but the manifest "
                             f"needs int64 ({n},), one label per code map")
    classes = manifest["num_classes"]
    if n and (labels.min() < -1 or labels.max() >= (classes or 0)):
        raise CodeStoreError(f"{labels_path}: labels must be -1 (none) or lie in "
                             f"[0, {classes or 0}), found [{labels.min()}, {labels.max()}]")
    return CodeSet(path=path, codes=codes, labels=labels, manifest=manifest)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CodeStoreError(f"{path}: missing; {path.parent} is not a complete code set "
                             "(an interrupted extraction leaves no manifest)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CodeStoreError(f"{path}: not valid JSON ({e})") from None
    if isinstance(manifest, dict) and manifest.get("kind") == LEVELS_KIND:
        levels = [str(name) for name in manifest.get("levels") or []]
        raise CodeStoreError(f"{path.parent}: holds one code set per level of a VQ-VAE-2 "
                             f"({', '.join(levels)}); use a level's sub-folder, e.g. "
                             f"{path.parent / (levels or ['bottom'])[-1]}")
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise CodeStoreError(f"{path}: not a vqkit code set manifest (kind is not {KIND!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CodeStoreError(f"{path}: format version {manifest.get('format_version')} is not "
                             f"supported (this vqkit reads version {FORMAT_VERSION})")

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    shape, classes, names = manifest.get("shape"), manifest.get("num_classes"), manifest.get("class_names")
    problems = [
        "count" if not positive_int(manifest.get("count")) else "",
        "shape" if not (isinstance(shape, list) and len(shape) == 2 and all(map(positive_int, shape)))
        else "",
        "codebook_size" if not positive_int(manifest.get("codebook_size")) else "",
        "dtype" if not positive_int(manifest.get("codebook_size"))
        or manifest.get("dtype") != code_dtype(manifest["codebook_size"]).name else "",
        "num_classes" if not (classes is None or positive_int(classes)) else "",
        "class_names" if not (names is None and classes is None or isinstance(names, list)
                              and len(names) == classes) else "",
        # A flipped set holds each image twice (see the module docstring).
        "images" if "images" in manifest and not (positive_int(manifest["images"]) and manifest.get("count")
                                                  in (manifest["images"], 2 * manifest["images"])) else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CodeStoreError(f"{path}: invalid or missing {', '.join(problems)}")
    return manifest


def save_maps(maps: list[torch.Tensor], path: str | os.PathLike, config: StageOneConfig) -> None:
    """Code maps (one (N, h_m, w_m) tensor per code map of a model of ``config``, top-first) as
    ``vqkit encode`` writes them: one map as one ``.npy`` file at ``path``; several as a folder
    of ``<map name>.npy`` files (``top.npy``, [``middle.npy``], ``bottom.npy``; ``codes.0.npy``,
    ``codes.1.npy`` for a residual level's stages). Written under a temporary name and renamed
    into place; an existing folder is replaced only if it holds nothing but such files."""
    code_maps = config.code_maps()
    if len(maps) != len(code_maps):
        raise UsageError(f"got {len(maps)} code maps for a model of {len(code_maps)}")
    codebook_sizes = [m.codebook_size for m in code_maps]
    if len(maps) == 1:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, maps[0].cpu().numpy().astype(code_dtype(codebook_sizes[0])))
        return
    out = Path(path)
    names = [f"{m.name}.npy" for m in code_maps]
    if out.exists() and (not out.is_dir() or any(p.name not in names for p in out.iterdir())):
        raise CodeStoreError(f"{out}: exists and is not a folder of code maps ({', '.join(names)}); "
                             "refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, codes, k in zip(names, maps, codebook_sizes):
            with open(tmp / name, "wb") as f:
                np.save(f, codes.cpu().numpy().astype(code_dtype(k)))
            fsync_file(tmp / name)
        fsync_dir(tmp)
        move_folder_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_map_file(path: Path, codebook_size: int) -> torch.Tensor:
    """Code maps (N, h, w) int64 from a .npy file (a single (h, w) map is accepted too),
    checked to lie in [0, codebook_size)."""
    array = read_npy(path, error=CodeStoreError)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
        raise CodeStoreError(f"{path}: expected integer code maps (N, h, w), got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= codebook_size):
        raise CodeStoreError(f"{path}: codes must lie in [0, {codebook_size}), found "
                             f"[{array.min()}, {array.max()}]")
    return torch.from_numpy(array.astype(np.int64))


def read_maps(path: str | os.PathLike, config: StageOneConfig) -> list[torch.Tensor]:
    """The maps ``save_maps`` wrote for a model of ``config``, top-first, int64, each checked to
    lie in [0, K_m) and to have the shape the model's strides give it beside the bottom map, so
    that maps of another model or mixed-up files are refused by name."""
    path = Path(path)
    code_maps = config.code_maps()
    if len(code_maps) == 1:
        return [_read_map_file(path, code_maps[0].codebook_size)]
    names = [m.name for m in code_maps]
    if not path.is_dir():
        what = "A VQ-VAE-2's" if config.num_levels > 1 else "This model's"
        raise CodeStoreError(f"{path}: {what} codes are a folder of "
                             f"{', '.join(n + '.npy' for n in names)} (written by vqkit encode)")
    maps = [_read_map_file(path / f"{m.name}.npy", m.codebook_size) for m in code_maps]
    scale = code_maps[-1].stride
    h, w = maps[-1].shape[1:]
    try:
        expected = config.map_shapes(h * scale, w * scale)
    except VqkitError:
        raise CodeStoreError(f"{path / (names[-1] + '.npy')}: a {h}x{w} bottom map does not fit the model's "
                             f"strides {config.strides} (top-first)") from None
    for name, codes, shape in zip(names, maps, expected):
        if len(codes) != len(maps[-1]) or tuple(codes.shape[1:]) != tuple(shape):
            raise CodeStoreError(f"{path / (name + '.npy')}: {len(codes)} maps of {tuple(codes.shape[1:])}, "
                                 f"but the bottom map's {len(maps[-1])} maps of {tuple(maps[-1].shape[1:])} "
                                 f"need {len(maps[-1])} maps of {tuple(shape)} here")
    return maps


def _check_replaceable(out: Path, overwrite: bool) -> None:
    check_replaceable(out, overwrite, (KIND, LEVELS_KIND), "a vqkit code set", CodeStoreError)
