"""Scalar quantizers with implicit codebooks: FSQ (Mentzer et al. 2023) and LFQ (Yu et al. 2023,
MAGVIT-v2). Each rounds every channel of a low-dimensional projection of ``z_e`` on its own, so the
K codes are a grid with nothing to learn, look up or restart: no codebook collapse.

Shapes, dtypes and empty batches as in ``vqkit.nn.quantize`` (same ``Quantizer`` interface: ``z_e``
with D channels along ``channel_dim``, ``codes`` int64 without that axis, ``lookup`` puts the
channels back; maths in float32, or float64 for float64 inputs, also under autocast). With
``d`` the number of scalar channels (``len(levels)`` for FSQ, ``bits`` for LFQ), a learned
linear map D -> d comes first and d -> D last when ``D != d`` (none when they are equal):
``z_q = W_out(grid point) + b_out``.

**FSQ**, levels ``L_i`` (i < d), ``K = prod L_i``. Each channel is bounded to ``L_i`` integer
values and rounded (section 3, with the half-shift that centres even levels)::

    h_i = (L_i - 1)(1 + eps) / 2,  o_i = 1/2 if L_i even else 0,  s_i = atanh(o_i / h_i)
    f(x)_i = h_i tanh(x_i + s_i) - o_i        in (-L_i/2, L_i/2) for even L_i, (-h_i, h_i) odd
    q_i = round(f(x)_i)                       in {-floor(L_i/2), ..., ceil(L_i/2) - 1}

with the straight-through gradient through the rounding, and the grid point ``q_i / floor(L_i/2)``
(in [-1, 1]) passed on. The code is the mixed-radix number of the digits ``q_i + floor(L_i/2)``,
the first channel the least significant: ``k = sum_i (q_i + floor(L_i/2)) prod_{j<i} L_j``. FSQ
has no loss (``loss`` is 0).

**LFQ**, ``bits = d``, ``K = 2**d``: ``q_i = sign(x_i)`` (+1 for ``x_i > 0``, else -1), the code
``k = sum_i [x_i > 0] 2**i``, straight-through gradient. Loss::

    beta * ||x - sg[q]||^2 (mean)  +  entropy_weight * (E_n[H(p(.|x_n))] - diversity * H(E_n[p(.|x_n)]))
        commitment                      entropy penalty (section 3.1): confident codes, all used

where ``p(c|x) = softmax_c(-||x - c||^2 / temperature)`` over the K corners ``c`` of {-1, 1}^d. It
factorises over the bits, ``p(c_i = +1 | x_i) = sigmoid(4 x_i / temperature)``, so the per-sample
entropy is the sum of d binary entropies; the batch entropy does not (a mean of products), and is
computed exactly over the K codes as one matmul of the two halves' corner probabilities
(``batch_entropy``), in O(N sqrt(K)) memory.
The penalty is computed in training mode only (it is a training signal; ``codebook_loss`` holds
it, 0 in evaluation); under data-parallel training each process's penalty uses its own batch.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqkit import distributed
from vqkit.errors import UsageError
from vqkit.nn.quantize import (
    Quantizer,
    QuantizerOutput,
    _linear,
    _mse,
    _sync_setting,
)


class _ScalarQuantizer(Quantizer):
    """The projections, counts and output of FSQ and LFQ; subclasses round (``_quantize``) and
    map codes to grid points (``_grid``)."""

    def __init__(self, codebook_size: int, dim: int, channels: int, channel_dim: int, sync):
        super().__init__()
        if dim < 1:
            raise UsageError(f"dim must be positive, got {dim}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise UsageError(f"channel_dim must be an int, got {channel_dim!r}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.channels = channels
        self.channel_dim = channel_dim
        self.sync, self.group = _sync_setting(sync)
        self.project_in = None if dim == channels else nn.Linear(dim, channels)
        self.project_out = None if dim == channels else nn.Linear(channels, dim)

    def extra_repr(self) -> str:
        return f"K={self.codebook_size}, dim={self.dim}, channel_dim={self.channel_dim}, sync={self.sync}"

    @abstractmethod
    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``x`` (N, d) -> ``(codes (N,), grid points (N, d) carrying the straight-through
        gradient, codebook_loss, commitment_loss)``."""

    @abstractmethod
    def _grid(self, codes: torch.Tensor) -> torch.Tensor:
        """The grid points of ``codes`` (any shape) -> (*codes.shape, d) float32."""

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z_e`` (D channels along ``channel_dim``, any other axes, any float dtype)
        into ``z_q`` (same shape) and ``codes`` (the shape without the channel axis)."""
        axis = self._channel_axis(z_e)
        out_dtype = torch.promote_types(z_e.dtype, torch.float32)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            rows = z_e.to(out_dtype).movedim(axis, -1).reshape(-1, self.dim)  # (N, D)
            codes, grid, codebook_loss, commitment = self._quantize(_linear(rows, self.project_in))
            z_q = _linear(grid, self.project_out).reshape(*self._codes_shape(z_e, axis), self.dim).movedim(-1, axis)
            counts = torch.bincount(codes, minlength=self.codebook_size)
            if self.training and self._synced():
                counts = distributed.all_reduce_sum(counts, self.group)
        return QuantizerOutput.of_counts(z_q, codes.reshape(self._codes_shape(z_e, axis)), codebook_loss,
                                         commitment, self.beta, counts)

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """Codes (``z_e``'s shape without the channel axis, int64) for ``z_e``."""
        axis = self._channel_axis(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            rows = z_e.float().movedim(axis, -1).reshape(-1, self.dim)
            codes = self._quantize(_linear(rows, self.project_in), losses=False)[0]
        return codes.reshape(self._codes_shape(z_e, axis))

    def _vectors(self, codes: torch.Tensor) -> torch.Tensor:
        return _linear(self._grid(codes), self.project_out)


class FSQ(_ScalarQuantizer):
    """Finite scalar quantization (see the module docstring).

    Args:
        levels: the number of values of each scalar channel, e.g. ``[8, 5, 5, 5]`` (K = 1,000);
            each >= 2.
        dim: D, the size of ``z_e``'s channel axis; projected to ``len(levels)`` channels and
            back when different.
        channel_dim: the axis of ``z_e`` that holds the D channels (1 for feature maps, -1 for
            sequences).
        sync: as ``VectorQuantizer``'s; FSQ has no state, so it only makes ``perplexity`` and
            ``usage`` describe the global batch.
        eps: the margin of the bound that keeps ``round`` off the half-integers at its ends.
    """

    beta = 0.0  # no commitment term

    def __init__(self, levels: Sequence[int], dim: int, channel_dim: int = 1,
                 sync: bool | torch.distributed.ProcessGroup = False, eps: float = 1e-3):
        levels = list(levels)
        if not levels or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in levels):
            raise UsageError(f"levels must be a non-empty list of integers >= 2, got {levels!r}")
        super().__init__(math.prod(levels), dim, len(levels), channel_dim, sync)
        self.levels = levels
        self.eps = eps
        radices = torch.tensor(levels)
        self.register_buffer("_levels", radices.double(), persistent=False)
        self.register_buffer("_half_width", (radices // 2).double(), persistent=False)
        # prod_{j<i} L_j: the place value of channel i's digit.
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0), persistent=False)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` (N, d): each channel squashed into the range that rounds to its L_i values."""
        levels = self._levels.to(x.dtype)
        half = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(x.dtype)
        shift = torch.atanh(offset / half)
        return torch.tanh(x + shift) * half - offset

    def _quantize(self, x: torch.Tensor, losses: bool = True):
        bounded = self.bound(x)
        rounded = torch.round(bounded)  # integers in [-floor(L/2), ceil(L/2) - 1]
        half_width = self._half_width.to(x.dtype)
        codes = ((rounded.detach() + half_width).long() * self._basis).sum(1)  # (N,)
        grid = (bounded + (rounded - bounded).detach()) / half_width
        zero = (x.sum() * 0).float()  # joined to the graph, so the projections get zero gradients
        return codes, grid, zero, zero

    def _grid(self, codes: torch.Tensor) -> torch.Tensor:
        digits = codes.unsqueeze(-1) // self._basis % self._levels.long()  # (*codes.shape, d)
        return ((digits - self._half_width.long()) / self._half_width).float()

    def grid_to_codes(self, grid: torch.Tensor) -> torch.Tensor:
        """The codes of grid points (*, d) (as ``lookup`` gives without projections): the
        inverse of ``_grid``, exact for every code."""
        digits = torch.round(grid.double() * self._half_width).long() + self._half_width.long()
        return (digits * self._basis).sum(-1)


def _corner_probs(a: torch.Tensor) -> torch.Tensor:
    """``p(c|x_n)`` over the 2**k corners c of k bits with logits ``a`` (N, k): (N, 2**k), bit i
    of c's index its bit i; ``log p = sum_i log sigmoid(-a_i) + a . bit`` (as
    ``log sigmoid(a) - log sigmoid(-a) = a``)."""
    k = a.shape[1]
    corners = torch.arange(2 ** k, device=a.device)
    bits = ((corners.unsqueeze(0) >> torch.arange(k, device=a.device).unsqueeze(1)) & 1).to(a.dtype)  # (k, 2**k)
    return torch.exp(torch.addmm(F.logsigmoid(-a).sum(1, keepdim=True), a, bits))


def batch_entropy(a: torch.Tensor) -> torch.Tensor:
    """``H(mean_n p(.|x_n))`` over all 2**d codes, exactly, for per-bit logits ``a`` (N, d).

    ``p(c|x_n)`` is a product over the bits, so with c split into its low and high bits,
    ``P(hi, lo) = (1/N) sum_n p_hi(hi|x_n) p_lo(lo|x_n)`` is one (2**(d - d/2), N) @ (N, 2**(d/2))
    matmul: O(N 2**(d/2)) memory and exponentials instead of the O(N 2**d) of the full softmax,
    and autograd differentiates it as it is."""
    n, d = a.shape
    low = d // 2
    p = _corner_probs(a[:, low:]).t() @ _corner_probs(a[:, :low]) / max(n, 1)  # (2**(d-low), 2**low)
    return -(p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))).sum()


class LFQ(_ScalarQuantizer):
    """Lookup-free quantization (see the module docstring).

    Args:
        bits: d, so K = 2**d codes (1 to 30).
        dim: D, the size of ``z_e``'s channel axis; projected to ``bits`` channels and back
            when different.
        beta: commitment weight.
        entropy_weight: weight of the entropy penalty (0.1 in MAGVIT-v2's reproductions).
        diversity: the weight of the batch entropy inside the penalty (1 in the paper).
        temperature: of the soft assignment ``p(c|x)``. vector-quantize-pytorch's 0.01 leaves the
            penalty no gradient once ``|x|`` nears 1 and collapses to 32 of 1,024 codes on
            CIFAR-10; 1 uses them all (README).
        channel_dim: the axis of ``z_e`` that holds the D channels.
        sync: as ``VectorQuantizer``'s; LFQ has no state, so it only makes ``perplexity`` and
            ``usage`` describe the global batch.
    """

    def __init__(self, bits: int, dim: int, beta: float = 0.25, entropy_weight: float = 0.1,
                 diversity: float = 1.0, temperature: float = 1.0, channel_dim: int = 1,
                 sync: bool | torch.distributed.ProcessGroup = False):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 30:
            raise UsageError(f"bits must be an integer in 1..30, got {bits!r}")
        if temperature <= 0:
            raise UsageError(f"temperature must be positive, got {temperature}")
        super().__init__(2 ** bits, dim, bits, channel_dim, sync)
        self.bits = bits
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.diversity = diversity
        self.temperature = temperature
        self.register_buffer("_places", 2 ** torch.arange(bits), persistent=False)

    def _quantize(self, x: torch.Tensor, losses: bool = True):
        positive = x.detach() > 0
        codes = (positive.long() * self._places).sum(1)  # (N,)
        q = positive.to(x.dtype) * 2 - 1
        grid = x + (q - x).detach()
        if not losses:
            return codes, grid, None, None
        x = x.float()
        commitment = _mse(x, q.float())
        entropy = x.sum() * 0  # joined to the graph, as FSQ's zero
        if self.training and self.entropy_weight and x.shape[0]:
            a = 4 * x / self.temperature  # (N, d): logit of bit i being 1
            p = torch.sigmoid(a)
            # H_b(p) = p softplus(-a) + (1 - p) softplus(a), summed over the independent bits.
            per_sample = (p * F.softplus(-a) + (1 - p) * F.softplus(a)).sum(1).mean()
            entropy = entropy + self.entropy_weight * (per_sample - self.diversity * batch_entropy(a))
        return codes, grid, entropy, commitment

    def _grid(self, codes: torch.Tensor) -> torch.Tensor:
        return ((codes.unsqueeze(-1) >> torch.arange(self.bits, device=codes.device)) & 1).float() * 2 - 1
