"""Configuration of a stage-2 prior: everything needed to rebuild one, saved as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vqkit.config import JsonConfig
from vqkit.errors import ConfigError

ARCHS = ("pixelcnn", "pixelsnail")


@dataclass
class PriorConfig(JsonConfig):
    """An autoregressive prior over code maps (B, height, width) with values in [0, codebook_size).

    Args:
        arch: pixelcnn (gated PixelCNN) or pixelsnail (gated residual convolutions with causal
            self-attention).
        codebook_size: K, the number of codes.
        height: rows of the code maps.
        width: columns of the code maps.
        channels: channels of every layer.
        layers: gated layers (gated PixelCNN) or gated residual blocks (PixelSNAIL).
        kernel_size: side of the causal convolutions (odd, >= 3).
        attention_heads: heads of each PixelSNAIL attention layer.
        attention_every: PixelSNAIL adds a causal self-attention layer after every this many blocks.
        dropout: dropout rate inside the layers.
        num_classes: makes the prior class-conditional (a label embedding enters every layer).
        cond_channels: > 0 makes the prior take a float map (B, cond_channels, height, width)
            that enters every layer through a 1x1 convolution.
        cond_codes: the code maps of coarser levels the prior is conditioned on (VQ-VAE-2: the
            bottom prior on the top map), one [codebook_size, height, width] per map, in the
            order forward(..., cond_codes=[...]) takes them; each map's height and width must
            divide the prior's by an integer factor.
        cond_layers: residual blocks of the conditioning stack of each cond_codes map (see
            vqkit.prior.condition), whose output enters every layer beside cond.
    """

    label: ClassVar[str] = "prior config"

    arch: str = "pixelsnail"
    codebook_size: int = 512
    height: int = 8
    width: int = 8
    channels: int = 64
    layers: int = 6
    kernel_size: int = 3
    attention_heads: int = 4
    attention_every: int = 4
    dropout: float = 0.0
    num_classes: int | None = None
    cond_channels: int = 0
    cond_codes: list[list[int]] = field(default_factory=list)
    cond_layers: int = 2

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("codebook_size", "height", "width", "channels", "layers", "attention_heads",
                     "attention_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        # Even kernels have no centre column, and a 1-wide kernel gives the first (masked)
        # layer of the horizontal stack no inputs at all.
        if not isinstance(self.kernel_size, int) or self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be an odd integer >= 3, got {self.kernel_size!r}")
        if self.arch == "pixelsnail" and self.channels % self.attention_heads:
            raise ConfigError(f"channels ({self.channels}) must be divisible by attention_heads "
                             f"({self.attention_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ConfigError(f"num_classes must be None or a positive integer, got {self.num_classes!r}")
        if not isinstance(self.cond_channels, int) or self.cond_channels < 0:
            raise ConfigError(f"cond_channels must be an integer >= 0, got {self.cond_channels!r}")
        if not isinstance(self.cond_layers, int) or self.cond_layers < 0:
            raise ConfigError(f"cond_layers must be an integer >= 0, got {self.cond_layers!r}")
        if not isinstance(self.cond_codes, (list, tuple)):
            raise ConfigError(f"cond_codes must be a list of [codebook_size, height, width], got {self.cond_codes!r}")
        for index, spec in enumerate(self.cond_codes):
            if (not isinstance(spec, (list, tuple)) or len(spec) != 3
                    or not all(isinstance(v, int) and v >= 1 for v in spec)):
                raise ConfigError(f"cond_codes[{index}] must be [codebook_size, height, width] of positive "
                                 f"integers, got {spec!r}")
            _, h, w = spec
            if self.height % h or self.width % w:
                raise ConfigError(f"cond_codes[{index}]: a {h}x{w} map does not divide the prior's "
                                 f"{self.height}x{self.width} map by an integer factor")
        # Lists, as JSON gives them back, so that a round trip compares equal.
        self.cond_codes = [list(spec) for spec in self.cond_codes]
