"""The conditioning stack: code maps of coarser levels -> a feature map at the prior's resolution.

In VQ-VAE-2 (Razavi et al. 2019, Algorithm 2) the prior of a lower level is conditioned on the
code maps of the levels above it, e.g. the bottom prior ``p(c_bottom | c_top)`` on the top map
at half its resolution. Each conditioning map ``m`` (B, h, w), with values in [0, K_m), goes
through its own small network, channels-first (B, C, h, w):

* ``nn.Embedding`` (K_m -> C),
* ``cond_layers`` residual blocks ``x + conv3x3(elu(conv3x3(elu(x))))`` at the map's own
  resolution. They are not causal: the whole conditioning map is known before the prior starts,
  so every position may see its neighbours on all sides;
* a transposed convolution with kernel = stride = (H / h, W / w), which upsamples by the integer
  factor and gives every position inside a coarse cell its own projection of that cell's
  features. Nearest-neighbour upsampling would hand the same vector to all of them, leaving a
  prior without positional encoding (the gated PixelCNN) unable to tell them apart.

The upsampled maps are concatenated, channels-last (B, H, W, C * number of maps), and the prior
projects them into its per-layer biases together with any float ``cond`` map. They depend on
the conditioning maps only, never on the prior's own codes, so causality is unaffected, and
the incremental sampler computes them once before the first position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.errors import UsageError


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class _MapStack(nn.Module):
    """One conditioning map (B, h, w) -> features (B, C, h * fy, w * fx)."""

    def __init__(self, codebook_size: int, channels: int, layers: int, factor: tuple[int, int]):
        super().__init__()
        self.embed = nn.Embedding(codebook_size, channels)
        self.blocks = nn.Sequential(*(_ResidualBlock(channels) for _ in range(layers)))
        self.upsample = nn.ConvTranspose2d(channels, channels, factor, stride=factor)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)
        return self.upsample(F.elu(self.blocks(x)))


class CodeConditioner(nn.Module):
    """The conditioning stacks of all maps ``specs`` = [[K, h, w], ...] for a prior of map size
    (height, width); ``channels`` features per map. The config validated that h divides height
    and w divides width."""

    def __init__(self, specs: list[list[int]], height: int, width: int, channels: int, layers: int):
        super().__init__()
        self.specs = [tuple(spec) for spec in specs]
        self.stacks = nn.ModuleList(_MapStack(k, channels, layers, (height // h, width // w))
                                    for k, h, w in self.specs)
        self.out_channels = channels * len(specs)

    def check(self, n: int, cond_codes: list[torch.Tensor] | None) -> None:
        """Raise a ValueError unless ``cond_codes`` is a list of one integer map (n, h, w) per spec,
        in the configured order, with values in [0, K) (None or [] when there are no specs)."""
        if not self.specs:
            # [] is accepted too: it is what a caller passing "the maps of the levels above" has
            # for the top level.
            if cond_codes is None or (isinstance(cond_codes, (list, tuple)) and len(cond_codes) == 0):
                return
            raise UsageError("cond_codes were given but the prior takes no conditioning code maps "
                             "(cond_codes=[] in its config)")
        expected = ", ".join(f"({n}, {h}, {w}) in [0, {k})" for k, h, w in self.specs)
        if cond_codes is None:
            raise UsageError(f"the prior is conditioned on {len(self.specs)} code map(s): pass "
                             f"cond_codes=[{expected}]")
        if isinstance(cond_codes, torch.Tensor) or not isinstance(cond_codes, (list, tuple)):
            raise UsageError(f"cond_codes must be a list of code maps [{expected}], got "
                             f"{type(cond_codes).__name__}")
        if len(cond_codes) != len(self.specs):
            raise UsageError(f"expected {len(self.specs)} conditioning code map(s) [{expected}], "
                             f"got {len(cond_codes)}")
        for index, (codes, (k, h, w)) in enumerate(zip(cond_codes, self.specs)):
            name = f"cond_codes[{index}]"
            if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != (n, h, w):
                got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
                raise UsageError(f"{name}: expected codes ({n}, {h}, {w}), got {got}")
            if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
                raise UsageError(f"{name}: codes must be an integer tensor, got {codes.dtype}")
            if codes.numel() and (codes.min() < 0 or codes.max() >= k):
                raise UsageError(f"{name}: codes must be in [0, {k}), got values in "
                                 f"[{int(codes.min())}, {int(codes.max())}]")

    def forward(self, cond_codes: list[torch.Tensor]) -> torch.Tensor:
        """Checked maps [(B, h, w), ...] -> features (B, H, W, out_channels), channels-last."""
        device = self.stacks[0].embed.weight.device
        features = [stack(codes.to(device, torch.long)) for stack, codes in zip(self.stacks, cond_codes)]
        return torch.cat(features, 1).permute(0, 2, 3, 1)
