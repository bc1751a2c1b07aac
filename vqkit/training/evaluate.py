"""Test-set figures for a trained VQ-VAE or VQ-VAE-2: MSE, PSNR, bits/dim, codebook health.

MSE is measured on the [0, 1] pixel scale with reconstructions clamped, averaged over every
subpixel of the set; PSNR = 10 log10(1 / MSE) of that average. Bits/dim is the ELBO of
``vqkit.nn.likelihood.bits_per_dim``: reconstruction NLL plus log K_l nats per latent of each
level. For a hierarchy, each level also reports its map size, its reduction factor (image
values per code) and the PSNR of the reconstruction from that level and those above it
alone (VQ-VAE-2 Figure 3: the prefix decoded by ``decode_levels``), and the PSNR with that
level zeroed and all others kept: the gap to the full PSNR is what the level adds (for the top:
the model against its lower levels alone).

What each level brings: ``psnr_gain`` is the PSNR of its prefix less that of the prefix above it
(for the top: less the PSNR of a flat image of the test set's mean colour, the best constant
guess, ``psnr_mean_colour``); ``gain_share`` is that gain over the full model's gain over the
mean colour, so the shares of the levels sum to 1.

The "levels" of these figures are the model's code maps (``VQVAEConfig.code_maps``): a residual
level reports each of its stages as one, with the PSNR of the maps down to that stage (the sum
of its first stages) and without that stage's share of the sum.

With an autoregressive likelihood (``pixelcnn``) a reconstruction is a sample, drawn pixel by
pixel (``VQVAE.decode_levels``, one seeded generator for the whole evaluation), which costs
about one decoder pass per pixel row and position; so the reconstruction figures (MSE, PSNR,
MS-SSIM, the mean colour and every level's PSNR) are measured on the first ``recon_limit``
images (``AUTOREGRESSIVE_RECON_LIMIT`` by default, reported as ``reconstructed``), while the
NLL, bits/dim and the codebook figures use every image, as they do for the factorised
likelihoods, whose reconstructions are their means and cover every image.

MS-SSIM (Wang, Simoncelli and Bovik 2003; ``pytorch_msssim``: 5 scales, the paper's weights,
Gaussian window of sigma 1.5) of every prefix, averaged over the images, on the [0, 1] scale.
The paper's 11-pixel window needs images of at least 161 pixels a side (four halvings, then the
window); smaller images take the largest odd window of at least 3 pixels that fits, reported
as ``ms_ssim_window``, and images too small for that (CIFAR-10's 32x32) report None.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from pytorch_msssim import ms_ssim as _ms_ssim
from tqdm import tqdm

from vqkit.data.datasets import ImageSet, to_model
from vqkit.data.images import psnr_from_mse
from vqkit.data.loader import iter_batches
from vqkit.errors import UsageError
from vqkit.nn.likelihood import bits_per_dim
from vqkit.nn.quantize import CodebookUsage
from vqkit.nn.vqvae import VQVAE

# Images whose reconstructions an evaluation samples by default with an autoregressive likelihood:
# at one thread, a CIFAR-10 batch of 256 takes about 6 s with the default PixelCNN sizes (README).
AUTOREGRESSIVE_RECON_LIMIT = 256

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
    psnr_gain: float = 0.0
    gain_share: float = 0.0
    ms_ssim_upto: float | None = None


@dataclass
class EvalResult:
    """Whole-model figures; with several levels, ``codes_used`` and ``codebook_size`` are
    totals over the codebooks, ``usage`` is the lowest level's and ``perplexity`` the mean of
    the levels' (each level's own figures are in ``levels``, top-first). ``reconstructed``: the
    images (the first of the ``images``) that the reconstruction figures are measured on."""

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
    psnr_mean_colour: float = 0.0
    ms_ssim: float | None = None
    ms_ssim_window: int | None = None
    reconstructed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        sampled = (f" (of the first {self.reconstructed}, sampled)"
                   if self.reconstructed < self.images else "")
        text = (f"{self.images} images: MSE {self.mse:.5f}, PSNR {self.psnr:.2f} dB{sampled}, "
                f"{self.bits_per_dim:.3f} bits/dim (reconstruction {self.nll_bits_per_dim:.3f}), "
                f"codes used {self.codes_used}/{self.codebook_size} ({100 * self.usage:.1f}%), "
                f"perplexity {self.perplexity:.1f} (batch mean {self.mean_batch_perplexity:.1f})")
        if len(self.levels) > 1:
            text += "".join(
                f"\n  {lv.name:>7}: {lv.shape[0]}x{lv.shape[1]} codes ({lv.reduction:.0f}x fewer than "
                f"image values), {lv.codes_used}/{lv.codebook_size} used, perplexity "
                f"{lv.perplexity:.1f}, PSNR with the levels above {lv.psnr_upto:.2f} dB"
                + (f" (MS-SSIM {lv.ms_ssim_upto:.4f})" if lv.ms_ssim_upto is not None else "")
                + f", adding {lv.psnr_gain:+.2f} dB ({100 * lv.gain_share:.0f}% of the gain over the mean "
                f"colour, {self.psnr_mean_colour:.2f} dB), without this level {lv.psnr_without:.2f} dB"
                for lv in self.levels)
        if self.ms_ssim is not None:
            text += f"\n  MS-SSIM {self.ms_ssim:.4f} (window {self.ms_ssim_window})"
        return text


def ms_ssim_window(height: int, width: int) -> int | None:
    """The Gaussian window MS-SSIM uses for images of this size: the paper's 11 where it fits
    (sides of 161 and more), else the largest odd window of at least 3 that its four halvings
    leave room for; None when none does."""
    side = min(height, width)
    window = 11
    while window >= 3 and (window - 1) * 16 >= side:
        window -= 2
    return window if window >= 3 else None


def ms_ssim_per_image(x01: torch.Tensor, y01: torch.Tensor, window: int) -> torch.Tensor:
    """MS-SSIM (B,) of two batches (B, C, H, W) on the [0, 1] scale, with a ``window``-pixel
    Gaussian window of sigma 1.5, averaged over the channels."""
    return _ms_ssim(x01.double(), y01.double(), data_range=1.0, size_average=False, win_size=window)


def _psnr(sq_err: float, count: int) -> float:
    # Floored: a perfect reconstruction gives 120 dB rather than an infinity JSON cannot hold.
    return psnr_from_mse(max(sq_err / count, 1e-12), peak=1.0)


@torch.no_grad()
def evaluate(model: VQVAE, dataset: ImageSet, batch_size: int = 256, limit: int | None = None,
             progress: bool = False, workers: int | None = None, recon_limit: int | None = None) -> EvalResult:
    """The figures of ``model`` on the first ``limit`` images of ``dataset`` (default all); the
    reconstruction figures on the first ``recon_limit`` of them (default: all, or
    ``AUTOREGRESSIVE_RECON_LIMIT`` with an autoregressive likelihood)."""
    if recon_limit is not None and recon_limit < 1:
        raise UsageError(f"recon_limit must be positive, got {recon_limit}")
    autoregressive = model.likelihood.autoregressive
    if recon_limit is None and autoregressive:
        recon_limit = AUTOREGRESSIVE_RECON_LIMIT
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise UsageError(f"{dataset.spec}: no images to evaluate")
    code_maps = model.config.code_maps()
    sizes = [m.codebook_size for m in code_maps]
    num_levels = len(sizes)  # code maps: levels, or a residual level's stages
    usage = [CodebookUsage(k) for k in sizes]
    level_sq_err = [0.0] * num_levels  # decoding the levels 0..l only; the last is the full model
    level_ms_ssim = [0.0] * num_levels
    window = None
    # The mean colour's squared error follows from per-channel sums of x and x^2.
    sum_x = sum_x2 = 0.0
    without_sq_err = [0.0] * num_levels  # decoding every level but l
    nll = batch_ppl = 0.0
    batches = 0
    shapes: list[list[int]] = []
    subpixels = 0
    recon_n = 0  # images reconstructed so far
    generator = torch.Generator(device).manual_seed(0)
    try:
        stream = iter_batches(dataset, batch_size, limit=n, workers=workers, device=device)
        for _, images, _ in tqdm(stream, total=-(-n // batch_size), desc="eval", disable=not progress,
                                 leave=False):
            x = to_model(images).to(device)
            out = model(x)
            codes = out.codes
            m = len(x) if recon_limit is None else min(len(x), recon_limit - recon_n)
            x01 = (x[:m] + 1) / 2
            recon_codes = [c[:m] for c in codes]
            window = ms_ssim_window(*x.shape[2:])
            sum_x = sum_x + x01.double().sum(dim=(0, 2, 3))
            sum_x2 = sum_x2 + x01.double().square().sum(dim=(0, 2, 3))
            for upto in range(1, num_levels + 1) if m else ():
                # A factorised likelihood's x_hat is its decoded mean; an autoregressive one's is
                # teacher-forced, so its reconstruction is sampled.
                rec = out.x_hat[:m] if upto == num_levels and not autoregressive else \
                    model.decode_levels(recon_codes, upto, generator)
                rec01 = (rec.clamp(-1, 1) + 1) / 2
                level_sq_err[upto - 1] += float((rec01 - x01).square().sum())
                if window is not None:
                    level_ms_ssim[upto - 1] += float(ms_ssim_per_image(rec01, x01, window).sum())
            for level in range(num_levels if num_levels > 1 and m else 0):
                rec = model.decode_without(recon_codes, level, generator)
                without_sq_err[level] += float(((rec + 1) / 2 - x01).square().sum())
            recon_n += m
            nll += float(out.nll.sum())
            batch_ppl += sum(float(p) for p in out.perplexity) / num_levels
            batches += 1
            for counter, c in zip(usage, codes):
                counter.update(c)
            shapes = [list(c.shape[1:]) for c in codes]
            subpixels = x[0].numel()
    finally:
        model.train(was_training)
    values = recon_n * subpixels
    mean_nll = nll / n
    per_channel = values / len(sum_x)
    # Summed over the channels: sum (x - mean)^2 = sum x^2 - (sum x)^2 / count.
    mean_colour = _psnr(float((sum_x2 - sum_x.square() / per_channel).sum()), values)
    psnrs = [_psnr(err, values) for err in level_sq_err]
    gains = [b - a for a, b in zip([mean_colour, *psnrs[:-1]], psnrs)]
    total_gain = psnrs[-1] - mean_colour
    levels = [LevelResult(name=name, shape=shape, reduction=subpixels / (shape[0] * shape[1]),
                          codes_used=u.used, codebook_size=u.counts.numel(), usage=u.fraction,
                          perplexity=u.perplexity, psnr_upto=psnr,
                          psnr_without=_psnr(err_without, values) if num_levels > 1 else None,
                          psnr_gain=gain, gain_share=gain / total_gain if total_gain else 0.0,
                          ms_ssim_upto=ssim / recon_n if window is not None else None)
              for name, shape, u, psnr, err_without, gain, ssim in zip(
                  [m.name for m in code_maps], shapes, usage, psnrs, without_sq_err, gains, level_ms_ssim)]
    return EvalResult(
        images=n, mse=level_sq_err[-1] / values, psnr=_psnr(level_sq_err[-1], values),
        nll_bits_per_dim=mean_nll / (subpixels * math.log(2)),
        bits_per_dim=bits_per_dim(mean_nll, subpixels, [h * w for h, w in shapes], sizes),
        codes_used=sum(u.used for u in usage), codebook_size=sum(sizes),
        usage=min(u.fraction for u in usage),
        perplexity=sum(u.perplexity for u in usage) / num_levels,
        mean_batch_perplexity=batch_ppl / batches, levels=levels, psnr_mean_colour=mean_colour,
        ms_ssim=levels[-1].ms_ssim_upto, ms_ssim_window=window, reconstructed=recon_n)
