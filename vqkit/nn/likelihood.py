"""Decoder likelihoods p(x | z_q) over 8-bit pixels, and the ELBO in bits per dimension.

Pixels are in [-1, 1] (see ``vqkit.data.datasets``): the 256 values of a subpixel are bins of width
2/255 centred on ``x = v / 127.5 - 1``. Both likelihoods put a probability mass on each bin
(the end bins absorb the tails), so their negative log-likelihood is a true code length.

* ``GaussianLikelihood``: the decoder predicts the mean; training uses the mean squared error,
  as the paper and its reproductions do (a Gaussian with fixed variance). A per-channel
  variance tracked from the training error turns the same prediction into a discretised
  Gaussian whose NLL can be reported.
* ``LogisticMixtureLikelihood``: a discretised mixture of logistics per subpixel (Salimans et
  al. 2017, PixelCNN++ without the channel coupling); training minimises its NLL directly.

The VQ-VAE posterior q(z|x) is one-hot, so KL(q || uniform prior) = log K for each latent
(section 3.1) and the ELBO in bits/dim is ``(NLL + latents * log K) / (subpixels * ln 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqkit import distributed
from vqkit.errors import ConfigError

_HALF_BIN = 1.0 / 255.0
_EDGE = 0.999  # x beyond this is the first or last bin (x = -1 or 1)


@dataclass
class LikelihoodOutput:
    """``loss``: what training minimises (per subpixel); ``nll``: -log p(x|z) in nats per image
    (B,), summed over its subpixels; ``mean``: the expected image in [-1, 1], (B, C, H, W)."""

    loss: torch.Tensor
    nll: torch.Tensor
    mean: torch.Tensor


def _bin_log_prob(x: torch.Tensor, mass: torch.Tensor, log_cdf_upper: torch.Tensor,
                  log_sf_lower: torch.Tensor, log_pdf_centre: torch.Tensor) -> torch.Tensor:
    """Log mass of the bin around ``x``: ``mass`` = CDF(upper) - CDF(lower); the first bin
    takes everything below (log CDF(upper)), the last everything above (log 1 - CDF(lower));
    where the mass underflows, the density at the centre times the bin width stands in."""
    inner = torch.where(mass > 1e-5, torch.log(mass.clamp(min=1e-12)),
                        log_pdf_centre + math.log(2 * _HALF_BIN))
    return torch.where(x < -_EDGE, log_cdf_upper, torch.where(x > _EDGE, log_sf_lower, inner))


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(mean, exp(log_scale)^2), elementwise."""
    inv = torch.exp(-log_scale)
    upper = (x - mean + _HALF_BIN) * inv
    lower = (x - mean - _HALF_BIN) * inv
    mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    centre = (x - mean) * inv
    log_pdf = -0.5 * centre.square() - log_scale - 0.5 * math.log(2 * math.pi)
    return _bin_log_prob(x, mass, torch.special.log_ndtr(upper), torch.special.log_ndtr(-lower), log_pdf)


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under Logistic(mean, exp(log_scale)), elementwise."""
    inv = torch.exp(-log_scale)
    upper = (x - mean + _HALF_BIN) * inv
    lower = (x - mean - _HALF_BIN) * inv
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    centre = (x - mean) * inv
    log_pdf = centre - log_scale - 2 * F.softplus(centre)
    return _bin_log_prob(x, mass, upper - F.softplus(upper), -F.softplus(lower), log_pdf)


class GaussianLikelihood(nn.Module):
    """Decoder output (B, C, H, W) is the mean. Training minimises the MSE; the variance per
    channel is the maximum-likelihood estimate given the mean, a running average of the
    training MSE (decay 0.99), so the NLL it reports needs no learning rate of its own."""

    def __init__(self, channels: int, decay: float = 0.99):
        super().__init__()
        self.channels = channels
        self.decay = decay
        self.register_buffer("variance", torch.full((channels,), -1.0))

    @property
    def decoder_channels(self) -> int:
        """Channels the decoder must output: one mean per image channel."""
        return self.channels

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> LikelihoodOutput:
        params = params.float()
        sq = (params - x).square()
        if self.training:
            with torch.no_grad():
                # The global batch's, in data-parallel training: every process keeps the same.
                batch_var = distributed.all_reduce_mean(sq.detach().mean(dim=(0, 2, 3)))
                if bool((self.variance < 0).any()):
                    self.variance.copy_(batch_var)
                else:
                    self.variance.mul_(self.decay).add_(batch_var, alpha=1 - self.decay)
        log_scale = 0.5 * torch.log(self.variance.clamp(min=1e-8)).view(1, -1, 1, 1)
        with torch.no_grad():
            nll = -discretized_gaussian_log_prob(x, params, log_scale).flatten(1).sum(1)
        return LikelihoodOutput(loss=sq.mean(), nll=nll, mean=params)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.float()


class LogisticMixtureLikelihood(nn.Module):
    """Decoder output (B, 3*M*C, H, W): for each channel, M mixture logits, M means and M
    log-scales, independent across subpixels given z."""

    def __init__(self, channels: int, mixtures: int = 5):
        super().__init__()
        self.channels = channels
        self.mixtures = mixtures

    @property
    def decoder_channels(self) -> int:
        """Channels the decoder must output: logits, means and log-scales of each mixture."""
        return 3 * self.mixtures * self.channels

    def _split(self, params: torch.Tensor):
        b, _, h, w = params.shape
        p = params.float().view(b, 3, self.mixtures, self.channels, h, w)
        return p[:, 0], p[:, 1], p[:, 2].clamp(min=-7.0)

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> LikelihoodOutput:
        logits, means, log_scales = self._split(params)
        log_p = discretized_logistic_log_prob(x.unsqueeze(1), means, log_scales)
        log_p = torch.logsumexp(log_p + F.log_softmax(logits, dim=1), dim=1)
        nll = -log_p.flatten(1).sum(1)
        return LikelihoodOutput(loss=nll.mean() / x[0].numel(), nll=nll.detach(),
                                mean=self.mean(params))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        logits, means, _ = self._split(params)
        return (F.softmax(logits, dim=1) * means).sum(1)


LIKELIHOODS = ("gaussian", "logistic_mixture")


def make_likelihood(kind: str, channels: int, mixtures: int) -> GaussianLikelihood | LogisticMixtureLikelihood:
    """The likelihood ``kind`` (one of ``LIKELIHOODS``) of images with ``channels`` channels;
    ``mixtures`` is the number of logistic components (``logistic_mixture`` only)."""
    if kind == "gaussian":
        return GaussianLikelihood(channels)
    if kind == "logistic_mixture":
        return LogisticMixtureLikelihood(channels, mixtures)
    raise ConfigError(f"unknown likelihood {kind!r}: choose one of {', '.join(map(repr, LIKELIHOODS))}")


def bits_per_dim(nll_nats: float, subpixels: int, latents: Sequence[int], codebook_sizes: Sequence[int]) -> float:
    """ELBO bound in bits/dim: reconstruction NLL (nats, per image) plus log K_l nats for each of
    the ``latents[l]`` one-hot latents of every level ``l``, over ``subpixels`` values of the image."""
    log_k = sum(n * math.log(k) for n, k in zip(latents, codebook_sizes, strict=True))
    return (nll_nats + log_k) / (subpixels * math.log(2))
