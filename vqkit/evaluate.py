"""Test-set figures for a trained VQ-VAE: MSE, PSNR, bits/dim and codebook health.

MSE is measured on the [0, 1] pixel scale with reconstructions clamped, averaged over every
subpixel of the set; PSNR = 10 log10(1 / MSE) of that average. Bits/dim is the ELBO of
``vqkit.likelihood.bits_per_dim``: reconstruction NLL plus log K nats per latent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .data import ImageSet, to_model
from .likelihood import bits_per_dim
from .model import VQVAE
from .quantize import CodebookUsage


@dataclass
class EvalResult:
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

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.images} images: MSE {self.mse:.5f}, PSNR {self.psnr:.2f} dB, "
                f"{self.bits_per_dim:.3f} bits/dim (reconstruction {self.nll_bits_per_dim:.3f}), "
                f"codes used {self.codes_used}/{self.codebook_size} ({100 * self.usage:.1f}%), "
                f"perplexity {self.perplexity:.1f} (batch mean {self.mean_batch_perplexity:.1f})")


@torch.no_grad()
def evaluate(model: VQVAE, dataset: ImageSet, batch_size: int = 256, limit: int | None = None,
             progress: bool = False) -> EvalResult:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f"{dataset.spec}: no images to evaluate")
    usage = CodebookUsage(model.config.codebook_size)
    sq_err = nll = batch_ppl = 0.0
    batches = 0
    latents = subpixels = 0
    try:
        for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, leave=False):
            images, _ = dataset.batch(torch.arange(start, min(start + batch_size, n)))
            x = to_model(images).to(device)
            out = model(x)
            x01 = (x + 1) / 2
            rec01 = (out.x_hat.clamp(-1, 1) + 1) / 2
            sq_err += float((rec01 - x01).square().sum())
            nll += float(out.nll.sum())
            batch_ppl += float(out.perplexity)
            batches += 1
            usage.update(out.codes)
            latents = out.codes[0].numel()
            subpixels = x[0].numel()
    finally:
        model.train(was_training)
    mse = sq_err / (n * subpixels)
    mean_nll = nll / n
    return EvalResult(
        images=n, mse=mse, psnr=10 * math.log10(1.0 / max(mse, 1e-12)),
        nll_bits_per_dim=mean_nll / (subpixels * math.log(2)),
        bits_per_dim=bits_per_dim(mean_nll, subpixels, latents, model.config.codebook_size),
        codes_used=usage.used, codebook_size=model.config.codebook_size, usage=usage.fraction,
        perplexity=usage.perplexity, mean_batch_perplexity=batch_ppl / batches)
