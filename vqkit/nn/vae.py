"""A Gaussian VAE (Kingma and Welling 2014) on VQ-VAE's trunk: the model whose posterior
collapses under a strong decoder, kept beside VQ-VAE to show that VQ-VAE's does not.

With ``x`` (B, C, H, W) in [-1, 1] and ``s = 2**downsample``:

* Encoder (the VQ-VAE's, ``vqkit.nn.nets``) to ``2D`` channels, split into the posterior's mean
  ``mu`` and log-variance ``log sigma^2``, each (B, D, H/s, W/s): one diagonal Gaussian
  ``q(z|x) = N(mu, sigma^2)`` per latent, ``D * H/s * W/s`` latents per image.
* Reparameterisation: ``z = mu + sigma * eps``, ``eps ~ N(0, I)``, so the sample is a
  differentiable function of the encoder's output.
* Decoder and likelihood ``p(x|z)``: the VQ-VAE's, with ``z`` in place of ``z_q``.
* KL to the prior ``N(0, I)`` in closed form, per latent:
  ``KL = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)`` nats (``gaussian_kl``).
* Training minimises the negative ELBO, ``-log p(x|z) + KL``, per subpixel; in bits/dim,
  ``(NLL + KL) / (subpixels ln 2)``, the same bound as VQ-VAE's with ``KL = latents * log K``.
* Sampling: ``z ~ N(0, I)`` decoded (ancestral sampling).

Posterior collapse: the KL term pulls every ``q(z|x)`` towards the prior, and a decoder that can
model ``x`` without ``z`` (an autoregressive one) lets the optimum set ``KL = 0``, so ``z``
carries nothing. VQ-VAE's posterior is one-hot and its KL to the uniform prior is the constant
``log K``: nothing pulls it towards uninformative codes.

The likelihood must be a true one: ``"gaussian"``, which vqkit trains by MSE, would weigh the KL
term by an arbitrary factor, so it is refused; the default is the discretised logistic mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vqkit.config import JsonConfig
from vqkit.errors import ConfigError, UsageError
from vqkit.nn.likelihood import make_likelihood
from vqkit.nn.nets import Decoder, Encoder, ImageModel, TrunkConfig
from vqkit.nn.pretrained import PretrainedMixin

# Bounds of the encoder's log-variance: sigma from 3e-7 to 2e4, wide enough for any posterior
# the ELBO prefers and narrow enough that exp() never overflows in bf16 or float32.
_LOG_VAR_RANGE = (-30.0, 20.0)


@dataclass
class VAEConfig(TrunkConfig, JsonConfig):
    """Everything needed to rebuild a Gaussian VAE; saved as JSON beside its weights. The
    fields not listed here are those of every stage-1 model (``TrunkConfig``).

    Args:
        downsample: number of stride-2 convolutions: the latent map is ``2**downsample`` times
            smaller than the image per side.
        code_dim: D, Gaussian latents per position of the latent map.
        likelihood: ``"logistic_mixture"`` (a true likelihood, so the loss is the ELBO).
    """

    label: ClassVar[str] = "VAE config"
    kind: ClassVar[str] = "vae"

    downsample: int = 2
    code_dim: int = 8
    likelihood: str = "logistic_mixture"

    def __post_init__(self):
        super().__post_init__()
        if self.downsample < 0:
            raise ConfigError(f"downsample must be >= 0, got {self.downsample}")
        if self.likelihood == "gaussian":
            raise ConfigError("a VAE needs a true likelihood for its ELBO: 'gaussian' is trained by MSE, which "
                              "weighs the KL term arbitrarily; use 'logistic_mixture'")

    @property
    def num_levels(self) -> int:
        return 1

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latent map of an image of (height, width); a ``ConfigError`` if the image
        is not divisible by ``2**downsample``."""
        s = 2 ** self.downsample
        if height % s or width % s:
            raise ConfigError(f"image size {height}x{width} is not divisible by the model's stride {s} "
                              f"(downsample {self.downsample})")
        return height // s, width // s

    def latent_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``[latent_shape]``: the one map, as the VQ models list theirs."""
        return [self.latent_shape(height, width)]


@dataclass
class VAEOutput:
    """One forward pass.

    ``loss``: the negative ELBO per subpixel, ``recon_loss + kl.mean() / subpixels``;
    ``recon_loss``: the likelihood's training loss (NLL per subpixel); ``nll`` -log p(x|z) and
    ``kl`` KL(q(z|x) || N(0, I)), both in nats per image (B,); ``kl_per_latent``: the batch's
    mean KL per latent, nats; ``x_hat`` the likelihood's mean image (B, C, H, W); ``mean`` and
    ``log_var`` the posterior (B, D, h, w).
    """

    loss: torch.Tensor
    recon_loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    kl_per_latent: torch.Tensor
    x_hat: torch.Tensor
    mean: torch.Tensor
    log_var: torch.Tensor


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, 1)) in nats, elementwise, in float32."""
    mean, log_var = mean.float(), log_var.float()
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var)


class GaussianVAE(nn.Module, ImageModel, PretrainedMixin):
    """A VAE with a diagonal Gaussian posterior and a standard normal prior (module docstring).

    Args:
        config: a ``VAEConfig``.
    """

    model_type: ClassVar[str] = "vae"
    config_class: ClassVar[type] = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise ConfigError(f"GaussianVAE takes a VAEConfig, got {type(config).__name__}")
        self.config = c = config
        self.encoder = Encoder(c.in_channels, c.hidden, c.res_hidden, c.num_res_blocks, c.downsample,
                               2 * c.code_dim)
        self.likelihood = make_likelihood(c)
        self.decoder = Decoder(c.code_dim, c.hidden, c.res_hidden, c.num_res_blocks, c.downsample,
                               self.likelihood.decoder_channels)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> the posterior's mean and log-variance, each
        (B, D, h, w)."""
        self._check_input(x)
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var.clamp(*_LOG_VAR_RANGE)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """Images (B, C, H, W) in [-1, 1] -> the negative ELBO and its parts (``VAEOutput``),
        with one reparameterised sample of z per image."""
        mean, log_var = self.posterior(x)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)  # (B, D, h, w)
        rec = self.likelihood(self.decoder(z), x)
        kl_map = gaussian_kl(mean, log_var)
        kl = kl_map.flatten(1).sum(1)  # (B,)
        loss = rec.loss + kl.mean() / x[0].numel()
        return VAEOutput(loss=loss, recon_loss=rec.loss, nll=rec.nll, kl=kl, kl_per_latent=kl_map.mean(),
                         x_hat=rec.mean, mean=mean, log_var=log_var)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the posterior means (B, D, h, w): the latents
        that ``decode`` reconstructs from (not codes: a VAE's latents are continuous)."""
        return self.posterior(x)[0]

    @torch.no_grad()
    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Latents (B, D, h, w) -> images (B, C, H, W) in [-1, 1]: the likelihood's mean, or for an
        autoregressive one a sample drawn with ``generator`` at ``temperature``
        (``reconstruct``)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.config.code_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise UsageError(f"expected latents (B, {self.config.code_dim}, h, w), got {shape}")
        return self.likelihood.reconstruct(self.decoder(z), generator, temperature).clamp(-1, 1)

    @torch.no_grad()
    def nll(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) in nats per image (B,), for images (B, C, H, W) and latents (B, D, h, w)."""
        return self.likelihood(self.decoder(z), x).nll

    @torch.no_grad()
    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images (n, C, height, width) in [-1, 1] decoded from ``z ~ N(0, I)`` (ancestral
        sampling: ``generator`` draws z, then the pixels of an autoregressive likelihood)."""
        h, w = self.config.latent_shape(height, width)
        z = torch.randn(n, self.config.code_dim, h, w, generator=generator)  # (n, D, h, w)
        return self.decode(z.to(self.device), generator)


def elbo_bits_per_dim(nll_nats: float, kl_nats: float, subpixels: int) -> float:
    """The negative ELBO in bits/dim from the NLL and the KL, nats per image, over ``subpixels``
    values of the image."""
    return (nll_nats + kl_nats) / (subpixels * math.log(2))
