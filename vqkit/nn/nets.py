"""Convolutional encoder and decoder stacks of VQ-VAE (van den Oord et al. 2017, section 4.1).

Encoder: ``downsample`` strided 4x4 convolutions (stride 2, each halving the side), a 3x3
convolution, residual blocks, then a 1x1 projection to the code dimension D. Decoder: the
mirror image, ending in ``downsample`` transposed 4x4 convolutions of stride 2.
Residual block: ``x + conv1x1(relu(conv3x3(relu(x))))``.
"""

from __future__ import annotations

import torch
from torch import nn


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
