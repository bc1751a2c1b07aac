"""Datasets named ``KIND:DIR``: MNIST and Fashion-MNIST (``vqkit.data.idx``), CIFAR-10
(``vqkit.data.cifar``), both read whole through ``vqkit.data.files``, and image folders (here),
as sets of uint8 images with labels.

Pixel convention (the one place it is defined): datasets yield **uint8** pixels in (C, H, W)
layout, 0..255. Models see ``to_model(x) = x / 127.5 - 1``, float32 in [-1, 1];
``from_model(y)`` maps model output back to uint8 (``(y + 1) * 127.5``, rounded, clamped to
0..255). ``from_model(to_model(x)) == x`` exactly for every uint8 ``x``.

Every problem with the input (bad spec, missing or truncated file, bad checksum, corrupt
image) raises ``DataError`` with a message that names the file and what is wrong.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vqkit.data.cifar import cifar10_class_names, load_cifar10
from vqkit.data.files import DataError
from vqkit.data.idx import FASHION_MNIST_CLASSES, IDX_NAMES, MNIST_CLASSES, load_idx_pair
from vqkit.data.images import IMAGE_SUFFIXES, ImageError, load_image, read_image_size
from vqkit.data.loader import iter_batches, usable_cpus

log = logging.getLogger(__name__)


def to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]."""
    return x.to(torch.float32) / 127.5 - 1.0


def from_model(y: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1] (any shape, any float dtype) -> uint8 pixels, rounded and clamped."""
    return ((y.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)




# spec prefix -> canonical kind
_KINDS = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashion": "fashion-mnist",
    "cifar10": "cifar10",
    "folder": "folder",
    "prepared": "prepared",
}
_SPEC_HELP = (
    "expected KIND:DIR with KIND one of mnist, fashion-mnist (or fashion), cifar10, folder, "
    "prepared (a set made by `vqkit prepare`), e.g. 'fashion-mnist:data/fashion' or 'folder:photos/'"
)


# --------------------------------------------------------------------------------------------
# Datasets


class ImageSet(torch.utils.data.Dataset, ABC):
    """A labelled image dataset: item i is (uint8 tensor (C, H, W), int label).

    Attributes: ``spec`` (the spec it was loaded from), ``channels``, ``height``, ``width``
    (every item has this shape), ``num_classes`` and ``class_names`` (None for unlabelled
    folders, where every label is 0), ``skipped`` (unreadable files dropped by
    ``skip_bad=True``).

    Class attributes: ``lazy``, whether items are read from disk when asked for (not held in
    memory); ``decodes``, whether reading an item decodes an image file (the sets that
    ``vqkit.data.loader`` reads with worker processes by default).
    """

    lazy = True
    decodes = False

    def __init__(
        self,
        spec: str,
        channels: int,
        height: int,
        width: int,
        class_names: list[str] | None,
        skipped: int = 0,
    ):
        self.spec = spec
        self.channels = channels
        self.height = height
        self.width = width
        self.class_names = class_names
        self.num_classes = None if class_names is None else len(class_names)
        self.skipped = skipped

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]: ...

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items at ``indices`` (1-D int tensor of length N): uint8 (N, C, H, W), int64 (N,)."""
        items = [self[i] for i in indices.tolist()]
        images = torch.stack([x for x, _ in items])
        labels = torch.tensor([y for _, y in items], dtype=torch.int64)
        return images, labels

    def __repr__(self) -> str:
        classes = "unlabelled" if self.num_classes is None else f"{self.num_classes} classes"
        return (
            f"{type(self).__name__}({self.spec!r}, {len(self)} images of "
            f"{self.channels}x{self.height}x{self.width}, {classes})"
        )


class TensorImageSet(ImageSet):
    """An in-memory dataset: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    lazy = False

    def __init__(
        self, spec: str, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]
    ):
        _, c, h, w = images.shape
        super().__init__(spec, c, h, w, class_names)
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select, not images[indices]: 8x the images/s on uint8 (64 of 128x128, 1 thread).
        indices = indices.to(torch.int64)
        return self.images.index_select(0, indices), self.labels.index_select(0, indices)


# Images per task of a worker decoding a set into memory: enough to amortise sending them.
_LOAD_BATCH = 64


def in_memory(dataset: ImageSet, max_bytes: int, workers: int | None = None,
              progress: bool = False) -> ImageSet:
    """``dataset`` decoded once into memory, by ``workers`` processes (``vqkit.data.loader``;
    None: one per usable CPU, as nothing else runs meanwhile), if it decodes files per item and
    its pixels fit in ``max_bytes``.

    Training reads every image many times; a folder set would decode (and resize) each file
    on every read. Other sets are returned unchanged: in-memory ones, those too large, and
    prepared sets, which are read in place at memory speed without holding them.
    """
    n = len(dataset)
    if not dataset.decodes or n * dataset.channels * dataset.height * dataset.width > max_bytes:
        return dataset
    images = torch.empty(n, dataset.channels, dataset.height, dataset.width, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    with tqdm(total=n, desc="load", unit="img", disable=not progress, leave=False) as bar:
        for start, x, y in iter_batches(dataset, _LOAD_BATCH, workers=usable_cpus() if workers is None else workers):
            images[start:start + len(x)], labels[start:start + len(x)] = x, y
            bar.update(len(x))
    cached = TensorImageSet(dataset.spec, images, labels, dataset.class_names)
    cached.skipped = dataset.skipped
    return cached


class FolderImageSet(ImageSet):
    """Image files decoded lazily, one per item, as RGB (3, H, W).

    With ``image_size`` set, each image is centre-cropped and resized to image_size x
    image_size; otherwise all files have the same size (checked by ``load_dataset``).
    """

    decodes = True

    def __init__(
        self,
        spec: str,
        files: list[Path],
        labels: list[int],
        class_names: list[str] | None,
        height: int,
        width: int,
        image_size: int | None,
        skipped: int = 0,
    ):
        super().__init__(spec, 3, height, width, class_names, skipped)
        self.files = files
        self.labels = labels
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return load_image(self.files[i], self.image_size, channels=3), self.labels[i]
        except ImageError as e:
            raise DataError(str(e)) from e


# --------------------------------------------------------------------------------------------
# Entry point


def load_dataset(
    spec: str, split: str = "train", image_size: int | None = None, skip_bad: bool = False
) -> ImageSet:
    """Open the dataset named by ``spec`` (``mnist:DIR``, ``fashion-mnist:DIR`` (alias
    ``fashion:DIR``), ``cifar10:DIR``, ``folder:DIR`` or ``prepared:DIR``).

    ``split`` is "train" or "test" (folders and prepared sets also accept "all"). A prepared
    set (``vqkit.data.prepared``) is read in place, never loaded; its images already have their
    size, so ``image_size`` must be None or that size. ``image_size`` resizes every
    image to image_size x image_size: folders centre-crop then resize each file (required when
    their files differ in size); MNIST/CIFAR images (square) are resized in memory, bilinear
    with antialiasing. ``skip_bad`` applies to folders only: every file is decoded once up
    front and unreadable ones are dropped (counted in ``skipped``, logged as a warning); with
    ``skip_bad=False`` a corrupt file raises DataError when its item is read.
    MNIST/CIFAR files are read and fully validated (sizes, magic numbers, labels, checksums of
    official files) here.
    """
    kind, root = _parse_spec(spec)
    if kind == "prepared":
        return _load_prepared(root, split, image_size)
    splits = ("train", "test", "all") if kind == "folder" else ("train", "test")
    if split not in splits:
        raise DataError(f"{spec}: unknown split {split!r}; {kind} has splits {', '.join(splits)}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {image_size}")

    if kind == "folder":
        return _load_folder(spec, root, split, image_size, skip_bad)
    if kind == "cifar10":
        images, labels = load_cifar10(root, split)
        class_names = cifar10_class_names(root)
    else:
        images, labels = load_idx_pair(root, split)
        class_names = MNIST_CLASSES if kind == "mnist" else FASHION_MNIST_CLASSES
    if image_size is not None and image_size != images.shape[-1]:
        images = _resize(images, image_size)
    return TensorImageSet(spec, images, labels, class_names)


def _parse_spec(spec: str) -> tuple[str, Path]:
    kind, colon, path = spec.partition(":")
    if not colon:
        raise DataError(f"bad dataset spec {spec!r} (no 'KIND:' prefix): {_SPEC_HELP}")
    if kind.lower() not in _KINDS:
        raise DataError(f"bad dataset spec {spec!r}: unknown kind {kind!r}; {_SPEC_HELP}")
    if not path:
        raise DataError(f"bad dataset spec {spec!r}: no directory after the colon; {_SPEC_HELP}")
    root = Path(path).expanduser()
    # A missing prepared set gets its own message (an unfinished prepare may be resumable).
    if not root.is_dir() and _KINDS[kind.lower()] != "prepared":
        raise DataError(f"{spec}: {root} is not an existing directory")
    return _KINDS[kind.lower()], root


def _load_prepared(root: Path, split: str, image_size: int | None) -> ImageSet:
    # Imported here: the prepared module builds on this one (ImageSet, load_dataset).
    from vqkit.data.prepared import PreparedImageSet

    dataset = PreparedImageSet(root, split)
    if image_size is not None and (dataset.height, dataset.width) != (image_size, image_size):
        raise DataError(f"{dataset.spec}: prepared at {dataset.width}x{dataset.height}, not at the "
                        f"{image_size}x{image_size} asked for; prepare it again with --image-size {image_size}")
    return dataset


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear with antialiasing."""
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    chunk = 4096  # bounds the float32 temporaries (CIFAR at 256 px would otherwise need ~40 GB)
    for s in range(0, images.shape[0], chunk):
        x = images[s : s + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out[s : s + chunk] = y.round().clamp(0, 255).to(torch.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Image folders


def _is_image(path: Path) -> bool:
    # Names starting with "." are skipped: macOS "._x.jpg" resource forks are not images.
    return (
        path.suffix.lower() in IMAGE_SUFFIXES
        and not path.name.startswith(".")
        and path.is_file()
    )


def _image_files(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively), sorted."""
    return sorted(p for p in root.rglob("*") if _is_image(p))


def _class_names(roots: list[Path]) -> list[str] | None:
    """Sorted names of the direct subfolders (of any of ``roots``) that contain images, or None."""
    names = {
        d.name
        for root in roots
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and any(_is_image(p) for p in d.rglob("*"))
    }
    return sorted(names) or None


def _labelled_files(root: Path, class_names: list[str] | None) -> list[tuple[Path, int]]:
    if class_names is None:
        return [(p, 0) for p in _image_files(root)]
    loose = [p for p in root.iterdir() if _is_image(p)]
    if loose:
        log.warning("%s: ignoring %d image(s) outside the class subfolders", root, len(loose))
    return [
        (p, label)
        for label, name in enumerate(class_names)
        if (root / name).is_dir()
        for p in _image_files(root / name)
    ]


def _load_folder(
    spec: str, root: Path, split: str, image_size: int | None, skip_bad: bool
) -> FolderImageSet:
    if (root / "train").is_dir() and (root / "test").is_dir():
        split_roots = {"train": [root / "train"], "test": [root / "test"]}
        split_roots["all"] = split_roots["train"] + split_roots["test"]
        # Classes from both splits, so that a label means the same class in either.
        class_names = _class_names(split_roots["all"])
        files = [f for r in split_roots[split] for f in _labelled_files(r, class_names)]
    else:
        class_names = _class_names([root])
        files = _labelled_files(root, class_names)
        if split == "test":
            files = files[::10]
        elif split == "train":
            files = [f for i, f in enumerate(files) if i % 10]
    if not files:
        raise DataError(f"{root}: no image files ({' '.join(IMAGE_SUFFIXES)}) for split {split!r}")

    # Sizes are needed when no image_size is given (all must agree); skip_bad must decode every
    # file, because a truncated JPEG has a readable header and only fails when decoded.
    sizes: set[tuple[int, int]] = set()
    bad: list[Path] = []
    if skip_bad or image_size is None:
        good = []
        for path, label in files:
            try:
                if skip_bad:
                    hw = tuple(load_image(path, None, channels=3).shape[1:])
                else:
                    hw = read_image_size(path)
            except ImageError as e:
                if not skip_bad:
                    raise DataError(str(e)) from e
                bad.append(path)
                continue
            good.append((path, label))
            sizes.add(hw)
        files = good
    if bad:
        log.warning("%s: skipped %d unreadable image file(s), e.g. %s", root, len(bad), bad[0])
    if not files:
        raise DataError(f"{root}: none of the {len(bad)} image files could be decoded")

    if image_size is not None:
        height = width = image_size
    elif len(sizes) > 1:
        examples = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:4])
        raise DataError(
            f"{root}: images have different sizes ({examples}, ...); pass --image-size N "
            "(image_size=N) to centre-crop and resize them all to N x N"
        )
    else:
        height, width = sizes.pop()
    paths = [p for p, _ in files]
    labels = [label for _, label in files]
    return FolderImageSet(spec, paths, labels, class_names, height, width, image_size, len(bad))


# --------------------------------------------------------------------------------------------
# Finding Fashion-MNIST for the demo

_IDX_FILE_NAMES = [name for pair in IDX_NAMES.values() for name in pair]
# Where Debian's dataset-fashion-mnist package and common system layouts put the files.
_SYSTEM_FASHION_DIRS = (
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/dataset-fashion-mnist/data/fashion",
    "/usr/share/datasets/fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/local/share/fashion-mnist",
)


def sample_dir() -> Path:
    """Folder of the embedded Fashion-MNIST sample (1,500 train + 500 test images, IDX .gz)."""
    return Path(__file__).parent.parent / "sample_data" / "fashion-mnist"


def _has_idx_files(d: Path) -> bool:
    return all((d / f"{n}.gz").is_file() or (d / n).is_file() for n in _IDX_FILE_NAMES)


def find_fashion_mnist(explicit: str | None = None) -> tuple[str, str]:
    """Locate Fashion-MNIST for the demo; returns (spec, human-readable description).

    Tries, in order: ``explicit`` (a directory, or any dataset spec), the ``VQKIT_DATA``
    environment variable (a directory holding the IDX files, or its ``fashion-mnist/``
    subfolder), ``shared/data/fashion-mnist`` in the current directory or any parent, the
    Debian package ``dataset-fashion-mnist`` and similar system folders, and finally the small
    sample embedded in vqkit. Only ``explicit`` is an error if wrong; a ``VQKIT_DATA`` without
    the files is logged and passed over.
    """
    if explicit:
        d = Path(explicit).expanduser()
        if d.is_dir():
            for cand in (d, d / "fashion-mnist"):
                if _has_idx_files(cand):
                    return f"fashion-mnist:{cand}", f"Fashion-MNIST from {cand}"
            names = ", ".join(_IDX_FILE_NAMES)
            raise DataError(f"{d}: no Fashion-MNIST IDX files ({names}, .gz or raw)")
        _parse_spec(explicit)  # raises DataError explaining what is wrong with it
        return explicit, explicit

    env = os.environ.get("VQKIT_DATA")
    if env:
        for cand in (Path(env), Path(env) / "fashion-mnist"):
            if _has_idx_files(cand):
                return f"fashion-mnist:{cand}", f"Fashion-MNIST from {cand} (VQKIT_DATA)"
        log.warning("VQKIT_DATA=%s holds no Fashion-MNIST IDX files; looking elsewhere", env)

    cwd = Path.cwd()
    for parent in (cwd, *cwd.parents):
        cand = parent / "shared" / "data" / "fashion-mnist"
        if _has_idx_files(cand):
            return f"fashion-mnist:{cand}", f"Fashion-MNIST from {cand}"

    for cand in map(Path, _SYSTEM_FASHION_DIRS):
        if _has_idx_files(cand):
            return f"fashion-mnist:{cand}", f"Fashion-MNIST from {cand} (system package)"

    return (
        f"fashion-mnist:{sample_dir()}",
        "the Fashion-MNIST sample embedded in vqkit: 2,000 images (1,500 train, 500 test), "
        "enough for a quick demo only; for the full 70,000-image set pass --data DIR or set "
        "VQKIT_DATA=DIR (a folder holding the four Fashion-MNIST *-ubyte.gz files)",
    )
