"""Gated PixelCNN over code maps (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders").

Two stacks per layer, both channels-last (B, H, W, C):

* vertical: a (k//2 + 1) x k kernel over the rows above and the current row,
  ``v_pre = conv_v(v) + bias_v``, ``v' = tanh * sigmoid (v_pre)``. Row ``i`` of ``v`` depends
  on the codes of rows ``<= i``.
* horizontal: a 1 x (k//2 + 1) kernel over the current row up to and including the current
  column (layer 0: strictly left of it, mask 'A'), plus ``W_vh v_pre`` shifted down by one row,
  so that the vertical stack only brings in rows strictly above:
  ``h_pre = conv_h(h) + shift_down(W_vh v_pre) + bias_h``, ``g = tanh * sigmoid (h_pre)``,
  ``[r, s] = W_out g``, ``h' = h + r`` (layer 0: ``h' = r``), ``skip += s``.

Unlike one masked 2-D kernel, the two stacks together see every earlier position within the
receptive field (no blind spot). The output head is ``W2 relu(W1 relu(skip))`` -> K logits.
Labels and the conditioning map add a per-layer bias to ``v_pre`` and ``h_pre`` (eq. 4-5).

Sampling incrementally: once row ``i`` is complete its vertical stack is computed for the
whole row (all layers), giving the ``W_vh v_pre`` rows that the horizontal stack of row
``i + 1`` needs; the horizontal stack and the head are computed for one position per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import IncrementalState, Prior
from .causal import CausalConv, gate
from .config import PriorConfig


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


class GatedPixelCNN(Prior):
    def __init__(self, config: PriorConfig):
        c = config.channels
        super().__init__(config, bias_channels=4 * c * config.layers)
        self.layers = nn.ModuleList(GatedLayer(c, config.kernel_size, first=(i == 0))
                                    for i in range(config.layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, config.codebook_size))

    def layer_biases(self, bias: torch.Tensor | None) -> list[tuple]:
        """Per layer (bias_v, bias_h), each (B, H, W, 2C) or None."""
        if bias is None:
            return [(None, None)] * len(self.layers)
        return [tuple(b.chunk(2, -1)) for b in bias.chunk(len(self.layers), -1)]

    def logits_map(self, codes: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        v = h = self.embed(codes)
        skip = None
        for layer, (bias_v, bias_h) in zip(self.layers, self.layer_biases(bias)):
            v_pre = _add(layer.vertical(v), bias_v)
            vh = F.pad(layer.v_to_h(v_pre), (0, 0, 0, 0, 1, 0))[:, :-1]  # row i gets row i - 1
            h_pre = _add(layer.horizontal(h) + vh, bias_h)
            v = gate(v_pre)
            r, s = layer.out(F.dropout(gate(h_pre), self.config.dropout, self.training)).chunk(2, -1)
            h = r if layer.first else h + r
            skip = s if skip is None else skip + s
        return self.head(skip)

    def make_state(self, n: int, bias: torch.Tensor | None) -> "_GatedPixelCNNState":
        return _GatedPixelCNNState(self, n, bias)


class _GatedPixelCNNState(IncrementalState):
    """Caches: the embedded codes and each layer's vertical output (padded maps), each
    layer's horizontal output on the current row, and each layer's ``W_vh v_pre`` of the
    previous row. Each value is computed by the same operations as in ``logits_map``."""

    def __init__(self, prior: GatedPixelCNN, n: int, bias: torch.Tensor | None):
        c = prior.config
        self.prior = prior
        self.p = p = c.kernel_size // 2
        self.height, self.width = c.height, c.width
        like = prior.embed.weight
        self.embedded = like.new_zeros(n, c.height + p, c.width + 2 * p, c.channels)
        self.v = [like.new_zeros(self.embedded.shape) for _ in prior.layers[:-1]]
        self.h = [like.new_zeros(n, 1, c.width + 2 * p, c.channels) for _ in prior.layers]
        self.vh = [like.new_zeros(n, c.width, 2 * c.channels) for _ in prior.layers]
        self.biases = prior.layer_biases(bias)

    def logits(self, i: int, j: int) -> torch.Tensor:
        p = self.p
        h_in, r_in = self.embedded, p + i
        skip = None
        for layer, h_out, vh, (_, bias_h) in zip(self.prior.layers, self.h, self.vh, self.biases):
            h_pre = layer.horizontal.at(h_in, r_in, p + j) + vh[:, j]
            if bias_h is not None:
                h_pre = h_pre + bias_h[:, i, j]
            r, s = F.linear(gate(h_pre), layer.out.weight, layer.out.bias).chunk(2, -1)
            h = r if layer.first else h_in[:, r_in, p + j] + r
            h_out[:, 0, p + j] = h
            skip = s if skip is None else skip + s
            h_in, r_in = h_out, 0
        return self.prior.head(skip)

    def write(self, i: int, j: int, codes: torch.Tensor) -> None:
        p = self.p
        self.embedded[:, p + i, p + j] = self.prior.embed.weight[codes]
        if j == self.width - 1 and i < self.height - 1:
            self._finish_row(i)

    def _finish_row(self, i: int) -> None:
        """Vertical stack of the completed row ``i``, all layers."""
        p = self.p
        v_in = self.embedded
        for index, (layer, (bias_v, _)) in enumerate(zip(self.prior.layers, self.biases)):
            v_pre = layer.vertical.row(v_in, p + i)
            if bias_v is not None:
                v_pre = v_pre + bias_v[:, i]
            self.vh[index] = layer.v_to_h(v_pre)
            if index < len(self.v):
                self.v[index][:, p + i, p:-p] = gate(v_pre)
                v_in = self.v[index]
