"""Seeing inside a stage-1 model: what each code means, how codes are used, how images map to codes.

The discrete latents of VQ-VAE (van den Oord et al. 2017) and VQ-VAE-2 (Razavi et al. 2019)
are words a person can look at. One streaming pass over a dataset (``inspect_model``) gathers,
for every code map (top-first, as in ``vqkit.nn.vqvae``: the levels, a residual level's stages
each one, whose "z_e" is the residual that the stages before it left):

* ``counts`` (K,): how often each code is the nearest one (eq. 1) over the whole dataset; it
  is the bincount of the maps ``VQVAE.encode`` returns, and gives the used and
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

This module computes the numbers only (torch, no matplotlib); ``vqkit.inspect.figures`` draws
them and ``vqkit.inspect.atlas`` writes a run's figures into a folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from vqkit.data.datasets import ImageSet, from_model, to_model
from vqkit.errors import UsageError
from vqkit.nn.quantize import perplexity
from vqkit.nn.vqvae import VQVAE
from vqkit.runs import checkpoint as ckpt

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


@torch.no_grad()
def inspect_model(model: VQVAE, dataset: ImageSet, *, batch_size: int = 256,
                  limit: int | None = None, exemplars: int = 6, maps: int = 8, progress: bool = False,
                  split: str = "", checkpoint: ckpt.Checkpoint | None = None) -> Inspection:
    """One streaming pass of ``model`` over ``dataset`` (the first ``limit`` images): code
    counts, the ``exemplars`` nearest crops per code, and the code maps of the first ``maps``
    images, for every level; then each code decoded from a filled map."""
    if exemplars < 1 or maps < 1 or batch_size < 1:
        raise UsageError("exemplars, maps and batch_size must be >= 1")
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise UsageError(f"{dataset.spec}: no images to inspect")
    device = next(model.parameters()).device
    code_maps = model.config.code_maps()
    sizes = [m.codebook_size for m in code_maps]
    shapes = model.config.map_shapes(dataset.height, dataset.width)
    strides = [dataset.height // h for h, _ in shapes]
    crops = [3 * s for s in strides]
    counts = [torch.zeros(k, dtype=torch.long) for k in sizes]
    banks = [ExemplarBank(k, exemplars, dataset.channels, c) for k, c in zip(sizes, crops)]
    first_maps: list[list[torch.Tensor]] = [[] for _ in sizes]
    first_images = dataset.batch(torch.arange(min(maps, n)))[0]
    try:
        for start in tqdm(range(0, n, batch_size), desc="inspect", disable=not progress, leave=False):
            images, _ = dataset.batch(torch.arange(start, min(start + batch_size, n)))
            # Distance to the chosen code vector: how typical this use of the code is.
            for level, (codes, dist) in enumerate(model.encode_maps(to_model(images).to(device))):
                codes, dist = codes.cpu(), dist.cpu()
                counts[level] += torch.bincount(codes.flatten(), minlength=sizes[level])
                banks[level].update(codes, dist, images, strides[level])
                if start < maps:
                    first_maps[level].append(codes[:maps - start])
        decoded = _decode_filled(model, shapes, counts, device, batch_size)
    finally:
        model.train(was_training)
    levels = [LevelInspection(name=m.name, stride=s, crop=c, counts=cnt, exemplars=bank.crops,
                              exemplar_dist=bank.dist, codebook=vectors.cpu(), decoded=dec, maps=torch.cat(fm))
              for m, s, c, cnt, bank, vectors, dec, fm in zip(code_maps, strides, crops, counts, banks,
                                                              model.map_code_vectors(), decoded, first_maps)]
    return Inspection(data=dataset.spec, split=split, num_images=n, images=first_images, levels=levels,
                      step=checkpoint.step if checkpoint else None,
                      fingerprint=checkpoint.state.get("fingerprint") if checkpoint else None)


@torch.no_grad()
def _decode_filled(model: VQVAE, shapes: list[tuple[int, int]], counts: list[torch.Tensor],
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
            x = model.decode(maps)
            images.append(from_model(x).cpu())
        out.append(torch.cat(images))
    return out


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
