"""Seeing inside a stage-1 model: what each code means, how codes are used, how images map to codes.

The discrete latents of VQ-VAE (van den Oord et al. 2017) and VQ-VAE-2 (Razavi et al. 2019)
are words a person can look at. One streaming pass over a dataset (``inspect_model``) gathers,
for every level (top-first, as in ``vqkit.nn.vqvae2``):

* ``counts`` (K,): how often each code is the nearest one (eq. 1) over the whole dataset; it
  is the bincount of the maps ``VQVAE.encode``/``VQVAE2.encode`` return, and gives the used and
  dead codes and the perplexity ``exp(H(p))`` of ``vqkit.nn.quantize.perplexity``;
* ``exemplars`` (K, M, C, P, P): for each code, the M image patches whose ``z_e`` lie nearest
  to the code vector (smallest ``||z_e - e_k||^2``, the most typical uses of the code), a
  bounded top-M kept per code while the data streams by;
* the code maps of the first few images.

Memory is O(K M C P^2 + batch), independent of the dataset's size.

Receptive-field crops: a code at (i, j) of a map ``s`` times smaller than the image (stride
``s``) is computed from strided convolutions centred on its footprint, the image block
``[i s, (i + 1) s) x [j s, (j + 1) s)``; the 4x4 convolutions and 3x3 residual blocks reach
past it, so each crop is that footprint with ``s`` pixels of context on each side
(``P = 3 s``), padded with mid-grey where it leaves the image. This is the region the code
mostly describes; the exact receptive field is larger but weighted towards its centre.

What a code decodes to: the decoder applied to a map filled with that code (for VQ-VAE-2:
that level filled with the code, every other level filled with its own most-used code, a
neutral context), which shows the texture or stroke the code stands for.

The figures (``atlas_image``, ``usage_figure``, ``code_map_figure``, ``pca_figure``) are
Pillow images or matplotlib figures (Agg backend); ``inspect_run`` writes them as PNGs with
``inspect.json``, the figures' numbers.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vqkit.runs import checkpoint as ckpt  # noqa: E402
from vqkit.data.datasets import ImageSet, from_model, load_dataset, to_model  # noqa: E402
from vqkit.fsutil import atomic_path, atomic_write_text  # noqa: E402
from vqkit.nn.vqvae2 import VQVAE2, level_names  # noqa: E402
from vqkit.nn.vqvae import VQVAE  # noqa: E402
from vqkit.nn.quantize import perplexity  # noqa: E402

# Grey that pads crops where they leave the image: visibly "outside", not a pixel value.
_PAD = 128


@dataclass
class LevelInspection:
    """One level's figures. ``stride``: image pixels per code along a side; ``crop``: side of
    the exemplar crops (3 * stride, see the module docstring); ``counts`` (K,) int64;
    ``exemplars`` (K, M, C, crop, crop) uint8 and ``exemplar_dist`` (K, M) float32, nearest
    first, ``inf`` where a code had fewer than M uses; ``codebook`` (K, D) float32;
    ``decoded`` (K, C, H, W) uint8, the image decoded from a map filled with each code;
    ``maps`` (n, h, w) int64, the code maps of the first n images."""

    name: str
    stride: int
    crop: int
    counts: torch.Tensor
    exemplars: torch.Tensor
    exemplar_dist: torch.Tensor
    codebook: torch.Tensor
    decoded: torch.Tensor
    maps: torch.Tensor

    @property
    def codebook_size(self) -> int:
        return len(self.counts)

    @property
    def used(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def dead(self) -> int:
        return self.codebook_size - self.used

    @property
    def perplexity(self) -> float:
        return float(perplexity(self.counts))

    @property
    def order(self) -> torch.Tensor:
        """Codes by decreasing use; ties by code index."""
        return torch.from_numpy(np.lexsort((np.arange(self.codebook_size), -self.counts.numpy())))

    def summary(self) -> dict:
        total = int(self.counts.sum())
        return {"name": self.name, "codebook_size": self.codebook_size,
                "map_shape": list(self.maps.shape[1:]), "stride": self.stride, "crop": self.crop,
                "positions": total, "used": self.used, "dead": self.dead,
                "perplexity": self.perplexity, "most_used": self.order[:10].tolist(),
                "counts": self.counts.tolist()}


@dataclass
class Inspection:
    """What ``inspect_model`` saw: ``images`` (n, C, H, W) uint8 are the first n images, whose
    code maps each level keeps; ``levels`` are top-first."""

    data: str
    split: str
    num_images: int
    images: torch.Tensor
    levels: list[LevelInspection]
    step: int | None = None
    fingerprint: str | None = None

    def summary(self) -> dict:
        return {"data": self.data, "split": self.split, "images": self.num_images, "step": self.step,
                "fingerprint": self.fingerprint, "levels": [lv.summary() for lv in self.levels]}


class ExemplarBank:
    """The M positions nearest to each code seen so far, with their image crops.

    ``update`` merges one batch: the batch's candidates are ranked within each code by
    distance (a sort by distance, then a stable sort by code), the first M of each code are
    cropped and merged with the bank by a top-M over 2M. Memory stays K x M crops.
    """

    def __init__(self, codebook_size: int, per_code: int, channels: int, crop: int):
        self.per_code = per_code
        self.dist = torch.full((codebook_size, per_code), math.inf)
        self.crops = torch.full((codebook_size, per_code, channels, crop, crop), _PAD, dtype=torch.uint8)

    def update(self, codes: torch.Tensor, dist: torch.Tensor, images: torch.Tensor, stride: int) -> None:
        """``codes`` and ``dist`` (B, h, w) for ``images`` (B, C, H, W) uint8."""
        k, m = self.dist.shape
        b, h, w = codes.shape
        flat_codes, flat_dist = codes.flatten(), dist.flatten().float()
        by_dist = flat_dist.argsort(stable=True)
        order = by_dist[flat_codes[by_dist].argsort(stable=True)]
        sorted_codes = flat_codes[order]
        rank = torch.arange(len(order)) - torch.searchsorted(sorted_codes, sorted_codes)
        keep = rank < m
        chosen, slot, code = order[keep], rank[keep], sorted_codes[keep]
        cand_dist = torch.full((k, m), math.inf)
        cand_dist[code, slot] = flat_dist[chosen]
        cand_crops = torch.full_like(self.crops, _PAD)
        cand_crops[code, slot] = crops_at(images, chosen // (h * w), (chosen // w) % h, chosen % w,
                                          stride, self.crops.shape[-1])
        merged = torch.cat([self.dist, cand_dist], 1)
        best = merged.topk(m, dim=1, largest=False, sorted=True).indices
        self.dist = merged.gather(1, best)
        pool = torch.cat([self.crops, cand_crops], 1)
        self.crops = pool[torch.arange(k)[:, None], best]


def crops_at(images: torch.Tensor, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor, stride: int,
             size: int) -> torch.Tensor:
    """Crops (n, C, size, size) of ``images`` (B, C, H, W) centred on the footprints of codes
    at (i, j) of image b (see the module docstring), padded with grey outside the image."""
    margin = (size - stride) // 2
    padded = torch.nn.functional.pad(images, (margin, size, margin, size), value=_PAD)
    offsets = torch.arange(size)
    rows = (i * stride)[:, None] + offsets  # padded coordinates: + margin - margin
    cols = (j * stride)[:, None] + offsets
    crops = padded[b[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, size, size, C)
    return crops.permute(0, 3, 1, 2)


def _z_e_levels(model: VQVAE | VQVAE2, x: torch.Tensor) -> list[torch.Tensor]:
    """Pre-quantization z_e of every level, top-first, as the model's own encode computes it."""
    if isinstance(model, VQVAE2):
        return model.encode_levels(x)
    return [model.encoder(x)]


def _quantizers(model: VQVAE | VQVAE2) -> list:
    return list(model.quantizers) if isinstance(model, VQVAE2) else [model.quantizer]


@torch.no_grad()
def inspect_model(model: VQVAE | VQVAE2, dataset: ImageSet, *, batch_size: int = 256,
                  limit: int | None = None, exemplars: int = 6, maps: int = 8, progress: bool = False,
                  split: str = "", checkpoint: ckpt.Checkpoint | None = None) -> Inspection:
    """One streaming pass of ``model`` over ``dataset`` (the first ``limit`` images): code
    counts, the ``exemplars`` nearest crops per code, and the code maps of the first ``maps``
    images, for every level; then each code decoded from a filled map."""
    if exemplars < 1 or maps < 1 or batch_size < 1:
        raise ValueError("exemplars, maps and batch_size must be >= 1")
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f"{dataset.spec}: no images to inspect")
    device = next(model.parameters()).device
    quantizers = _quantizers(model)
    sizes = model.config.codebook_sizes
    shapes = model.config.latent_shapes(dataset.height, dataset.width)
    strides = [dataset.height // h for h, _ in shapes]
    crops = [3 * s for s in strides]
    counts = [torch.zeros(k, dtype=torch.long) for k in sizes]
    banks = [ExemplarBank(k, exemplars, dataset.channels, c) for k, c in zip(sizes, crops)]
    first_maps: list[list[torch.Tensor]] = [[] for _ in sizes]
    first_images = dataset.batch(torch.arange(min(maps, n)))[0]
    try:
        for start in tqdm(range(0, n, batch_size), desc="inspect", disable=not progress, leave=False):
            images, _ = dataset.batch(torch.arange(start, min(start + batch_size, n)))
            for level, (quantizer, z_e) in enumerate(zip(quantizers, _z_e_levels(model, to_model(images).to(device)))):
                codes = quantizer.encode(z_e)
                # Distance to the chosen code vector: how typical this use of the code is.
                dist = (z_e.float() - quantizer.lookup(codes)).square().sum(1).cpu()
                codes = codes.cpu()
                counts[level] += torch.bincount(codes.flatten(), minlength=sizes[level])
                banks[level].update(codes, dist, images, strides[level])
                if start < maps:
                    first_maps[level].append(codes[:maps - start])
        decoded = _decode_filled(model, shapes, counts, device, batch_size)
    finally:
        model.train(was_training)
    levels = [LevelInspection(name=name, stride=s, crop=c, counts=cnt, exemplars=bank.crops,
                              exemplar_dist=bank.dist, codebook=q.codebook.detach().float().cpu().clone(),
                              decoded=dec, maps=torch.cat(fm))
              for name, s, c, cnt, bank, q, dec, fm in zip(level_names(len(sizes)), strides, crops, counts,
                                                           banks, quantizers, decoded, first_maps)]
    return Inspection(data=dataset.spec, split=split, num_images=n, images=first_images, levels=levels,
                      step=checkpoint.step if checkpoint else None,
                      fingerprint=checkpoint.state.get("fingerprint") if checkpoint else None)


@torch.no_grad()
def _decode_filled(model: VQVAE | VQVAE2, shapes: list[tuple[int, int]], counts: list[torch.Tensor],
                   device, batch_size: int) -> list[torch.Tensor]:
    """Per level (K, C, H, W) uint8: the image of a map filled with each code, the other levels
    filled with their most-used code."""
    neutral = [int(c.argmax()) for c in counts]
    out = []
    for level, ((h, w), cnt) in enumerate(zip(shapes, counts)):
        k = len(cnt)
        images = []
        for start in range(0, k, batch_size):
            ids = torch.arange(start, min(start + batch_size, k), device=device)
            maps = [torch.full((len(ids), hh, ww), neutral[other], device=device)
                    for other, (hh, ww) in enumerate(shapes)]
            maps[level] = ids[:, None, None].expand(-1, h, w).contiguous()
            x = model.decode(maps) if isinstance(model, VQVAE2) else model.decode(maps[0])
            images.append(from_model(x).cpu())
        out.append(torch.cat(images))
    return out


# ---------------------------------------------------------------------------------------------
# Figures


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


def usage_figure(inspection: Inspection) -> plt.Figure:
    """Per level: code frequencies sorted in decreasing order (log scale; line 0 of each axes
    holds the sorted counts, dead codes included as zeros) and the cumulative share of
    positions they cover (twin axes), titled with used, dead and perplexity."""
    levels = inspection.levels
    fig, axes = plt.subplots(len(levels), 1, figsize=(7, 3.2 * len(levels)), squeeze=False)
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


def code_map_figure(inspection: Inspection) -> plt.Figure:
    """Each of the first images beside its code map in false colour, one panel per level
    (codes written in the cells when the map is at most 8x8)."""
    levels = inspection.levels
    n = len(inspection.images)
    # Two images per row when there are several: the figure stays readable on a wide screen.
    blocks = 2 if n > 3 else 1
    rows, width = math.ceil(n / blocks), 1 + len(levels)
    fig, grid = plt.subplots(rows, blocks * width, figsize=(1.9 * blocks * width, 1.9 * rows), squeeze=False)
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


@dataclass
class Projection:
    """Codebook vectors (K, D) projected on their first two principal components:
    ``points`` (K, 2) and the share of variance each component explains."""

    points: np.ndarray
    explained: tuple[float, float]


def pca(codebook: torch.Tensor) -> Projection:
    """PCA by SVD of the centred codebook: ``points = (E - mean) V[:, :2]``."""
    centred = codebook.double() - codebook.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s.square()
    total = float(var.sum()) or 1.0
    second = float(var[1]) / total if len(var) > 1 else 0.0
    points = (centred @ vh[:2].T).numpy()
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    return Projection(points=points, explained=(float(var[0]) / total, second))


def pca_figure(inspection: Inspection) -> plt.Figure:
    """Per level: the codebook's 2-D PCA projection, used codes coloured by log10 of their
    count, dead codes as red crosses."""
    levels = inspection.levels
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 4.2), squeeze=False)
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


def figure_png(fig: plt.Figure, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def image_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Run folders


@dataclass
class InspectOutput:
    """The files ``inspect_run`` wrote (``atlases`` one per level, top-first) and what it saw."""

    inspection: Inspection
    atlases: list[Path]
    usage: Path
    code_maps: Path
    pca: Path
    summary: Path
    files: list[Path] = field(default_factory=list)


def load_complete(run: Path, attempts: int = 3) -> tuple[VQVAE | VQVAE2, ckpt.Checkpoint]:
    """The latest complete checkpoint of ``run``, which may still be training: ``latest`` only
    ever names a checkpoint whose files are all in place, but training may prune it while we
    read it; then ``latest`` has moved on and we read the newer one."""
    for attempt in range(attempts):
        pointer = Path(run) / "latest"
        before = pointer.read_text().strip() if pointer.exists() else None
        try:
            return ckpt.load_model(run)
        except ckpt.CheckpointError:
            after = pointer.read_text().strip() if pointer.exists() else None
            if attempt == attempts - 1 or before == after:
                raise
    raise AssertionError("unreachable")


def inspect_run(run: str | Path, out: str | Path, *, data: str | None = None, split: str = "test",
                limit: int | None = None, batch_size: int = 256, exemplars: int = 6, maps: int = 8,
                max_codes: int | None = None, progress: bool = True) -> InspectOutput:
    """Inspect the latest complete checkpoint of stage-1 run ``run`` on ``data`` (default: its
    training data) and write into ``out``: ``atlas_<level>.png`` per level, ``usage.png``,
    ``code_maps.png``, ``pca.png`` and ``inspect.json`` (every figure's numbers)."""
    run, out = Path(run), Path(out)
    model, checkpoint = load_complete(run)
    dataset = run_dataset(run, data, split, model.config.in_channels)
    inspection = inspect_model(model, dataset, batch_size=batch_size, limit=limit, exemplars=exemplars,
                               maps=maps, progress=progress, split=split, checkpoint=checkpoint)
    return write_inspection(inspection, out, max_codes=max_codes)


def run_dataset(run: Path, data: str | None, split: str, in_channels: int) -> ImageSet:
    """``data`` (default: the run's training data), ``split``, at the run's image size."""
    config = ckpt.read_config(run)
    dataset = load_dataset(data or config["train"]["data"], split,
                           image_size=config.get("train", {}).get("image_size"))
    if dataset.channels != in_channels:
        raise ValueError(f"{dataset.spec}: images have {dataset.channels} channels but {run} expects "
                         f"{in_channels}")
    return dataset


def write_inspection(inspection: Inspection, out: Path, max_codes: int | None = None) -> InspectOutput:
    """Write the figures of ``inspection`` into ``out`` (each file atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atlases = []
    for lv in inspection.levels:
        path = out / f"atlas_{lv.name}.png"
        with atomic_path(path) as tmp:
            atlas_image(lv, max_codes=max_codes).save(tmp, format="PNG")
        atlases.append(path)
    figures = {"usage": usage_figure, "code_maps": code_map_figure, "pca": pca_figure}
    paths = {}
    for name, make in figures.items():
        paths[name] = out / f"{name}.png"
        with atomic_path(paths[name]) as tmp:
            tmp.write_bytes(figure_png(make(inspection)))
    summary = out / "inspect.json"
    atomic_write_text(summary, json.dumps(inspection.summary(), indent=1) + "\n")
    return InspectOutput(inspection=inspection, atlases=atlases, usage=paths["usage"],
                         code_maps=paths["code_maps"], pca=paths["pca"], summary=summary,
                         files=[*atlases, *paths.values(), summary])
