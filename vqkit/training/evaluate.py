"""Test-set figures for a trained VQ-VAE or VQ-VAE-2: MSE, PSNR, bits/dim, codebook health.

MSE is measured on the [0, 1] pixel scale with reconstructions clamped, averaged over every
subpixel of the set; PSNR = 10 log10(1 / MSE) of that average. Bits/dim is the ELBO of
``vqkit.nn.likelihood.bits_per_dim``: reconstruction NLL plus log K_l nats per latent of each
level. For a hierarchy, each level also reports its map size, its reduction factor (image
values per code) and the PSNR of the reconstruction from that level and those above it
alone (VQ-VAE-2 Figure 3), and the PSNR with that level zeroed and all others kept: the gap
to the full PSNR is what the level adds (for the top: the model against its lower levels alone).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from vqkit.data.datasets import ImageSet, to_model
from vqkit.data.images import psnr_from_mse
from vqkit.data.loader import iter_batches
from vqkit.errors import UsageError
from vqkit.nn.likelihood import bits_per_dim
from vqkit.nn.quantize import CodebookUsage
from vqkit.nn.vqvae import VQVAE, level_names


@dataclass
class LevelResult:
    name: str
    shape: list[int]
    reduction: float
    codes_used: int
    codebook_size: int
    usage: float
    perplexity: float
    psnr_upto: float
    psnr_without: float | None


@dataclass
class EvalResult:
    """Whole-model figures; with several levels, ``codes_used`` and ``codebook_size`` are
    totals over the codebooks, ``usage`` is the lowest level's and ``perplexity`` the mean of
    the levels' (each level's own figures are in ``levels``, top-first)."""

    images: int
    mse: float
    psnr: float
    nll_bits_per_dim: float
    bits_per_dim: float
    codes_used: int
    codebook_size: int
    usage: float
    perplexity: float
    mean_batch_perplexity: float
    levels: list[LevelResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"{self.images} images: MSE {self.mse:.5f}, PSNR {self.psnr:.2f} dB, "
                f"{self.bits_per_dim:.3f} bits/dim (reconstruction {self.nll_bits_per_dim:.3f}), "
                f"codes used {self.codes_used}/{self.codebook_size} ({100 * self.usage:.1f}%), "
                f"perplexity {self.perplexity:.1f} (batch mean {self.mean_batch_perplexity:.1f})")
        if len(self.levels) > 1:
            text += "".join(
                f"\n  {lv.name:>7}: {lv.shape[0]}x{lv.shape[1]} codes ({lv.reduction:.0f}x fewer than "
                f"image values), {lv.codes_used}/{lv.codebook_size} used, perplexity "
                f"{lv.perplexity:.1f}, PSNR with the levels above {lv.psnr_upto:.2f} dB, "
                f"without this level {lv.psnr_without:.2f} dB"
                for lv in self.levels)
        return text


def _psnr(sq_err: float, count: int) -> float:
    # Floored: a perfect reconstruction gives 120 dB rather than an infinity JSON cannot hold.
    return psnr_from_mse(max(sq_err / count, 1e-12), peak=1.0)


@torch.no_grad()
def evaluate(model: VQVAE, dataset: ImageSet, batch_size: int = 256, limit: int | None = None,
             progress: bool = False, workers: int | None = None) -> EvalResult:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise UsageError(f"{dataset.spec}: no images to evaluate")
    sizes = model.config.codebook_sizes
    num_levels = len(sizes)
    usage = [CodebookUsage(k) for k in sizes]
    level_sq_err = [0.0] * num_levels  # decoding the levels 0..l only; the last is the full model
    without_sq_err = [0.0] * num_levels  # decoding every level but l
    nll = batch_ppl = 0.0
    batches = 0
    shapes: list[list[int]] = []
    subpixels = 0
    try:
        stream = iter_batches(dataset, batch_size, limit=n, workers=workers, device=device)
        for _, images, _ in tqdm(stream, total=-(-n // batch_size), desc="eval", disable=not progress,
                                 leave=False):
            x = to_model(images).to(device)
            out = model(x)
            codes = out.codes
            x01 = (x + 1) / 2
            for upto in range(1, num_levels + 1):
                rec = out.x_hat if upto == num_levels else model.decode_levels(codes, upto)
                level_sq_err[upto - 1] += float(((rec.clamp(-1, 1) + 1) / 2 - x01).square().sum())
            for level in range(num_levels if num_levels > 1 else 0):
                rec = model.decode_without(codes, level)
                without_sq_err[level] += float(((rec + 1) / 2 - x01).square().sum())
            nll += float(out.nll.sum())
            batch_ppl += sum(float(p) for p in out.perplexity) / num_levels
            batches += 1
            for counter, c in zip(usage, codes):
                counter.update(c)
            shapes = [list(c.shape[1:]) for c in codes]
            subpixels = x[0].numel()
    finally:
        model.train(was_training)
    values = n * subpixels
    mean_nll = nll / n
    levels = [LevelResult(name=name, shape=shape, reduction=subpixels / (shape[0] * shape[1]),
                          codes_used=u.used, codebook_size=u.counts.numel(), usage=u.fraction,
                          perplexity=u.perplexity, psnr_upto=_psnr(err, values),
                          psnr_without=_psnr(err_without, values) if num_levels > 1 else None)
              for name, shape, u, err, err_without in zip(level_names(num_levels), shapes, usage,
                                                          level_sq_err, without_sq_err)]
    return EvalResult(
        images=n, mse=level_sq_err[-1] / values, psnr=_psnr(level_sq_err[-1], values),
        nll_bits_per_dim=mean_nll / (subpixels * math.log(2)),
        bits_per_dim=bits_per_dim(mean_nll, subpixels, [h * w for h, w in shapes], sizes),
        codes_used=sum(u.used for u in usage), codebook_size=sum(sizes),
        usage=min(u.fraction for u in usage),
        perplexity=sum(u.perplexity for u in usage) / num_levels,
        mean_batch_perplexity=batch_ppl / batches, levels=levels)
