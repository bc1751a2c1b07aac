"""Behaviour tests for vqkit.data.images: decoding, centre-crop/resize, grids and PNG output."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SHARED

from vqkit.data.images import ImageError, load_image, make_grid, read_image_size, save_png

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _three_band_image(path: Path) -> None:
    """40 wide x 20 high: 10 red columns, 20 green, 10 blue; the centre square is all green."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = RED
    arr[:, 10:30] = GREEN
    arr[:, 30:] = BLUE
    Image.fromarray(arr).save(path)


def _jpeg_bytes() -> bytes:
    """A 128 x 96 JPEG of noise: most of the file is pixel data, after a ~600-byte header."""
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    return buf.getvalue()


def test_load_image_native_size_and_channels(tmp_path):
    path = tmp_path / "bands.png"
    _three_band_image(path)
    rgb = load_image(path, None)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 20, 40)
    assert rgb[:, 0, 0].tolist() == list(RED)
    grey = load_image(path, None, channels=1)
    assert grey.shape == (1, 20, 40)
    assert read_image_size(path) == (20, 40)


def test_load_image_centre_crops_then_resizes(tmp_path):
    path = tmp_path / "bands.png"
    _three_band_image(path)
    for size in (20, 10):
        img = load_image(path, size)
        assert img.shape == (3, size, size)
        # Only the green middle survives the centre crop (Lanczos keeps a flat colour flat).
        assert (img.permute(1, 2, 0).reshape(-1, 3) == torch.tensor(GREEN, dtype=torch.uint8)).all()


def test_grey_file_as_rgb_has_equal_channels(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    img = load_image(path, None, channels=3)
    assert img.shape == (3, 8, 8)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert img[0].flatten().tolist() == list(range(64))


@pytest.mark.skipif(SHARED is None, reason="shared/data not available")
def test_real_photo_crop_resize():
    img = load_image(SHARED / "photos" / "001.png", 64)
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"this is not a JPEG")
    with pytest.raises(ImageError, match=r"photo\.jpg: cannot decode image"):
        load_image(path, None)
    with pytest.raises(ImageError, match=r"photo\.jpg"):
        read_image_size(path)


def test_truncated_jpeg_detected_on_load(tmp_path):
    path = tmp_path / "cut.jpg"
    data = _jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert read_image_size(path) == (96, 128)  # the header is intact ...
    with pytest.raises(ImageError, match=r"cut\.jpg: cannot decode image \(truncated"):
        load_image(path, None)  # ... the pixel data is not


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png", None)
    assert issubclass(ImageError, ValueError)


def test_make_grid_shape_and_placement():
    images = torch.arange(5 * 4 * 6, dtype=torch.int64).reshape(5, 1, 4, 6).to(torch.uint8)
    grid = make_grid(images, nrow=3, padding=2)
    # 2 rows of 3 columns: H' = 2 * (4 + 2) + 2, W' = 3 * (6 + 2) + 2.
    assert grid.shape == (1, 14, 26) and grid.dtype == torch.uint8
    assert torch.equal(grid[:, 2:6, 2:8], images[0])
    assert torch.equal(grid[:, 8:12, 10:16], images[4])  # row 1, column 1
    assert grid[:, 8:12, 18:24].eq(0).all()  # unused slot stays padding
    assert make_grid(images, nrow=10, padding=0).shape == (1, 4, 30)  # at most N columns


@pytest.mark.parametrize("channels,mode", [(3, "RGB"), (1, "L")])
def test_save_png_round_trip(tmp_path, channels, mode):
    img = torch.randint(0, 256, (channels, 7, 9), dtype=torch.uint8)
    path = tmp_path / "out" / "img.png"
    save_png(img, path)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.mode == mode
        arr = np.array(saved)
    assert torch.equal(torch.from_numpy(arr).reshape(7, 9, channels).permute(2, 0, 1), img)
    assert load_image(path, None, channels=channels).equal(img)
    assert [p.name for p in path.parent.iterdir()] == ["img.png"]  # no temporary left behind


def test_save_png_tiles_a_batch_and_rejects_floats(tmp_path):
    batch = torch.full((4, 3, 5, 5), 200, dtype=torch.uint8)
    save_png(batch, tmp_path / "grid.png")
    assert read_image_size(tmp_path / "grid.png") == (2 * 7 + 2, 2 * 7 + 2)
    with pytest.raises(ValueError, match="uint8"):
        save_png(torch.zeros(3, 4, 4), tmp_path / "f.png")
