"""Causal convolutions over a map (codes or pixels) in raster order, as shifted taps and one matmul.

Maps are channels-last, ``(B, H, W, C)``. A causal kernel is a list of rectangles of offsets
``(dy0, dy1, dx0, dx1)`` (rows ``dy0 <= dy < dy1``, columns ``dx0 <= dx < dx1``) relative to
the output position, with ``dy <= 0``: the output at ``(i, j)`` reads no later row. Masked
kernels also keep ``dx <= 0`` on the row ``dy = 0`` and so read only positions at or before
``(i, j)`` in raster order; the gated PixelCNN's vertical stack reads the whole current row,
which is why its output reaches the horizontal stack only one row down. The layer is

    out[i, j] = W @ concat_{(dy, dx)} x[i + dy, j + dx] + b      (zero outside the map)

with the offsets in row-major order. The same weight matrix is applied to the same
concatenated window whether the whole map is computed at once (``forward``), one row at a
time (``row``) or one position at a time (``at``), which is what lets the incremental sampler
reproduce the full forward pass. Training alone computes the same layer another way, as one 2-D
convolution per rectangle (``forward`` in train mode with gradients on): it is faster, and no
sampler needs to reproduce its rounding.

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
        """Whole map: (B, H, W, in) -> (B, H, W, out).

        Training (train mode, gradients on) computes it as one 2-D convolution per rectangle,
        the linear weight's columns of that rectangle as its kernel: the same sums in another
        order of additions, and training steps 1.2-1.5x faster than with the concatenated
        taps' matmul (the priors and the PixelCNN decoder, 1 thread, AMD EPYC:
        ``benchmarks/bench_causal.py``). Every other pass uses the taps and the matmul that
        ``row`` and ``at`` repeat, so that an incremental sampler reproduces it exactly.
        """
        if self.training and torch.is_grad_enabled():
            return self._convolved(x)
        h, w = x.shape[1], x.shape[2]
        return self.linear(self._taps(pad_map(x, self.pad), self.pad, self.pad + h, w))

    def _convolved(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` as a sum of 2-D convolutions, one per rectangle, over x seen as (B, in, H, W)."""
        xc = x.permute(0, 3, 1, 2)  # a channels-last (B, in, H, W) view: oneDNN's own layout
        out = None
        start = 0
        for dy0, dy1, dx0, dx1 in self.rects:
            kh, kw = dy1 - dy0, dx1 - dx0
            end = start + kh * kw * x.shape[-1]
            # (out, in, kh, kw): the columns of the rectangle's taps, row-major, each ``in`` wide
            kernel = self.linear.weight[:, start:end].unflatten(1, (kh, kw, -1)).permute(0, 3, 1, 2)
            y = F.conv2d(F.pad(xc, (-dx0, dx1 - 1, -dy0, dy1 - 1)), kernel)  # rows dy0..dy1-1, columns dx0..dx1-1
            out = y if out is None else out + y
            start = end
        if self.linear.bias is not None:
            out = out + self.linear.bias.view(1, -1, 1, 1)
        return out.permute(0, 2, 3, 1)

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
