"""Gated PixelCNN over code maps (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders").

The codes are embedded (C channels), the gated stack of ``vqkit.nn.gated`` (vertical and
horizontal stacks, no blind spot) runs over the embedded map in raster order, and the output
head is ``W2 relu(W1 relu(skip))`` -> K logits. Labels and the conditioning map add a
per-layer bias to both stacks' pre-activations (eq. 4-5).

Sampling incrementally: the stack's own incremental state (``GatedStackState``) gives the
skip sum one position at a time; the head turns it into that position's logits.
"""

from __future__ import annotations

import torch
from torch import nn

from vqkit.nn.gated import GatedStack, GatedStackState

from .base import IncrementalState, Prior
from .config import PriorConfig


class GatedPixelCNN(Prior):
    def __init__(self, config: PriorConfig):
        c = config.channels
        super().__init__(config, bias_channels=4 * c * config.layers)
        self.layers = GatedStack(c, config.kernel_size, config.layers, config.dropout)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, config.codebook_size))

    def logits_map(self, codes: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.layers(self.embed(codes), bias))

    def make_state(self, n: int, bias: torch.Tensor | None) -> _GatedPixelCNNState:
        return _GatedPixelCNNState(self, n, bias)


class _GatedPixelCNNState(IncrementalState):
    """The stack's incremental state, fed the embedded codes, and the head on its skip sums."""

    def __init__(self, prior: GatedPixelCNN, n: int, bias: torch.Tensor | None):
        self.prior = prior
        self.stack: GatedStackState = prior.layers.incremental(n, prior.config.height, prior.config.width, bias)

    def logits(self, i: int, j: int) -> torch.Tensor:
        return self.prior.head(self.stack.skip(i, j))

    def write(self, i: int, j: int, codes: torch.Tensor) -> None:
        self.stack.write(i, j, self.prior.embed.weight[codes])
