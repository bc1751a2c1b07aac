"""Convolutional encoder and decoder stacks of VQ-VAE (van den Oord et al. 2017, section 4.1).

Encoder: ``downsample`` strided 4x4 convolutions (stride 2, each halving the side), a 3x3
convolution, residual blocks, then a 1x1 projection to the code dimension D. Decoder: the
mirror image, ending in ``downsample`` transposed 4x4 convolutions of stride 2.
Residual block: ``x + conv1x1(relu(conv3x3(relu(x))))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vqkit.errors import ConfigError, UsageError
from vqkit.nn.likelihood import LIKELIHOODS


@dataclass
class TrunkConfig:
    """The fields of the encoder and decoder trunks and of the likelihood, which every stage-1
    model (VQ-VAE, VQ-VAE-2, the Gaussian VAE) shares.

    Args:
        in_channels: image channels (1 grey, 3 RGB).
        hidden: channels of the encoder and decoder trunks.
        res_hidden: channels inside each residual block.
        num_res_blocks: residual blocks in each encoder and decoder stack.
        code_dim: D, the channels of each latent vector (a code vector, or a Gaussian latent).
        likelihood: ``"gaussian"`` (trained by MSE), ``"logistic_mixture"`` or ``"pixelcnn"`` (an
            autoregressive decoder: a gated PixelCNN over the pixels, conditioned on the conv
            decoder's output; see ``vqkit.nn.pixelcnn``).
        mixtures: logistic components per subpixel (``logistic_mixture``) or per pixel (``pixelcnn``).
        pixelcnn_layers: gated layers of the PixelCNN likelihood (``pixelcnn`` only).
        pixelcnn_channels: channels of the PixelCNN, and of the conv decoder's output that
            conditions it (``pixelcnn`` only).
        pixelcnn_kernel_size: side of the PixelCNN's causal convolutions, odd, >= 3 (``pixelcnn`` only).
    """

    PIXELCNN_FIELDS: ClassVar[tuple[str, ...]] = ("pixelcnn_layers", "pixelcnn_channels", "pixelcnn_kernel_size")

    in_channels: int = 3
    hidden: int = 128
    res_hidden: int = 64
    num_res_blocks: int = 2
    code_dim: int = 64
    likelihood: str = "gaussian"
    mixtures: int = 5
    pixelcnn_layers: int = 4
    pixelcnn_channels: int = 32
    pixelcnn_kernel_size: int = 3

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        # Left out for the other likelihoods, so that the dicts (and fingerprints) of the models
        # made before they existed are unchanged.
        if self.likelihood != "pixelcnn":
            for name in self.PIXELCNN_FIELDS:
                del data[name]
        return data

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, "
                              f"got {self.likelihood!r}")
        for name in ("in_channels", "hidden", "res_hidden", "code_dim", "mixtures", "pixelcnn_layers",
                     "pixelcnn_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        k = self.pixelcnn_kernel_size
        if not isinstance(k, int) or k < 3 or k % 2 == 0:
            raise ConfigError(f"pixelcnn_kernel_size must be an odd integer >= 3, got {k!r}")
        if self.likelihood != "pixelcnn":
            # The dict leaves these out for other likelihoods, so a value set there would be lost.
            changed = [f.name for f in dataclasses.fields(TrunkConfig)
                       if f.name in self.PIXELCNN_FIELDS and getattr(self, f.name) != f.default]
            if changed:
                raise ConfigError(f"{', '.join(changed)} apply to likelihood='pixelcnn' only; "
                                  f"this config's likelihood is {self.likelihood!r}")
        if self.num_res_blocks < 0:
            raise ConfigError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")


class ImageModel:
    """What every stage-1 model (``VQVAE``, ``GaussianVAE``) derives from its ``config``: the
    number of levels, its device and the check of an image batch."""

    config: TrunkConfig

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_input(self, x: torch.Tensor) -> None:
        """A ``UsageError`` unless ``x`` is (B, in_channels, H, W) with H and W that the model's
        strides divide."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise UsageError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        self.config.latent_shapes(x.shape[2], x.shape[3])


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> z_e (B, out_channels, H / 2^downsample, W / 2^downsample)."""

    def __init__(self, in_channels: int, hidden: int, res_hidden: int, num_res_blocks: int,
                 downsample: int, out_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(downsample):
            width = hidden if i == downsample - 1 else max(hidden // 2, 1)
            layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU()]
            channels = width
        layers.append(nn.Conv2d(channels, hidden, 3, padding=1))
        layers += [ResidualBlock(hidden, res_hidden) for _ in range(num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(hidden, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, in_channels, h, w) -> (B, out_channels, h * 2^upsample, w * 2^upsample)."""

    def __init__(self, in_channels: int, hidden: int, res_hidden: int, num_res_blocks: int,
                 upsample: int, out_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1)]
        layers += [ResidualBlock(hidden, res_hidden) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        channels = hidden
        for i in range(upsample):
            last = i == upsample - 1
            width = out_channels if last else max(hidden // 2, 1)
            layers.append(nn.ConvTranspose2d(channels, width, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            channels = width
        if upsample == 0:
            layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
