"""VQ-VAE-2's Figure 3 from any run: each image decoded from the top level alone, then adding
each lower level, then the original, with every view's PSNR.

A prefix is decoded by ``VQVAE.decode_levels``: as a model trained with ``prefix_training``
learned to (its reconstruction from those levels), else with zeros for the missing maps (a view
the decoder never saw in training). The "levels" are the model's code maps:
a residual level's stages are added one by one, as levels are. Drawn with Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from vqkit.data.datasets import from_model, to_model
from vqkit.inspect.figures import rgb_image
from vqkit.nn.vqvae import VQVAE


@dataclass
class LevelsView:
    """``views[p]`` (N, C, H, W) uint8: the images decoded from the top ``p + 1`` levels;
    ``psnr[p]`` (N,) their PSNR in dB against ``images``; ``names`` the levels, top-first."""

    names: list[str]
    images: torch.Tensor
    views: list[torch.Tensor]
    psnr: list[torch.Tensor]

    def column_titles(self) -> list[str]:
        if len(self.names) == 1:
            return ["reconstruction", "original"]
        return [f"{self.names[0]} alone", *(f"+ {name}" for name in self.names[1:]), "original"]


@torch.no_grad()
def levels_view(model: VQVAE, images: torch.Tensor, batch_size: int = 64) -> LevelsView:
    """uint8 images (N, C, H, W) -> every prefix's decoding of them (``LevelsView``)."""
    was_training = model.training
    model.eval()
    device = model.device
    try:
        views: list[list[torch.Tensor]] = [[] for _ in range(model.num_maps)]
        for start in range(0, len(images), batch_size):
            x = to_model(images[start:start + batch_size]).to(device)
            codes = model.encode(x)
            for upto in range(1, model.num_maps + 1):
                views[upto - 1].append(from_model(model.decode_levels(codes, upto).cpu()))
    finally:
        model.train(was_training)
    stacked = [torch.cat(v) for v in views]
    psnr = [_psnr(images, v) for v in stacked]
    return LevelsView([m.name for m in model.config.code_maps()], images, stacked, psnr)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a.double() - b.double()).square().flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(255.0 ** 2 / mse)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)  # Pillow 10.1 and later, with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def levels_image(view: LevelsView, side: int = 128) -> Image.Image:
    """The figure: one row per image, one column per prefix then the original, each cell
    ``side`` pixels wide (nearest-neighbour upscaled), its PSNR below it and the column titles
    above."""
    font = _font()
    pad, title_h, caption_h = 4, 16, 14
    columns = [*view.views, view.images]
    n = len(view.images)
    h = round(side * view.images.shape[2] / view.images.shape[3])
    width = pad + len(columns) * (side + pad)
    height = title_h + n * (h + caption_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(view.column_titles()):
        draw.text((pad + col * (side + pad), 2), title, fill="black", font=font)
    for row in range(n):
        y = title_h + row * (h + caption_h + pad)
        for col, images in enumerate(columns):
            x = pad + col * (side + pad)
            cell = rgb_image(images[row])
            resample = Image.Resampling.NEAREST if cell.width <= side else Image.Resampling.LANCZOS
            canvas.paste(cell.resize((side, h), resample), (x, y))
            if col < len(view.views):
                draw.text((x, y + h + 1), f"{float(view.psnr[col][row]):.2f} dB", fill="black", font=font)
    return canvas
