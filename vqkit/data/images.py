"""Small image utilities: decode image files to uint8 tensors, tile batches, write PNGs.

All tensors here are uint8 in (C, H, W) layout (batches: (N, C, H, W)), C = 1 (grey) or
3 (RGB). The [-1, 1] float convention the models use lives in ``vqkit.data.datasets``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vqkit.errors import UsageError, VqkitError
from vqkit.fsutil import atomic_path

_MODES = {1: "L", 3: "RGB"}
# The image files vqkit reads: folder datasets, ``vqkit rd``'s image folders, encode's arguments.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def psnr_from_mse(mse: float, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(peak^2 / mse)``; inf when ``mse`` is 0."""
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


class ImageError(VqkitError, ValueError):
    """An image file that cannot be used; the message names the file and the problem.

    ``vqkit.data.datasets`` re-raises it as ``vqkit.data.datasets.DataError`` for files read through a dataset.
    """


@contextlib.contextmanager
def _decode_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn PIL's assorted exceptions for a bad file into one ImageError naming the file."""
    name = os.fspath(path)
    try:
        yield
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: cannot decode image (not an image file)") from e
    # Corrupt data shows up as OSError (truncated file, decoder errors) or, for some broken
    # PNG chunks, SyntaxError.
    except (OSError, SyntaxError) as e:
        raise ImageError(f"{name}: cannot decode image (truncated or corrupt: {e})") from e


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only (cheap; no decoding)."""
    with _decode_errors(path):
        with Image.open(path) as img:
            w, h = img.size
    return h, w


def load_image(path: str | os.PathLike, size: int | None, channels: int = 3) -> torch.Tensor:
    """Decode an image file to a uint8 tensor of shape (channels, H, W); see ``decode_image``."""
    with _decode_errors(path):
        data = Path(path).read_bytes()
    return decode_image(data, size, channels, name=path)


def decode_image(data: bytes, size: int | None, channels: int = 3,
                 name: str | os.PathLike = "<bytes>") -> torch.Tensor:
    """Decode the bytes of an image file to a uint8 tensor of shape (channels, H, W).

    With ``size`` given, the image is centre-cropped to a square of its shorter side and then
    resized (Lanczos) to (channels, size, size). ``channels`` is 1 (grey) or 3 (RGB); other
    modes (palette, RGBA, CMYK, ...) are converted. ``name`` (the file the bytes came from)
    is what an ImageError names.
    """
    if channels not in _MODES:
        raise UsageError(f"channels must be 1 or 3, got {channels}")
    with _decode_errors(name):
        with Image.open(io.BytesIO(data)) as img:
            # Image.open only reads the header; load() decodes, so truncation shows up here.
            img.load()
            img = img.convert(_MODES[channels])

    if size is not None:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != size:
            img = img.resize((size, size), Image.Resampling.LANCZOS)

    # np.array copies, so the tensor owns writable memory (np.asarray of a PIL image is read-only).
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """Tile a uint8 batch (N, C, H, W) into one uint8 image (C, H', W').

    ``nrow`` images per row (fewer if N < nrow), ceil(N / nrow) rows, ``padding`` black pixels
    between and around the tiles: H' = rows * (H + padding) + padding, likewise W'.
    """
    if images.ndim != 4:
        raise UsageError(f"make_grid expects (N, C, H, W), got shape {tuple(images.shape)}")
    if nrow < 1:
        raise UsageError(f"nrow must be >= 1, got {nrow}")
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.zeros(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding), dtype=images.dtype
    )
    for k in range(n):
        r, q = divmod(k, cols)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y : y + h, x : x + w] = images[k]
    return grid


def save_png(images_or_grid: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a uint8 image (C, H, W), C = 1 or 3, as a PNG; the file is replaced atomically.

    A batch (N, C, H, W) is first tiled with ``make_grid`` into a near-square grid.
    """
    t = images_or_grid.detach().cpu()
    if t.dtype != torch.uint8:
        raise UsageError(f"save_png expects uint8 pixels, got {t.dtype} (see data.from_model)")
    if t.ndim == 4:
        t = make_grid(t, nrow=math.ceil(math.sqrt(t.shape[0])))
    if t.ndim != 3 or t.shape[0] not in _MODES:
        raise UsageError(f"save_png expects (1 or 3, H, W), got shape {tuple(t.shape)}")
    # Pillow infers the mode from the array: (H, W) uint8 -> "L", (H, W, 3) uint8 -> "RGB".
    arr = t.permute(1, 2, 0).contiguous().numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """Two uint8 images (C, H, W) next to each other, top-aligned, with a white gap."""
    c = max(left.shape[0], right.shape[0])
    h = max(left.shape[1], right.shape[1])

    def fit(img: torch.Tensor) -> torch.Tensor:
        img = img.expand(c, -1, -1)
        return torch.nn.functional.pad(img, (0, 0, 0, h - img.shape[1]), value=255)

    white = torch.full((c, h, gap), 255, dtype=torch.uint8)
    return torch.cat([fit(left), white, fit(right)], dim=2)
