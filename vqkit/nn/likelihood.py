"""Decoder likelihoods p(x | z_q) over 8-bit pixels, and the ELBO in bits per dimension.

Pixels are in [-1, 1] (see ``vqkit.data.datasets``): the 256 values of a subpixel are bins of width
2/255 centred on ``x = v / 127.5 - 1``. Every likelihood puts a probability mass on each bin
(the end bins absorb the tails), so their negative log-likelihood is a true code length.
Two are factorised (independent subpixels given z), one autoregressive:

* ``GaussianLikelihood``: the decoder predicts the mean; training uses the mean squared error,
  as the paper and its reproductions do (a Gaussian with fixed variance). A per-channel
  variance tracked from the training error turns the same prediction into a discretised
  Gaussian whose NLL can be reported.
* ``LogisticMixtureLikelihood``: a discretised mixture of logistics per subpixel (Salimans et
  al. 2017, PixelCNN++ without the channel coupling); training minimises its NLL directly.
* ``PixelCNNLikelihood`` (``vqkit.nn.pixelcnn``): a gated PixelCNN over the pixels, conditioned
  on the decoder's features, with PixelCNN++'s mixture and channel coupling.

Every likelihood maps the decoder's output ``params`` and the image to a ``LikelihoodOutput``
(training, evaluation) and ``params`` alone to an image (``reconstruct``): the mean of a
factorised likelihood, a sample drawn pixel by pixel from an ``autoregressive`` one.

The VQ-VAE posterior q(z|x) is one-hot, so KL(q || uniform prior) = log K for each latent
(section 3.1) and the ELBO in bits/dim is ``(NLL + latents * log K) / (subpixels * ln 2)``.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vqkit import distributed
from vqkit.errors import ConfigError

_HALF_BIN = 1.0 / 255.0
_EDGE = 0.999  # x beyond this is the first or last bin (x = -1 or 1)


@dataclass
class LikelihoodOutput:
    """``loss``: what training minimises (per subpixel); ``mean``: the expected image in
    [-1, 1], (B, C, H, W); ``nll``: -log p(x|z) in nats per image (B,), summed over its
    subpixels, computed by ``compute_nll`` when first read. The Gaussian's costs a ``log_ndtr``
    per subpixel, 23% of a faces-3level training step (513 against 394 ms at 1 thread), for a
    figure that training, minimising the MSE, never reads."""

    loss: torch.Tensor
    mean: torch.Tensor
    compute_nll: Callable[[], torch.Tensor] = field(repr=False)

    @functools.cached_property
    def nll(self) -> torch.Tensor:
        return self.compute_nll()


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


def discretized_logistic_exact_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under Logistic(mean, exp(log_scale)), elementwise, without the density
    standing in for small masses: with ``u``, ``l`` the standardised bin edges,
    ``log(sigmoid(u) - sigmoid(l)) = log sigmoid(u) + log sigmoid(-l) + log(1 - exp(l - u))``,
    free of cancellation in either tail, so that it is the log of the masses a sampler draws
    from (``discretized_logistic_masses``) wherever they are representable. The logistic mixture
    keeps ``discretized_logistic_log_prob``, which its models were trained with."""
    inv = torch.exp(-log_scale)
    upper = (x - mean + _HALF_BIN) * inv
    lower = (x - mean - _HALF_BIN) * inv
    log_cdf_upper = upper - F.softplus(upper)
    log_sf_lower = -F.softplus(lower)
    inner = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(-2 * _HALF_BIN * inv))
    return torch.where(x < -_EDGE, log_cdf_upper, torch.where(x > _EDGE, log_sf_lower, inner))


_INNER_EDGES = (torch.arange(255) + 0.5) / 127.5 - 1  # the upper edge of the bins of values 0..254


def discretized_logistic_masses(mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """The masses of the 256 values under Logistic(mean, exp(log_scale)): means and log-scales
    (...) -> (..., 256), the differences of the CDF at the 255 inner bin edges, the end bins
    taking the tails. They sum to 1 and are ``exp(discretized_logistic_exact_log_prob)`` up to
    rounding; one sigmoid per edge, so a sampler gets all 256 for the price of one."""
    edges = _INNER_EDGES.to(mean.device, mean.dtype)
    cdf = torch.sigmoid((edges - mean[..., None]) * torch.exp(-log_scale)[..., None])  # (..., 255)
    return torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[..., :1]), append=torch.ones_like(cdf[..., :1]))


class _Factorised(nn.Module, ABC):
    """What the likelihoods with independent subpixels given z share: their reconstruction is
    their mean, computed from ``params`` alone."""

    autoregressive = False

    @abstractmethod
    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, decoder_channels, H, W) -> the expected image (B, C, H, W)."""

    def reconstruct(self, params: torch.Tensor, generator: torch.Generator | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
        """Decoder output -> the expected image (B, C, H, W), as the conv decoder always gave;
        ``generator`` and ``temperature`` are the autoregressive likelihood's and change nothing."""
        return self.mean(params)


class GaussianLikelihood(_Factorised):
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
        # The variance as of this call: a later step's update must not change this output's NLL.
        log_scale = 0.5 * torch.log(self.variance.clamp(min=1e-8)).view(1, -1, 1, 1)
        mean = params.detach()

        @torch.no_grad()
        def nll() -> torch.Tensor:
            return -discretized_gaussian_log_prob(x, mean, log_scale).flatten(1).sum(1)

        return LikelihoodOutput(loss=sq.mean(), mean=params, compute_nll=nll)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.float()


class LogisticMixtureLikelihood(_Factorised):
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
        return LikelihoodOutput(loss=nll.mean() / x[0].numel(), mean=self.mean(params), compute_nll=nll.detach)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        logits, means, _ = self._split(params)
        return (F.softmax(logits, dim=1) * means).sum(1)


LIKELIHOODS = ("gaussian", "logistic_mixture", "pixelcnn")


def make_likelihood(config) -> nn.Module:
    """The likelihood ``config.likelihood`` (one of ``LIKELIHOODS``) of images with
    ``config.in_channels`` channels: ``config.mixtures`` logistic components (``logistic_mixture``
    and ``pixelcnn``) and the PixelCNN's ``pixelcnn_layers``, ``pixelcnn_channels`` and
    ``pixelcnn_kernel_size`` (``pixelcnn``). ``config`` is any model config with those fields."""
    kind = config.likelihood
    if kind == "gaussian":
        return GaussianLikelihood(config.in_channels)
    if kind == "logistic_mixture":
        return LogisticMixtureLikelihood(config.in_channels, config.mixtures)
    if kind == "pixelcnn":
        # Imported here: the PixelCNN likelihood builds on this module's distributions.
        from vqkit.nn.pixelcnn import PixelCNNLikelihood

        return PixelCNNLikelihood(config.in_channels, config.mixtures, config.pixelcnn_layers,
                                  config.pixelcnn_channels, config.pixelcnn_kernel_size)
    raise ConfigError(f"unknown likelihood {kind!r}: choose one of {', '.join(map(repr, LIKELIHOODS))}")


def bits_per_dim(nll_nats: float, subpixels: int, latents: Sequence[int], codebook_sizes: Sequence[int]) -> float:
    """ELBO bound in bits/dim: reconstruction NLL (nats, per image) plus log K_l nats for each of
    the ``latents[l]`` one-hot latents of every level ``l``, over ``subpixels`` values of the image."""
    log_k = sum(n * math.log(k) for n, k in zip(latents, codebook_sizes, strict=True))
    return (nll_nats + log_k) / (subpixels * math.log(2))
