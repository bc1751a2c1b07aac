"""Causal convolutions over a map (codes or pixels) in raster order, as shifted taps and one matmul.

Maps are channels-last, ``(B, H, W, C)``. A causal kernel is a list of rectangles of offsets
``(dy0, dy1, dx0, dx1)`` (rows ``dy0 <= dy < dy1``, columns ``dx0 <= dx < dx1``) relative to
the output position, with ``dy <= 0``: the output at ``(i, j)`` reads no later row. Masked
kernels also keep ``dx <= 0`` on the row ``dy = 0`` and so read only positions at or before
``(i, j)`` in raster order; the gated PixelCNN's vertical stack reads the whole current row,
which is why its output reaches the horizontal stack only one row down. The layer is

    out[i, j] = W @ concat_{(dy, dx)} x[i + dy, j + dx] + b      (zero outside the map)

with the offsets in row-major order. The same weight matrix is applied to the same
concatenated window whether the whole map is computed at once (training, ``forward``), one
row at a time (``row``) or one position at a time (``at``), which is what lets the
incremental sampler reproduce the full forward pass.

Every map a sampler caches is stored zero-padded by ``pad`` rows on top and ``pad`` columns on
each side (``pad_map``), so that a window never needs bounds checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.errors import UsageError

Rect = tuple[int, int, int, int]


def pad_map(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H + pad, W + 2 pad, C), zeros above, left and right."""
    return F.pad(x, (0, 0, pad, pad, pad, 0))


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation ``tanh(a) * sigmoid(b)`` of the two halves of the last dimension
    (van den Oord et al. 2016, eq. 2)."""
    a, b = x.chunk(2, -1)
    return torch.tanh(a) * torch.sigmoid(b)


class CausalConv(nn.Module):
    """A convolution whose kernel is the union of ``rects`` (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, rects: list[Rect], pad: int, bias: bool = True):
        super().__init__()
        self.rects = rects
        self.pad = pad
        self.offsets = [(dy, dx) for dy0, dy1, dx0, dx1 in rects
                        for dy in range(dy0, dy1) for dx in range(dx0, dx1)]
        if not all(-pad <= dy <= 0 and -pad <= dx <= pad for dy, dx in self.offsets):
            raise UsageError(f"offsets {self.offsets} reach a later row or beyond pad {pad}")
        self.linear = nn.Linear(len(self.offsets) * in_channels, out_channels, bias=bias)

    def _taps(self, xp: torch.Tensor, r0: int, r1: int, width: int) -> torch.Tensor:
        """Concatenated windows of the padded map for padded rows [r0, r1), all columns."""
        p = self.pad
        return torch.cat([xp[:, r0 + dy:r1 + dy, p + dx:p + dx + width] for dy, dx in self.offsets], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole map: (B, H, W, in) -> (B, H, W, out)."""
        h, w = x.shape[1], x.shape[2]
        return self.linear(self._taps(pad_map(x, self.pad), self.pad, self.pad + h, w))

    def row(self, xp: torch.Tensor, r: int) -> torch.Tensor:
        """One row: padded map (B, *, W + 2 pad, in), padded row index ``r`` -> (B, W, out)."""
        return self.linear(self._taps(xp, r, r + 1, xp.shape[2] - 2 * self.pad)).squeeze(1)

    def at(self, xp: torch.Tensor, r: int, c: int) -> torch.Tensor:
        """One position: padded map, padded coordinates ``(r, c)`` -> (B, out).

        Each rectangle is one slice whose row-major flattening is the taps' order, so this
        costs a few tensor operations instead of one per tap.
        """
        n = xp.shape[0]
        parts = [xp[:, r + dy0:r + dy1, c + dx0:c + dx1].reshape(n, -1) for dy0, dy1, dx0, dx1 in self.rects]
        window = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return F.linear(window, self.linear.weight, self.linear.bias)
