"""VQ-VAE (van den Oord et al. 2017): encoder -> vector quantizer -> decoder.

``x`` (B, C, H, W) in [-1, 1] -> ``z_e`` (B, D, H/s, W/s) -> ``codes`` (B, H/s, W/s) and
``z_q`` -> decoder -> likelihood parameters, with ``s = 2**downsample``. Training minimises
eq. 3: ``-log p(x|z_q) + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vqkit.config import JsonConfig
from vqkit.nn.likelihood import LikelihoodOutput, make_likelihood
from vqkit.nn.nets import Decoder, Encoder
from vqkit.nn.pretrained import PretrainedMixin
from vqkit.nn.quantize import VectorQuantizer


def check_network_fields(config) -> None:
    """Checks of the fields ``VQVAEConfig`` and ``VQVAE2Config`` have in common."""
    if config.likelihood not in ("gaussian", "logistic_mixture"):
        raise ValueError(f"likelihood must be 'gaussian' or 'logistic_mixture', got {config.likelihood!r}")
    for name in ("in_channels", "hidden", "res_hidden", "code_dim", "mixtures"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if config.num_res_blocks < 0 or config.restart_after < 0:
        raise ValueError("num_res_blocks and restart_after must be >= 0")


@dataclass
class VQVAEConfig(JsonConfig):
    """Everything needed to rebuild a VQ-VAE; saved as JSON beside its weights."""

    label: ClassVar[str] = "VQ-VAE config"

    in_channels: int = 3
    hidden: int = 128
    res_hidden: int = 64
    num_res_blocks: int = 2
    downsample: int = 2
    code_dim: int = 64
    codebook_size: int = 512
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.99
    kmeans_init: bool = True
    restart_after: int = 100
    likelihood: str = "gaussian"
    mixtures: int = 5

    def __post_init__(self):
        check_network_fields(self)
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {self.codebook_size}")
        if self.downsample < 0:
            raise ValueError(f"downsample must be >= 0, got {self.downsample}")

    @property
    def num_levels(self) -> int:
        return 1

    @property
    def codebook_sizes(self) -> list[int]:
        """One entry per level, as ``VQVAE2Config.codebook_sizes``."""
        return [self.codebook_size]

    def latent_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        return [self.latent_shape(height, width)]

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """The code map's (h, w) for an image of (height, width); errors if not divisible."""
        stride = 2 ** self.downsample
        if height % stride or width % stride:
            raise ValueError(f"image size {height}x{width} is not divisible by the model's "
                             f"stride {stride} (downsample={self.downsample})")
        return height // stride, width // stride


PRESETS: dict[str, VQVAEConfig] = {
    # Section 4.1: two stride-2 4x4 convolutions, two residual blocks, 256 hidden units,
    # K = 512; plain codebook loss as in the paper's main experiments. 32x32 -> 8x8 codes.
    "cifar10-paper": VQVAEConfig(in_channels=3, hidden=256, res_hidden=256, num_res_blocks=2,
                                 downsample=2, code_dim=64, codebook_size=512, ema=False,
                                 kmeans_init=False, restart_after=0),
    # Our CIFAR-10 preset for a CPU budget: one downsampling step (16x16 codes), 64 hidden
    # units (in 120 s of CPU training it beat 128 units by 1.7 dB: more steps per second),
    # EMA codebook with k-means initialisation and dead-code restarts. Train it with lr 1e-3.
    "cifar10": VQVAEConfig(in_channels=3, hidden=64, res_hidden=32, num_res_blocks=2,
                           downsample=1, code_dim=64, codebook_size=512),
    # 28x28 grey images (MNIST, Fashion-MNIST) -> 7x7 codes.
    "mnist": VQVAEConfig(in_channels=1, hidden=64, res_hidden=32, num_res_blocks=2,
                         downsample=2, code_dim=32, codebook_size=256),
    # Small enough to train in a couple of minutes on two CPU cores.
    "demo": VQVAEConfig(in_channels=1, hidden=48, res_hidden=24, num_res_blocks=1,
                        downsample=2, code_dim=16, codebook_size=128, restart_after=50),
}


def preset(name: str) -> VQVAEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


@dataclass
class VQVAEOutput:
    """One forward pass: ``loss`` = ``recon_loss + vq_loss``; ``x_hat`` the expected
    reconstruction (B, C, H, W) in [-1, 1]; ``nll`` -log p(x|z_q) in nats per image (B,)."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    vq_loss: torch.Tensor
    commitment_loss: torch.Tensor
    nll: torch.Tensor
    x_hat: torch.Tensor
    codes: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VQVAE(nn.Module, PretrainedMixin):
    model_type: ClassVar[str] = "vqvae"
    config_class: ClassVar[type] = VQVAEConfig

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.hidden, c.res_hidden, c.num_res_blocks,
                               c.downsample, c.code_dim)
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, beta=c.beta, ema=c.ema,
                                         decay=c.decay, kmeans_init=c.kmeans_init,
                                         restart_after=c.restart_after)
        self.likelihood = make_likelihood(c.likelihood, c.in_channels, c.mixtures)
        out_channels = self.likelihood.decoder_channels(c.in_channels, c.mixtures) \
            if c.likelihood == "logistic_mixture" else c.in_channels
        self.decoder = Decoder(c.code_dim, c.hidden, c.res_hidden, c.num_res_blocks,
                               c.downsample, out_channels)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        self.config.latent_shape(x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        self._check_input(x)
        q = self.quantizer(self.encoder(x))
        rec: LikelihoodOutput = self.likelihood(self.decoder(q.z_q), x)
        return VQVAEOutput(loss=rec.loss + q.loss, recon_loss=rec.loss, vq_loss=q.loss,
                           commitment_loss=q.commitment_loss, nll=rec.nll, x_hat=rec.mean,
                           codes=q.codes, perplexity=q.perplexity, usage=q.usage)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h, w) int64."""
        self._check_input(x)
        return self.quantizer.encode(self.encoder(x))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> expected images (B, C, H, W), clamped to [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes (B, h, w), got {tuple(codes.shape)}")
        return self.likelihood.mean(self.decoder(self.quantizer.lookup(codes))).clamp(-1, 1)
