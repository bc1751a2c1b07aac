"""The gated PixelCNN stack (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders") over any channels-last map in raster order: the code maps of the stage-2
prior (``vqkit.prior.pixelcnn``) and the pixels of the PixelCNN likelihood
(``vqkit.nn.pixelcnn``). Each caller embeds its own input and reads its own head off the skip
sum; the stack between them is this module.

Two stacks per layer, both channels-last (B, H, W, C):

* vertical: a (k//2 + 1) x k kernel over the rows above and the current row,
  ``v_pre = conv_v(v) + bias_v``, ``v' = tanh * sigmoid (v_pre)``. Row ``i`` of ``v`` depends
  on the inputs of rows ``<= i``.
* horizontal: a 1 x (k//2 + 1) kernel over the current row up to and including the current
  column (layer 0: strictly left of it, mask 'A'), plus ``W_vh v_pre`` shifted down by one row,
  so that the vertical stack only brings in rows strictly above:
  ``h_pre = conv_h(h) + shift_down(W_vh v_pre) + bias_h``, ``g = tanh * sigmoid (h_pre)``,
  ``[r, s] = W_out g``, ``h' = h + r`` (layer 0: ``h' = r``), ``skip += s``.

The skip sum at position ``i`` therefore depends on the inputs at positions strictly before
``i`` only. Unlike one masked 2-D kernel, the two stacks together see every earlier position
within the receptive field (no blind spot). Conditioning (labels, a spatial map) adds a
per-layer bias to ``v_pre`` and ``h_pre`` (eq. 4-5), ``4 C`` channels per layer.

Incrementally (``GatedStack.incremental``): once row ``i`` is complete its vertical stack is
computed for the whole row (all layers), giving the ``W_vh v_pre`` rows that the horizontal
stack of row ``i + 1`` needs; the horizontal stack is computed for one position per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.nn.causal import CausalConv, gate

LayerBias = tuple[torch.Tensor | None, torch.Tensor | None]


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel_size: int, first: bool):
        super().__init__()
        p = kernel_size // 2
        self.first = first
        self.vertical = CausalConv(channels, 2 * channels, [(-p, 1, -p, p + 1)], p)
        self.v_to_h = nn.Linear(2 * channels, 2 * channels)
        self.horizontal = CausalConv(channels, 2 * channels, [(0, 1, -p, 0 if first else 1)], p)
        self.out = nn.Linear(channels, 2 * channels)  # residual and skip halves


def _add(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


class GatedStack(nn.ModuleList):
    """``layers`` gated layers of ``channels`` channels (a module list, so that its weights are
    named ``<name>.<layer>.vertical...``, as the prior's were before the stack was shared).

    Args:
        channels: C, the width of both stacks and of the embedded input.
        kernel_size: k, the kernel's side (odd).
        layers: number of gated layers.
        dropout: dropout on each layer's gated horizontal output, in training mode.
    """

    def __init__(self, channels: int, kernel_size: int, layers: int, dropout: float = 0.0):
        super().__init__(GatedLayer(channels, kernel_size, first=(i == 0)) for i in range(layers))
        self.channels = channels
        self.kernel_size = kernel_size
        self.dropout = dropout

    @property
    def bias_channels(self) -> int:
        """Channels of the conditioning bias the stack takes: ``4 C`` per layer."""
        return 4 * self.channels * len(self)

    def layer_biases(self, bias: torch.Tensor | None) -> list[LayerBias]:
        """A bias (B, H, W, bias_channels) or None -> per layer (bias_v, bias_h), each (B, H, W, 2C) or None."""
        if bias is None:
            return [(None, None)] * len(self)
        return [tuple(b.chunk(2, -1)) for b in bias.chunk(len(self), -1)]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded input (B, H, W, C) and bias -> the skip sum (B, H, W, C); position ``i``
        of it depends on the input at positions before ``i`` in raster order only."""
        v = h = x
        skip = None
        for layer, (bias_v, bias_h) in zip(self, self.layer_biases(bias)):
            v_pre = _add(layer.vertical(v), bias_v)
            vh = F.pad(layer.v_to_h(v_pre), (0, 0, 0, 0, 1, 0))[:, :-1]  # row i gets row i - 1
            h_pre = _add(layer.horizontal(h) + vh, bias_h)
            v = gate(v_pre)
            r, s = layer.out(F.dropout(gate(h_pre), self.dropout, self.training)).chunk(2, -1)
            h = r if layer.first else h + r
            skip = s if skip is None else skip + s
        return skip

    def incremental(self, n: int, height: int, width: int, bias: torch.Tensor | None) -> GatedStackState:
        """A state for computing ``n`` maps of (height, width) one position at a time (call
        under no_grad, in eval mode)."""
        return GatedStackState(self, n, height, width, bias)


class GatedStackState:
    """The stack over a batch of maps being written in raster order: the caller alternates
    ``skip(i, j)`` (the skip sum (n, C) at (i, j), given every input written so far) and
    ``write(i, j, x)`` (the embedded input (n, C) at (i, j)). The skip sums equal those of
    ``GatedStack.forward`` over a map holding the written inputs.

    Caches: the embedded input and each layer's vertical output (padded maps), each layer's
    horizontal output on the current row, and each layer's ``W_vh v_pre`` of the previous
    row. Each value is computed by the same operations as in ``forward``.
    """

    def __init__(self, stack: GatedStack, n: int, height: int, width: int, bias: torch.Tensor | None):
        self.stack = stack
        self.p = p = stack.kernel_size // 2
        self.height, self.width = height, width
        c = stack.channels
        like = stack[0].out.weight
        self.embedded = like.new_zeros(n, height + p, width + 2 * p, c)
        self.v = [like.new_zeros(self.embedded.shape) for _ in range(len(stack) - 1)]
        self.h = [like.new_zeros(n, 1, width + 2 * p, c) for _ in stack]
        self.vh = [like.new_zeros(n, width, 2 * c) for _ in stack]
        self.biases = stack.layer_biases(bias)

    def skip(self, i: int, j: int) -> torch.Tensor:
        p = self.p
        h_in, r_in = self.embedded, p + i
        skip = None
        for layer, h_out, vh, (_, bias_h) in zip(self.stack, self.h, self.vh, self.biases):
            h_pre = layer.horizontal.at(h_in, r_in, p + j) + vh[:, j]
            if bias_h is not None:
                h_pre = h_pre + bias_h[:, i, j]
            r, s = F.linear(gate(h_pre), layer.out.weight, layer.out.bias).chunk(2, -1)
            h = r if layer.first else h_in[:, r_in, p + j] + r
            h_out[:, 0, p + j] = h
            skip = s if skip is None else skip + s
            h_in, r_in = h_out, 0
        return skip

    def write(self, i: int, j: int, x: torch.Tensor) -> None:
        p = self.p
        self.embedded[:, p + i, p + j] = x
        if j == self.width - 1 and i < self.height - 1:
            self._finish_row(i)

    def _finish_row(self, i: int) -> None:
        """Vertical stack of the completed row ``i``, all layers."""
        p = self.p
        v_in = self.embedded
        for index, (layer, (bias_v, _)) in enumerate(zip(self.stack, self.biases)):
            v_pre = layer.vertical.row(v_in, p + i)
            if bias_v is not None:
                v_pre = v_pre + bias_v[:, i]
            self.vh[index] = layer.v_to_h(v_pre)
            if index < len(self.v):
                self.v[index][:, p + i, p:-p] = gate(v_pre)
                v_in = self.v[index]
