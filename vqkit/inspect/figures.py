"""The pictures of an inspection (``vqkit.inspect.stats``): codebook atlases as Pillow images,
usage, code-map and codebook-PCA plots as matplotlib figures.

Figures are ``matplotlib.figure.Figure`` objects drawn without pyplot, so importing this module
(or anything that uses it) never switches the process's matplotlib backend; ``figure_png``
renders one to PNG bytes with the Agg canvas.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from vqkit.inspect.stats import Inspection, LevelInspection, pca


def rgb_image(tile: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W), C = 1 or 3 -> an RGB Pillow image."""
    arr = tile.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).convert("RGB")


def _tile(tile: torch.Tensor, side: int) -> Image.Image:
    img = rgb_image(tile)
    resample = Image.Resampling.NEAREST if img.width <= side else Image.Resampling.LANCZOS
    return img.resize((side, side), resample)


def atlas_image(level: LevelInspection, columns: int = 4, max_codes: int | None = None) -> Image.Image:
    """The codebook atlas of one level: one cell per code, by decreasing use (dead codes
    last), each cell labelled ``#code  count`` and showing what a map filled with the code
    decodes to, a gap, then the code's exemplar crops, nearest first, with the code's
    footprint outlined in orange."""
    order = level.order[:max_codes] if max_codes else level.order
    per_code = level.exemplars.shape[1]
    side = level.crop * max(1, round(36 / level.crop))
    pad, label = 2, 13
    cell_w = (per_code + 1) * (side + pad) + 6
    cell_h = label + side + 6
    # The code's footprint inside each crop (see the module docstring), outlined.
    scale = side / level.crop
    margin = (level.crop - level.stride) // 2
    box = (round(margin * scale), round((margin + level.stride) * scale) - 1)
    cols = max(1, min(columns, len(order)))
    rows = math.ceil(len(order) / cols)
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for n, code in enumerate(order.tolist()):
        r, q = divmod(n, cols)
        x0, y0 = pad + q * cell_w, pad + r * cell_h
        count = int(level.counts[code])
        draw.text((x0, y0), f"#{code}  {count}" if count else f"#{code}  unused", fill="black" if count else
                  (170, 0, 0), font=font)
        y = y0 + label
        canvas.paste(_tile(level.decoded[code], side), (x0, y))
        for slot in range(per_code):
            if math.isfinite(float(level.exemplar_dist[code, slot])):
                x = x0 + 6 + (slot + 1) * (side + pad)
                canvas.paste(_tile(level.exemplars[code, slot], side), (x, y))
                draw.rectangle((x + box[0], y + box[0], x + box[1], y + box[1]), outline=(255, 90, 0))
    return canvas


def usage_figure(inspection: Inspection) -> Figure:
    """Per level: code frequencies sorted in decreasing order (log scale; line 0 of each axes
    holds the sorted counts, dead codes included as zeros) and the cumulative share of
    positions they cover (twin axes), titled with used, dead and perplexity."""
    levels = inspection.levels
    fig = Figure(figsize=(7, 3.2 * len(levels)))
    axes = fig.subplots(len(levels), 1, squeeze=False)
    for ax, lv in zip(axes[:, 0], levels):
        sorted_counts = lv.counts.sort(descending=True).values.numpy()
        rank = np.arange(1, len(sorted_counts) + 1)
        ax.plot(rank, sorted_counts, color="tab:blue", drawstyle="steps-mid")
        ax.set_yscale("log")
        ax.set_xlabel("code rank (most used first)")
        ax.set_ylabel("positions", color="tab:blue")
        if lv.dead:
            ax.axvspan(lv.used + 0.5, len(sorted_counts) + 0.5, color="tab:red", alpha=0.12, label="dead codes")
            ax.legend(loc="lower left")
        share = ax.twinx()
        share.plot(rank, np.cumsum(sorted_counts) / max(1, sorted_counts.sum()), color="tab:orange")
        share.set_ylim(0, 1.02)
        share.set_ylabel("cumulative share", color="tab:orange")
        ax.set_title(f"{lv.name}: {lv.used}/{lv.codebook_size} codes used, {lv.dead} dead, "
                     f"perplexity {lv.perplexity:.1f}", fontsize=10)
    fig.suptitle(f"code usage over {inspection.num_images} images of {inspection.data} ({inspection.split})",
                 fontsize=10)
    # Fixed margins: tight_layout measures every text and costs seconds per figure.
    fig.subplots_adjust(left=0.12, right=0.88, bottom=0.6 / (3.2 * len(levels)), top=1 - 0.55 / (3.2 * len(levels)),
                        hspace=0.55)
    return fig


def palette(codebook_size: int) -> ListedColormap:
    """A fixed false-colour palette: neighbouring code indices get unrelated colours, and a
    code keeps its colour across images and runs."""
    rng = np.random.default_rng(12345)
    return ListedColormap(0.15 + 0.85 * rng.random((codebook_size, 3)))


def code_map_figure(inspection: Inspection) -> Figure:
    """Each of the first images beside its code map in false colour, one panel per level
    (codes written in the cells when the map is at most 8x8)."""
    levels = inspection.levels
    n = len(inspection.images)
    # Two images per row when there are several: the figure stays readable on a wide screen.
    blocks = 2 if n > 3 else 1
    rows, width = math.ceil(n / blocks), 1 + len(levels)
    fig = Figure(figsize=(1.9 * blocks * width, 1.9 * rows))
    grid = fig.subplots(rows, blocks * width, squeeze=False)
    axes = np.array([grid[index // blocks, (index % blocks) * width:(index % blocks + 1) * width]
                     for index in range(rows * blocks)])
    for ax in axes[n:].flat:
        ax.axis("off")
    for row in range(n):
        image = inspection.images[row].permute(1, 2, 0).numpy()
        axes[row, 0].imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=255)
        for col, lv in enumerate(levels, 1):
            code_map = lv.maps[row].numpy()
            ax = axes[row, col]
            ax.imshow(code_map, cmap=palette(lv.codebook_size), vmin=-0.5, vmax=lv.codebook_size - 0.5,
                      interpolation="nearest")
            if code_map.size <= 64:
                colours = palette(lv.codebook_size).colors
                for (i, j), code in np.ndenumerate(code_map):
                    dark = float(np.dot(colours[code], (0.299, 0.587, 0.114))) < 0.5
                    ax.text(j, i, str(code), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
            if row < blocks:
                ax.set_title(f"{lv.name} {code_map.shape[0]}x{code_map.shape[1]}", fontsize=9)
        if row < blocks:
            axes[row, 0].set_title("image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02 / rows, top=1 - 0.3 / (1.9 * rows), wspace=0.08,
                        hspace=0.08)
    return fig


def pca_figure(inspection: Inspection) -> Figure:
    """Per level: the codebook's 2-D PCA projection, used codes coloured by log10 of their
    count, dead codes as red crosses."""
    levels = inspection.levels
    fig = Figure(figsize=(4.6 * len(levels), 4.2))
    axes = fig.subplots(1, len(levels), squeeze=False)
    for ax, lv in zip(axes[0], levels):
        proj = pca(lv.codebook)
        used = (lv.counts > 0).numpy()
        points = ax.scatter(proj.points[used, 0], proj.points[used, 1], s=10,
                            c=np.log10(lv.counts.numpy()[used]), cmap="viridis")
        if (~used).any():
            ax.scatter(proj.points[~used, 0], proj.points[~used, 1], s=14, marker="x", color="tab:red",
                       label=f"dead ({lv.dead})")
            ax.legend(loc="best", fontsize=8)
        fig.colorbar(points, ax=ax, label="log10 count")
        ax.set_title(f"{lv.name}: codebook PCA", fontsize=10)
        ax.set_xlabel(f"PC1 ({100 * proj.explained[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * proj.explained[1]:.0f}%)")
    width = 4.6 * len(levels)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.3 / width, bottom=0.13, top=0.92, wspace=0.5)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (rendered by the Agg canvas)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def image_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
