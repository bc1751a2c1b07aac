"""PixelSNAIL-style prior (Chen et al. 2018, "PixelSNAIL: An Improved Autoregressive
Generative Model"): causal gated residual convolutions interleaved with causal multi-head
self-attention over the raster order.

Channels-last (B, H, W, C) throughout; ``k`` = kernel_size, ``p = k // 2``.

* input: a masked k x k convolution of the embedded codes, mask 'A' (the rows above, and the
  current row strictly left of the current position), so ``x[i]`` depends on codes ``< i``.
* gated residual block: ``x + W_out dropout(tanh * sigmoid (conv_B(elu(x)) + bias))`` with
  conv_B the same mask plus the current position ('B'): ``x[i]`` still depends on codes ``< i``.
* attention, after every ``attention_every`` blocks: ``x + W_o MultiHead(q, k, v)`` with the
  query ``W_q (x_i + pos_i)`` and keys and values ``W_kv [x_j + pos_j, e_j]`` from position ``j``
  and its own code embedding ``e_j`` (as PixelSNAIL feeds the block's input to its keys and
  values). These depend on codes ``<= j``, so position ``i`` attends strictly earlier
  positions ``j < i``, plus a null slot (zero key, zero value) so that the first position has
  something to attend to. Every earlier code reaches the query directly, covering the blind
  spot of stacked masked convolutions (e.g. the end of the row above). ``pos`` is a learned
  2-D positional encoding, a row embedding plus a column embedding.
* head: ``W elu(x)`` -> K logits.

Sampling incrementally: when a row starts, the rows-above half of every masked convolution
is computed for the whole row; then every block is computed for one position per step, from
caches of each block's (padded) input map and, for attention, of the keys and values of the
positions already generated (those of position ``t`` are added when its code is written).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.nn.causal import CausalConv, gate

from .base import IncrementalState, Prior
from .config import PriorConfig

# Rows of the query block the incremental sampler multiplies (see _PixelSNAILState.logits).
_QUERY_TILE = 4
# Attention values are summed in blocks of this many slots (see ``attention_values``).
_SLOT_BLOCK = 256


class MaskedConv(nn.Module):
    """A k x k convolution masked to the rows above and the current row up to (mask 'B') or
    strictly before (mask 'A') the current column, as the sum of two convolutions: ``above``
    (the rows above) and ``left`` (the current row). Once a row starts, ``above`` no longer
    changes along it, so the incremental sampler computes it for the whole row at once and
    only ``left`` for each position."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, include_centre: bool):
        super().__init__()
        p = kernel_size // 2
        self.above = CausalConv(in_channels, out_channels, [(-p, 0, -p, p + 1)], p)
        self.left = CausalConv(in_channels, out_channels, [(0, 1, -p, 1 if include_centre else 0)], p, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.above(x) + self.left(x)


class GatedResidual(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dropout: float):
        super().__init__()
        self.conv = MaskedConv(channels, 2 * channels, kernel_size, include_centre=True)
        self.out = nn.Linear(channels, channels)
        self.dropout = dropout

    def update(self, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """``x`` plus the block's output from its pre-activation ``conv_B(elu(x)) + bias``."""
        return x + self.out(F.dropout(gate(pre), self.dropout, self.training))


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Queries (B, heads, M, d), keys (B, heads, S, d) -> scaled scores (B, heads, M, S)."""
    return (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)


def attention_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention weights (B, heads, M, S), values (B, heads, S, d) -> (B, heads, M, d).

    Summed over blocks of _SLOT_BLOCK slots in order: blocks that a query cannot see add
    exact zeros, so the incremental sampler, which passes only the slots up to the end of the
    current query's block, gets the same bits as the full pass.
    """
    out = probs[..., :_SLOT_BLOCK] @ v[..., :_SLOT_BLOCK, :]
    for start in range(_SLOT_BLOCK, v.shape[-2], _SLOT_BLOCK):
        out = out + probs[..., start:start + _SLOT_BLOCK] @ v[..., start:start + _SLOT_BLOCK, :]
    return out


class CausalAttention(nn.Module):
    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(channels, channels)
        self.key_value = nn.Linear(2 * channels, 2 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, embedded: torch.Tensor, pos: torch.Tensor,
                blocked: torch.Tensor) -> torch.Tensor:
        """x, embedded (B, H, W, C), pos (H, W, C), blocked (HW, HW + 1) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        d = c // self.heads
        a = x + pos
        q = self.query(a).reshape(b, h * w, self.heads, d).transpose(1, 2)
        kv = self.key_value(torch.cat([a, embedded], -1)).reshape(b, h * w, 2, self.heads, d)
        k, v = F.pad(kv, (0, 0, 0, 0, 0, 0, 1, 0)).permute(2, 0, 3, 1, 4)  # null slot first
        probs = attention_scores(q, k).masked_fill(blocked, float("-inf")).softmax(-1)
        return x + self.out(attention_values(probs, v).transpose(1, 2).reshape(b, h, w, c))


class PixelSNAIL(Prior):
    def __init__(self, config: PriorConfig):
        c = config.channels
        super().__init__(config, bias_channels=2 * c * config.layers)
        self.input = MaskedConv(c, c, config.kernel_size, include_centre=False)
        self.blocks = nn.ModuleList()
        for index in range(config.layers):
            self.blocks.append(GatedResidual(c, config.kernel_size, config.dropout))
            if (index + 1) % config.attention_every == 0:
                self.blocks.append(CausalAttention(c, config.attention_heads))
        self.row_pos = nn.Parameter(torch.randn(config.height, c) * 0.02)
        self.col_pos = nn.Parameter(torch.randn(config.width, c) * 0.02)
        n = config.height * config.width
        # Query i may look at slot 0 (null) and slots 1..i (positions 0..i-1).
        self.register_buffer("blocked", torch.ones(n, n + 1, dtype=torch.bool).triu(1), persistent=False)
        self.head = nn.Sequential(nn.ELU(), nn.Linear(c, config.codebook_size))

    def position_encoding(self) -> torch.Tensor:
        """(H, W, C)."""
        return self.row_pos[:, None, :] + self.col_pos[None, :, :]

    def layer_biases(self, bias: torch.Tensor | None) -> list:
        """One bias (B, H, W, 2C) or None per gated residual block."""
        return [None] * self.config.layers if bias is None else list(bias.chunk(self.config.layers, -1))

    def logits_map(self, codes: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        embedded = self.embed(codes)
        x = self.input(embedded)
        pos = self.position_encoding()
        biases = iter(self.layer_biases(bias))
        for block in self.blocks:
            if isinstance(block, GatedResidual):
                pre = block.conv(F.elu(x))
                b = next(biases)
                x = block.update(x, pre if b is None else pre + b)
            else:
                x = block(x, embedded, pos, self.blocked)
        return self.head(x)

    def make_state(self, n: int, bias: torch.Tensor | None) -> "_PixelSNAILState":
        return _PixelSNAILState(self, n, bias)


class _PixelSNAILState(IncrementalState):
    """Caches: the embedded codes and the input ``elu(x)`` of every gated block as padded
    maps, and the ``above`` half of every masked convolution for the current row; for every
    attention layer, its input ``x + pos`` at the current position and the keys and values of
    all H*W + 1 slots (zeros ahead of the current one, which the scores never reach)."""

    def __init__(self, prior: PixelSNAIL, n: int, bias: torch.Tensor | None):
        c = prior.config
        self.prior = prior
        self.p = p = c.kernel_size // 2
        self.width = c.width
        like = prior.embed.weight
        self.embedded = like.new_zeros(n, c.height + p, c.width + 2 * p, c.channels)
        self.input_above = None
        self.pos = prior.position_encoding()
        biases = iter(prior.layer_biases(bias))
        self.caches: list = []
        for block in prior.blocks:
            if isinstance(block, GatedResidual):
                self.caches.append([like.new_zeros(self.embedded.shape), next(biases), None])
            else:
                d = c.channels // block.heads
                keys, values = like.new_zeros(2, n, block.heads, c.height * c.width + 1, d)
                self.caches.append([keys, values, None])

    def _start_row(self, i: int) -> None:
        """The ``above`` halves of the masked convolutions for row ``i``, (n, W, channels)."""
        r = self.p + i
        self.input_above = self.prior.input.above.row(self.embedded, r)
        for block, cache in zip(self.prior.blocks, self.caches):
            if isinstance(block, GatedResidual):
                cache[2] = block.conv.above.row(cache[0], r)

    def logits(self, i: int, j: int) -> torch.Tensor:
        p, prior = self.p, self.prior
        if j == 0:
            self._start_row(i)
        x = self.input_above[:, j] + prior.input.left.at(self.embedded, p + i, p + j)
        n, c = x.shape
        t = i * self.width + j
        for block, cache in zip(prior.blocks, self.caches):
            if isinstance(block, GatedResidual):
                inputs, bias, above = cache
                inputs[:, p + i, p + j] = F.elu(x)
                pre = above[:, j] + block.conv.left.at(inputs, p + i, p + j)
                x = block.update(x, pre if bias is None else pre + bias[:, i, j])
            else:
                keys, values, _ = cache
                cache[2] = a = x + self.pos[i, j]
                q = F.linear(a, block.query.weight, block.query.bias).reshape(n, block.heads, 1, -1)
                # Same arithmetic as ``forward``, restricted to the slots up to the end of the
                # query's block (see ``attention_values``), with the query padded by zero rows
                # to _QUERY_TILE rows: BLAS (MKL) multiplies matrices of 1-3 rows with a
                # kernel that rounds differently from the one the full pass uses. Slots 0..t
                # are open; filling the rest with -inf is what the full pass's mask does.
                end = min(-(-(t + 1) // _SLOT_BLOCK) * _SLOT_BLOCK, keys.shape[2])
                scores = attention_scores(F.pad(q, (0, 0, 0, _QUERY_TILE - 1)), keys[:, :, :end])
                scores[..., t + 1:] = float("-inf")
                out = attention_values(scores.softmax(-1), values[:, :, :end])[:, :, 0]
                x = x + block.out(out.reshape(n, c))
        return prior.head(x)

    def write(self, i: int, j: int, codes: torch.Tensor) -> None:
        embedded = self.prior.embed.weight[codes]
        self.embedded[:, self.p + i, self.p + j] = embedded
        slot = i * self.width + j + 1
        for block, cache in zip(self.prior.blocks, self.caches):
            if isinstance(block, CausalAttention):
                keys, values, a = cache
                kv = block.key_value(torch.cat([a, embedded], 1)).reshape(a.shape[0], 2, block.heads, -1)
                keys[:, :, slot] = kv[:, 0]
                values[:, :, slot] = kv[:, 1]
