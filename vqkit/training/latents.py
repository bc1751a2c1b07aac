"""How much a stage-1 model's latents carry, and the Gaussian VAE's test-set figures.

Posterior collapse (``vqkit.nn.vae``) shows in three figures, each measured here on a test set:

* **KL per latent** (nats). A VAE's ``KL(q(z|x) || N(0, I))`` averaged over its latents; a
  VQ-VAE's is the constant ``log K`` per code.
* **Active units** (Burda et al. 2016): the latent dimensions ``u`` whose posterior mean varies
  over the data, ``Var_x(E_q(z|x)[z_u]) > 0.01``; the posterior mean is ``mu`` for a VAE and the
  code vector ``z_q`` for a VQ model (every channel at every position of every level).
* **Swap cost** (bits/dim): how much worse the decoder models each image given the latents of
  another image of the batch (the next one, cyclically) than given its own,
  ``(NLL(x_i | z_{i+1}) - NLL(x_i | z_i)) / (subpixels ln 2)``; a decoder that ignores its
  latents loses nothing. The VAE's latents here are the posterior means.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from vqkit.data.datasets import ImageSet, to_model
from vqkit.data.images import psnr_from_mse
from vqkit.data.loader import iter_batches
from vqkit.errors import UsageError
from vqkit.nn.vae import GaussianVAE, elbo_bits_per_dim, gaussian_kl
from vqkit.nn.vqvae import VQVAE
from vqkit.training.evaluate import AUTOREGRESSIVE_RECON_LIMIT

# Burda et al. 2016's threshold on the variance of a latent's posterior mean over the data.
ACTIVE_THRESHOLD = 0.01


@dataclass
class LatentUse:
    """``latents``: latent dimensions per image; ``active_units`` of them (``active_fraction``);
    ``swap_bits_per_dim``: the swap cost (module docstring), over ``images`` test images."""

    images: int
    latents: int
    active_units: int
    active_fraction: float
    swap_bits_per_dim: float


class _LatentStats:
    """Running per-dimension sums of the posterior means, and the NLLs with own and swapped latents."""

    def __init__(self):
        self.sum = self.sum_sq = None
        self.images = 0
        self.own_nll = self.swapped_nll = 0.0
        self.subpixels = 0

    def add(self, means: torch.Tensor, own_nll: torch.Tensor, swapped_nll: torch.Tensor, subpixels: int) -> None:
        """``means`` (B, N): each image's posterior mean, flattened; NLLs (B,) in nats."""
        m = means.double().flatten(1)
        self.sum = m.sum(0) if self.sum is None else self.sum + m.sum(0)
        self.sum_sq = m.square().sum(0) if self.sum_sq is None else self.sum_sq + m.square().sum(0)
        self.images += len(m)
        self.own_nll += float(own_nll.sum())
        self.swapped_nll += float(swapped_nll.sum())
        self.subpixels = subpixels

    def result(self) -> LatentUse:
        if self.images < 2:
            raise UsageError("measuring latent use needs at least 2 images")
        n = self.images
        variance = (self.sum_sq - self.sum.square() / n) / (n - 1)  # (N,)
        active = int((variance > ACTIVE_THRESHOLD).sum())
        swap = (self.swapped_nll - self.own_nll) / (n * self.subpixels * math.log(2))
        return LatentUse(images=n, latents=len(variance), active_units=active,
                         active_fraction=active / len(variance), swap_bits_per_dim=swap)


def _swapped(latents):
    """Each image's latents replaced by the next image's (cyclically): a tensor or a list of them."""
    if isinstance(latents, torch.Tensor):
        return latents.roll(1, 0)
    return [c.roll(1, 0) for c in latents]


@torch.no_grad()
def _measure(model: VQVAE | GaussianVAE, x: torch.Tensor, stats: _LatentStats) -> None:
    latents = model.encode(x)  # a VAE's posterior means; a VQ model's codes, top-first
    means = latents if isinstance(model, GaussianVAE) else \
        torch.cat([z_q.flatten(1) for z_q in model.quantized(latents)], 1)
    stats.add(means, model.nll(x, latents), model.nll(x, _swapped(latents)), x[0].numel())


@torch.no_grad()
def latent_use(model: VQVAE | GaussianVAE, dataset: ImageSet, batch_size: int = 256, limit: int | None = None,
               progress: bool = False, workers: int | None = None) -> LatentUse:
    """Active units and swap cost (module docstring) of ``model`` over the first ``limit``
    images of ``dataset`` (all by default, at least 2); batches of at least 2 images."""
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    stats = _LatentStats()
    try:
        stream = iter_batches(dataset, max(batch_size, 2), limit=n, workers=workers, device=model.device)
        for _, images, _ in tqdm(stream, desc="latent use", disable=not progress, leave=False):
            if len(images) >= 2:
                _measure(model, to_model(images), stats)
    finally:
        model.train(was_training)
    return stats.result()


@dataclass
class VAEEvalResult:
    """Test-set figures of a Gaussian VAE.

    MSE and PSNR of the reconstructions from the posterior means ([0, 1] scale, as
    ``vqkit.training.evaluate``), over the first ``reconstructed`` images; the ELBO from one
    sample of z per image (an unbiased estimate): ``nll_bits_per_dim`` and ``kl_bits_per_dim``
    its two terms, ``bits_per_dim`` their sum; ``kl_per_latent`` nats per latent dimension,
    ``kl_per_position`` nats per position of the latent map (the D dimensions together: what a
    VQ-VAE's ``log K`` per code compares with); the latent use (``LatentUse``) of the same images.
    """

    images: int
    reconstructed: int
    mse: float
    psnr: float
    nll_bits_per_dim: float
    kl_bits_per_dim: float
    bits_per_dim: float
    kl_per_latent: float
    kl_per_position: float
    latents: int
    active_units: int
    active_fraction: float
    swap_bits_per_dim: float

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.images} images: MSE {self.mse:.5f}, PSNR {self.psnr:.2f} dB, {self.bits_per_dim:.3f} "
                f"bits/dim (reconstruction {self.nll_bits_per_dim:.3f} + KL {self.kl_bits_per_dim:.3f}), "
                f"KL {self.kl_per_latent:.4f} nats per latent ({self.kl_per_position:.3f} per position), "
                f"active units {self.active_units}/{self.latents} ({100 * self.active_fraction:.1f}%), "
                f"another image's latents cost {self.swap_bits_per_dim:+.3f} bits/dim")


@torch.no_grad()
def evaluate_vae(model: GaussianVAE, dataset: ImageSet, batch_size: int = 256, limit: int | None = None,
                 progress: bool = False, workers: int | None = None, seed: int = 0,
                 recon_limit: int | None = None) -> VAEEvalResult:
    """The figures of ``VAEEvalResult`` over the first ``limit`` images of ``dataset`` (all by
    default, at least 2); ``seed`` draws the ELBO's samples of z (and an autoregressive
    likelihood's reconstructions). MSE and PSNR are those of the first ``recon_limit`` images
    (default: all, or ``AUTOREGRESSIVE_RECON_LIMIT`` with an autoregressive likelihood, whose
    reconstructions are drawn pixel by pixel), ``reconstructed`` of them."""
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 2:
        raise UsageError(f"{dataset.spec}: evaluating a VAE needs at least 2 images, got {n}")
    if recon_limit is None and model.likelihood.autoregressive:
        recon_limit = AUTOREGRESSIVE_RECON_LIMIT
    if recon_limit is not None and recon_limit < 1:
        raise UsageError(f"recon_limit must be positive, got {recon_limit}")
    generator = torch.Generator().manual_seed(seed)
    recon_n = 0
    sq_err = nll = kl = 0.0
    stats = _LatentStats()
    subpixels = latents = 0
    batch_size = max(batch_size, 2)
    try:
        stream = iter_batches(dataset, batch_size, limit=n, workers=workers, device=model.device)
        for _, images, _ in tqdm(stream, total=-(-n // batch_size), desc="eval", disable=not progress,
                                 leave=False):
            x = to_model(images).to(model.device)
            mean, log_var = model.posterior(x)
            eps = torch.randn(mean.shape, generator=generator).to(mean)
            nll += float(model.nll(x, mean + torch.exp(0.5 * log_var) * eps).sum())
            kl += float(gaussian_kl(mean, log_var).sum())
            m = len(x) if recon_limit is None else min(len(x), recon_limit - recon_n)
            if m > 0:
                rec01 = (model.decode(mean[:m], generator) + 1) / 2
                sq_err += float((rec01 - (x[:m] + 1) / 2).square().sum())
                recon_n += m
            if len(x) >= 2:
                stats.add(mean, model.nll(x, mean), model.nll(x, _swapped(mean)), x[0].numel())
            subpixels, latents = x[0].numel(), mean[0].numel()
    finally:
        model.train(was_training)
    use = stats.result()
    values = n * subpixels
    recon_values = recon_n * subpixels
    positions = latents // model.config.code_dim
    return VAEEvalResult(
        images=n, reconstructed=recon_n, mse=sq_err / recon_values,
        psnr=psnr_from_mse(max(sq_err / recon_values, 1e-12), peak=1.0),
        nll_bits_per_dim=nll / (values * math.log(2)), kl_bits_per_dim=kl / (values * math.log(2)),
        bits_per_dim=elbo_bits_per_dim(nll / n, kl / n, subpixels), kl_per_latent=kl / (n * latents),
        kl_per_position=kl / (n * positions), latents=latents, active_units=use.active_units,
        active_fraction=use.active_fraction, swap_bits_per_dim=use.swap_bits_per_dim)
