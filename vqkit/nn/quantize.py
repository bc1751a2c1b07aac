"""Vector quantization: the discrete bottleneck of VQ-VAE (van den Oord et al. 2017, section 3.1).

Names and shapes used throughout:

* ``z_e``: encoder output, with its D channels along the axis ``channel_dim``: feature maps
  ``(B, D, *spatial)`` with any number of spatial axes, none included (``channel_dim=1``, the
  default; VQ-VAE's ``(B, D, H, W)``), or sequences ``(B, N, D)`` (``channel_dim=-1``). Each
  of its ``N = numel / D`` positions is one D-dimensional vector to quantize, taken in the
  row-major order of the other axes, so ``(B, D, N)`` with ``channel_dim=1`` and its
  transpose ``(B, N, D)`` with ``channel_dim=-1`` quantize alike, bit for bit.
* ``codebook``: the K embedding vectors ``e_j``, ``(K, D)``.
* ``codes``: ``k = argmin_j ||z_e - e_j||_2`` (eq. 1), int64, ``z_e``'s shape without the
  channel axis (``(B, *spatial)`` or ``(B, N)``).
* ``z_q``: ``e_k``, ``z_e``'s shape, passed to the decoder with the straight-through
  gradient: the forward value is ``z_q``, the gradient w.r.t. ``z_e`` is the identity.

Loss (eq. 3 without the reconstruction term, means over elements)::

    ||sg[z_e] - e||^2  +  beta * ||z_e - sg[e]||^2
      codebook term         commitment term

so that, with ``M = N * D`` elements, ``d loss / d z_e = 2 beta (z_e - e_k) / M`` (plus the
decoder's gradient, passed straight through) and ``d loss / d e_i = sum_{j: k_j = i}
2 (e_i - z_e_j) / M``.

With ``ema=True`` the codebook term is dropped and the codebook follows exponential moving
averages of the vectors assigned to each code (appendix A.1)::

    N_i <- decay * N_i + (1 - decay) * n_i
    m_i <- decay * m_i + (1 - decay) * sum_{j: k_j = i} z_e_j
    e_i  = m_i / N~_i,   N~_i = (N_i + eps) / (sum N + K eps) * sum N   (Laplace smoothing)

All codebook maths runs in float32, whatever the dtype of ``z_e`` (float16, bfloat16, float32
or float64) and also under autocast: distances between nearby vectors and running averages
with decay 0.99 lose most of their digits in bfloat16/float16, and the codebook itself is
float32. The losses, perplexity and usage are float32. ``z_q`` has the wider of ``z_e``'s
dtype and float32: float32 for float16, bfloat16 and float32 inputs, since rounding the
codebook rows down would throw away their precision and the gradients of several consumers
of ``z_q`` (VQ-VAE-2's upper levels feed two) would add up in half precision; float64 for
float64, so that the straight-through gradient reaches ``z_e`` unrounded. The gradient that
reaches ``z_e`` has ``z_e``'s dtype.

A batch of no vectors (``B = 0``, or a spatial axis of length 0) gives empty codes, an empty
``z_q`` and losses of exactly 0, not the 0/0 = NaN of a mean over nothing: an empty batch has
no error to report, a NaN would poison every sum of losses it entered, and a 0 that stays in
the autograd graph gives every parameter (the codebook included) a zero gradient, so that a
process with no rows still takes part in DistributedDataParallel's gradient all-reduce. In
training it is a step in which no code was used: the EMA moves towards zero counts (counts
and sums by the same factor, so the codebook shifts only through the smoothing) and dead-code
counters advance, while k-means initialisation and restarts, which need vectors to draw
from, wait for the next batch that has some.

Options (``VectorQuantizer`` arguments; all off by default, which is the quantizer above):

* ``cosine``: a cosine-similarity codebook. ``z_e`` and the codes are l2-normalised before the
  search and the losses, so ``k = argmax_j cos(z_e, e_j)`` and ``z_q = e_k / ||e_k||``; the
  straight-through gradient passes the normalisation's own gradient back to ``z_e``.
* ``factor_dim = d``: factorised codes (ViT-VQGAN, Yu et al. 2022): a linear map ``W_in``
  (D -> d) takes ``z_e`` to the small space of the codebook ``(K, d)``, where the search, the
  losses and the EMA live, and ``W_out`` (d -> D) brings the chosen code back, so that
  ``z_q = W_out(e_k) + b_out`` (cosine normalises in the small space, after ``W_in``).
* ``rotation``: the rotation trick (Fifty et al. 2024, section 4.2) instead of the straight-
  through estimator. With ``e`` the vector to quantize (``z_e``, or its projection) and ``q``
  its code, the forward value is still ``q``, and the gradient that reaches ``e`` is
  ``(||q|| / ||e||) R^T g`` for the upstream gradient ``g``, where
  ``R = I - 2 w w^T + 2 q^ e^T/||e||`` (``q^ = q / ||q||``, ``w = (e/||e|| + q^) / ||.||``,
  both treated as constants) is the rotation taking ``e``'s direction to ``q``'s. The gradient
  keeps the angle that ``g`` makes with ``q`` as the angle it makes with ``e``, so the vectors
  of one code get different gradients by where they lie around it, where the straight-through
  estimator hands every one of them the same ``g``.

Data-parallel training: a quantizer communicates only when asked, with ``sync=True`` (the
default process group), ``sync=group`` (a ``torch.distributed`` ProcessGroup) or
``enable_sync(model)``, which vqkit's own training calls under ``torchrun``. A bare quantizer
inside someone's DistributedDataParallel keeps per-process statistics, each process's EMA
codebook following its own shard. With sync on, in a group of two or more, the codebook must
stay identical on every process of the group, so everything that changes it is computed over
the global batch, the group's local batches stacked in rank order: the EMA counts and sums
are all-reduced before the update (``cluster_statistics``), k-means runs Lloyd's steps on
all-reduced statistics, the counts that find dead codes are all-reduced, and the vectors that
seed k-means or restart dead codes are rows of the global batch chosen by the group's rank 0
(``distributed.rows_of_global_batch``). The processes may hold different numbers of rows,
none included: the statistics all-reduce has the same shape everywhere, and rows are drawn
over the true total after an all-gather of the per-process counts
(``distributed.batch_sizes``). Each training-mode forward pass is then a collective that
every process of the group must make, as with DistributedDataParallel; evaluation-mode
passes, ``encode`` and ``lookup`` never communicate, nor does anything outside a process
group of two or more.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqkit import distributed
from vqkit.errors import UsageError

# Rows of z per distance block: a (rows x K) float32 block is 4 MiB, small enough
# to stay in cache between the matmul that writes it and the argmin that reads it
# (measured best of 2^14..2^22 in benchmarks/bench_quantizer.py).
_CHUNK_ELEMENTS = 1 << 20

# Codes per group of the two-pass argmin, and the smallest K that takes it. torch.argmin's
# index-tracking reduction costs about as much as the matmul on Intel Xeons with AMX, where
# torch.amin, which tracks no index, runs ~10x faster; so for large K the minimum of each
# group of _GROUP_WIDTH distances comes first, and the index is searched only among the
# groups' minima and then inside the one winning group. Measured at N=16384, D=64 on an
# Intel Xeon with AMX (model 167), 1 and 2 threads: against torch.min 0.6-0.8x the time for
# K of 512..16384, best of widths 16..256 within 10%; no faster below K=512.
_GROUP_WIDTH = 64
_GROUPED_FROM_K = 512


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``argmin_j ||z_n - e_j||^2`` for each row of ``z`` (N, D) against ``codebook`` (K, D).

    Uses ``||z||^2 - 2 z.e + ||e||^2`` and drops ``||z||^2`` (constant per row), computing
    the distances in row blocks so memory stays O(N + block x K) instead of O(N x K).
    Returns int64 (N,): the first of equally near codes, as ``torch.argmin``, which also
    returns the first NaN distance's code; both searches below give exactly its indices.
    """
    z = z.float()
    codebook = codebook.float()
    e_sq = codebook.square().sum(1)
    n, k = z.shape[0], codebook.shape[0]
    grouped = k >= _GROUPED_FROM_K
    # Grouped: the block's columns padded with +inf up to a whole number of groups; the
    # padding, never written by the matmul, is never the first minimum of a row.
    groups = -(-k // _GROUP_WIDTH) if grouped else 1
    width = groups * _GROUP_WIDTH if grouped else k
    rows = max(1, _CHUNK_ELEMENTS // width)
    codes = torch.empty(n, dtype=torch.long, device=z.device)
    dist = torch.full((min(rows, n), width), math.inf, dtype=torch.float32, device=z.device)
    nearest = torch.empty(min(rows, n), dtype=torch.float32, device=z.device)
    row_index = torch.arange(min(rows, n), device=z.device)
    codebook_t = codebook.t()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        m = stop - start
        block = dist[:m]
        torch.addmm(e_sq, z[start:stop], codebook_t, beta=1.0, alpha=-2.0, out=block[:, :k])
        if not grouped:
            # torch.min's indices are torch.argmin's, in about 0.8x its time.
            torch.min(block, dim=1, out=(nearest[:m], codes[start:stop]))
            continue
        by_group = block.view(m, groups, _GROUP_WIDTH)
        group = by_group.amin(2).argmin(1)  # (m,) first group holding the row's minimum
        inner = by_group[row_index[:m], group].argmin(1)  # (m,) its place in that group
        torch.add(inner, group, alpha=_GROUP_WIDTH, out=codes[start:stop])
    return codes


@torch.no_grad()
def cluster_statistics(flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor, k: int, *,
                       sync: bool = False, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_i`` (K,) and ``s_i = sum_{j: k_j = i} z_j`` (K, D) of the rows ``flat`` (N, D)
    assigned ``codes`` (N,) with ``counts = bincount(codes)``; with ``sync``, summed over the
    processes of ``group`` (all of them when None) in one all-reduce of K x (D+1), which the
    processes make whatever their N (zero included).

    Float32, also under autocast: the counts stay exact up to 2**24 per code and the sums keep
    the digits that the EMA with decay 0.99 accumulates; bfloat16 keeps 8 bits of mantissa.
    """
    sums = torch.zeros(k, flat.shape[1], dtype=torch.float32, device=flat.device)
    sums.index_add_(0, codes, flat.float())
    counts = counts.float()
    if sync and distributed.active(group):
        both = distributed.all_reduce_sum(torch.cat([counts.unsqueeze(1), sums], 1), group)
        counts, sums = both[:, 0], both[:, 1:]
    return counts, sums


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(-sum_i p_i log p_i)`` with ``p = counts / sum(counts)``: the effective number of
    codes in use (1 when one code takes everything, K when all are used equally; 1 for no
    counts at all)."""
    p = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss``, but 0 for tensors of no elements (where the mean is 0/0), still joined to
    the graph of both so that their parameters get zero gradients rather than none."""
    return F.mse_loss(a, b) if a.numel() else (a - b).square().sum()


class _NormalizeRows(torch.autograd.Function):
    """``F.normalize(x, dim=1)`` (rows divided by ``max(||x||, eps)``) with a lean backward:
    it saves the output and the norms only, and computes ``dx = (g - y (y.g)) / ||x||`` (``g /
    eps`` for rows shorter than eps) in row blocks, where autograd's version keeps several
    (N, d) temporaries of the division and the norm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        norm = x.norm(dim=1, keepdim=True).clamp_(min=eps)  # (N, 1)
        y = x / norm
        ctx.save_for_backward(y, norm)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, norm = ctx.saved_tensors
        out = torch.empty_like(grad)
        rows = max(1, _CHUNK_ELEMENTS // (4 * max(y.shape[1], 1)))
        for start in range(0, y.shape[0], rows):
            block = slice(start, start + rows)
            y_b, n_b, g = y[block], norm[block], grad[block]
            radial = torch.where(n_b > ctx.eps, (y_b * g).sum(1, keepdim=True), 0)
            out[block] = (g - y_b * radial) / n_b
        return out, None


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of ``x`` (N, d) scaled to unit length (``F.normalize(x, dim=1, eps=eps)``)."""
    return _NormalizeRows.apply(x, eps)


class _RotationTrick(torch.autograd.Function):
    """Forward ``q``; backward ``(||q|| / ||e||) R^T g`` to ``e`` and nothing to ``q``. Saves
    only ``e`` and ``q``, which the losses keep alive anyway, and forms the rotation in the
    backward pass: ``R^T g = g - 2 (g.w) w + 2 (g.q^) e^``."""

    @staticmethod
    def forward(ctx, e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(e, q)
        return q.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        e, q = ctx.saved_tensors
        out = torch.empty_like(grad)
        # In row blocks, so that the half-dozen (rows, d) temporaries stay small and in cache.
        rows = max(1, _CHUNK_ELEMENTS // (4 * max(e.shape[1], 1)))
        tiny = torch.finfo(e.dtype).tiny
        for start in range(0, e.shape[0], rows):
            block = slice(start, start + rows)
            e_b, q_b, g = e[block], q[block], grad[block]
            e_norm = e_b.norm(dim=1, keepdim=True)  # (rows, 1)
            q_norm = q_b.norm(dim=1, keepdim=True)
            e_hat = e_b / e_norm.clamp(min=tiny)
            q_hat = q_b / q_norm.clamp(min=tiny)
            w = F.normalize(e_hat + q_hat, dim=1)
            scale = torch.where(e_norm > 0, q_norm / e_norm.clamp(min=tiny), 0)
            out[block] = scale * (g - 2 * (g * w).sum(1, keepdim=True) * w
                                  + 2 * (g * q_hat).sum(1, keepdim=True) * e_hat)
        return out, None


def rotate_to(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, section 4.2): ``q``'s value with the gradient
    ``(||q|| / ||e||) R^T g`` w.r.t. ``e``, for rows ``e`` and ``q`` (N, d) of one dtype (see
    the module docstring for R), R never formed. A zero row (no direction) gets a zero
    gradient, and ``e`` opposite to ``q`` (``w = 0``) the reflection ``R = I + 2 q^ e^T/||e||``,
    still a rotation of ``e``'s direction onto ``q``'s."""
    return _RotationTrick.apply(e, q.detach())


def _sync_setting(sync) -> tuple[bool, object]:
    """``(sync, group)`` for a ``sync`` argument of ``VectorQuantizer``: a bool (the default
    group, None) or a ProcessGroup (sync over it)."""
    if isinstance(sync, bool):
        return sync, None
    if torch.distributed.is_available() and isinstance(sync, torch.distributed.ProcessGroup):
        return True, sync
    # torch.distributed.new_group hands processes outside the group a placeholder (an int).
    raise UsageError(f"sync must be a bool or a torch.distributed ProcessGroup that this process "
                     f"belongs to, got {sync!r}")


@dataclass
class QuantizerOutput:
    """What one quantizer pass returns.

    ``z_q`` (``z_e``'s shape) carries the straight-through (or rotation-trick) gradient;
    ``codes`` (``z_e``'s shape without the channel axis); ``loss = codebook_loss + beta *
    commitment_loss`` (codebook term zero with EMA; LFQ's entropy penalty in its place, FSQ's
    all zero; all three 0 for an empty batch); ``perplexity`` and ``usage`` (fraction of the K
    codes hit) describe this batch only (the global batch under sync). ``ResidualVQ`` gives
    one ``perplexity`` and ``usage`` per stage.
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor

    @classmethod
    def of_counts(cls, z_q: torch.Tensor, codes: torch.Tensor, codebook_loss: torch.Tensor,
                  commitment_loss: torch.Tensor, beta: float, counts: torch.Tensor) -> QuantizerOutput:
        """The output of a pass whose codes hit each of the K codes ``counts`` (K,) times."""
        return cls(z_q=z_q, codes=codes, loss=codebook_loss + beta * commitment_loss,
                   codebook_loss=codebook_loss, commitment_loss=commitment_loss,
                   perplexity=perplexity(counts), usage=(counts > 0).float().mean())


class Quantizer(nn.Module, ABC):
    """What every quantizer of vqkit shares (``VectorQuantizer``, ``FSQ``, ``LFQ``): K =
    ``codebook_size`` codes for inputs with D = ``dim`` channels along ``channel_dim``;
    ``forward`` -> ``QuantizerOutput``; ``encode`` -> integer codes in [0, K); ``lookup`` ->
    their vectors; ``sync`` as in the module docstring (``enable_sync`` switches it on)."""

    codebook_size: int
    dim: int
    channel_dim: int
    sync: bool
    group: object

    def _channel_axis(self, z_e: torch.Tensor) -> int:
        """``channel_dim`` as a non-negative axis of ``z_e``, after checking the input."""
        if not -z_e.dim() <= self.channel_dim < z_e.dim():
            raise UsageError(f"z_e of shape {tuple(z_e.shape)} has no axis {self.channel_dim} "
                             f"(channel_dim) to hold the {self.dim} channels")
        axis = self.channel_dim % z_e.dim()
        if z_e.shape[axis] != self.dim:
            raise UsageError(f"z_e of shape {tuple(z_e.shape)} has {z_e.shape[axis]} channels along "
                             f"axis {axis} but the quantizer has dimension {self.dim}")
        if not z_e.is_floating_point():
            raise UsageError(f"z_e must be a floating-point tensor, got {z_e.dtype}")
        return axis

    @staticmethod
    def _codes_shape(z_e: torch.Tensor, axis: int) -> tuple[int, ...]:
        return z_e.shape[:axis] + z_e.shape[axis + 1:]

    def _lookup_axis(self, codes: torch.Tensor) -> int:
        """The axis of ``lookup``'s output that takes the channels, after checking ``codes``."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise UsageError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise UsageError(f"codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        ndim = codes.dim() + 1
        if not -ndim <= self.channel_dim < ndim:
            raise UsageError(f"codes of shape {tuple(codes.shape)} have no axis {self.channel_dim} "
                             f"to put the channels back at (channel_dim={self.channel_dim})")
        return self.channel_dim % ndim

    def _synced(self) -> bool:
        """Whether this quantizer's updates are computed over a group of two or more."""
        return self.sync and distributed.active(self.group)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """The code vectors of integer ``codes`` (any shape), float32, with the channel axis
        inserted at ``channel_dim``: ``lookup(encode(z_e))`` has ``z_e``'s shape."""
        axis = self._lookup_axis(codes)
        with torch.autocast(device_type=codes.device.type, enabled=False):
            return self._vectors(codes).movedim(-1, axis)

    @abstractmethod
    def _vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """The vectors of valid ``codes``, channels last: (*codes.shape, D) float32."""

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """The vector of every code, (K, D) float32: row ``k`` is ``lookup``'s for code ``k``."""
        device = next(iter((*self.parameters(), *self.buffers())), torch.zeros(())).device
        return self._vectors(torch.arange(self.codebook_size, device=device))


class _SkinnyLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` for rows ``x`` (N, a) -> (N, c) where one of a, c is small (the
    projections to and from a few code channels), with the backward's matmuls in the orders
    that BLAS runs fast for such shapes: both long products contract over N or the wide side
    with the long (N, *) operand untransposed, which autograd's ``g.t() @ x`` and ``g @ w`` do
    not when ``c`` is the wide side (1.4x the whole FSQ step at N=65536, D=64, d=4)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.addmm(b, x, w.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        wide_out = grad.shape[1] > x.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (w.t() @ grad.t()).t() if wide_out else grad @ w  # (N, a)
        if ctx.needs_input_grad[1]:
            grad_w = (x.t() @ grad).t() if wide_out else grad.t() @ x  # (c, a)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _linear(x: torch.Tensor, layer: nn.Linear | None) -> torch.Tensor:
    """``layer(x)`` for ``x`` (*, a), computed in ``x``'s dtype (float32 or float64, also under
    autocast); ``x`` itself when there is no layer."""
    if layer is None:
        return x
    rows = x.reshape(-1, x.shape[-1])  # (N, a)
    out = _SkinnyLinear.apply(rows, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
    return out.reshape(*x.shape[:-1], out.shape[1])


class VectorQuantizer(Quantizer):
    """Nearest-neighbour quantizer with a learned (or EMA) codebook, for inputs of any shape
    with a channel axis (see the module docstring for the shapes, dtypes, options and sync
    rules).

    Args:
        codebook_size: K, the number of codes.
        dim: D, the size of ``z_e``'s channel axis (and of each code vector, unless
            ``factor_dim``).
        beta: commitment weight (0.25 in the paper).
        ema: update the codebook by moving averages instead of the codebook loss (the
            codebook is then a buffer, not a parameter).
        decay: EMA decay of the counts and sums (with ``ema``).
        eps: Laplace smoothing constant of the EMA counts (with ``ema``).
        kmeans_init: on the first training batch with vectors, set the codebook by k-means
            on ``z_e``.
        kmeans_iters: Lloyd's steps of that k-means.
        restart_after: re-seed a code from the current batch's ``z_e`` once it has gone this
            many training steps unused (0 disables restarts).
        channel_dim: the axis of ``z_e`` that holds the D channels: 1 for ``(B, D, *spatial)``
            feature maps, -1 for ``(B, N, D)`` sequences. ``codes`` drop it and ``lookup``
            puts it back there.
        sync: keep the codebook identical across data-parallel processes by computing its
            updates over the global batch: False (the default) never communicates, True
            syncs over the default process group, a ``torch.distributed`` ProcessGroup over
            that group. A no-op outside a group of two or more. A quantizer holding a
            ProcessGroup cannot be pickled or deep-copied (process groups cannot be); copy it
            before switching sync on (``enable_sync``).
        cosine: a cosine-similarity codebook: vectors and codes l2-normalised.
        factor_dim: d < D for factorised codes: the codebook is (K, d), reached through
            learned projections D -> d -> D; None for none.
        rotation: the rotation trick's gradient instead of the straight-through estimator.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_after: int = 0,
        channel_dim: int = 1,
        sync: bool | torch.distributed.ProcessGroup = False,
        cosine: bool = False,
        factor_dim: int | None = None,
        rotation: bool = False,
    ):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise UsageError(f"codebook_size and dim must be positive, got {codebook_size}, {dim}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise UsageError(f"channel_dim must be an int, got {channel_dim!r}")
        if factor_dim is not None and (isinstance(factor_dim, bool) or not isinstance(factor_dim, int)
                                       or factor_dim < 1):
            raise UsageError(f"factor_dim must be a positive int or None, got {factor_dim!r}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.kmeans_iters = kmeans_iters
        self.restart_after = restart_after
        self.channel_dim = channel_dim
        self.sync, self.group = _sync_setting(sync)
        self.cosine = cosine
        self.rotation = rotation
        self.factor_dim = factor_dim
        # The space of the search: z_e's own, or the small one of factorised codes.
        self.code_dim = dim if factor_dim is None else factor_dim
        self.project_in = None if factor_dim is None else nn.Linear(dim, factor_dim)
        self.project_out = None if factor_dim is None else nn.Linear(factor_dim, dim)
        init = torch.empty(codebook_size, self.code_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))

    def extra_repr(self) -> str:
        options = "".join(f", {name}={getattr(self, name)}" for name in ("cosine", "factor_dim", "rotation")
                          if getattr(self, name))
        return (f"{self.codebook_size}, {self.dim}, ema={self.ema}, channel_dim={self.channel_dim}, "
                f"sync={self.sync}{options}")

    def _to_code_space(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of z_e (N, D) -> the vectors that are searched (N, d): projected, normalised."""
        rows = _linear(rows, self.project_in)
        return normalize_rows(rows) if self.cosine else rows

    def _codes_to_vectors(self) -> torch.Tensor:
        """The codebook as the search sees it, (K, d) float32: normalised for cosine."""
        codebook = self.codebook.float()
        return F.normalize(codebook, dim=1) if self.cosine else codebook

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z_e`` (D channels along ``channel_dim``, any other axes, any float dtype)
        into ``z_q`` (same shape) and ``codes`` (the shape without the channel axis); in
        training mode also update the codebook statistics (over the global batch under sync)."""
        axis = self._channel_axis(z_e)
        out_dtype = torch.promote_types(z_e.dtype, torch.float32)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            # rows in the output's dtype (no copy for float32), the codebook maths in float32.
            rows = z_e.to(out_dtype).movedim(axis, -1).reshape(-1, self.dim)  # (N, D)
            through = self._to_code_space(rows)  # (N, d)
            flat = through.float()
            if self.training and not bool(self.initialized):
                self._kmeans_init(flat.detach())
            codebook = self._codes_to_vectors()
            codes = nearest_codes(flat.detach(), codebook)
            counts = torch.bincount(codes, minlength=self.codebook_size)
            z_q_flat = F.embedding(codes, codebook)
            commitment = _mse(flat, z_q_flat.detach())
            if self.ema:
                codebook_loss = torch.zeros((), device=z_e.device)
            else:
                codebook_loss = _mse(z_q_flat, flat.detach())
            if self.training:
                with torch.no_grad():
                    if self.ema:
                        n, sums = cluster_statistics(flat, codes, counts, self.codebook_size,
                                                     sync=self.sync, group=self.group)
                        self._ema_update(n, sums)
                        counts = n.long()
                    elif self._synced():
                        counts = distributed.all_reduce_sum(counts, self.group)
                    if self.restart_after > 0:
                        self._restart_dead_codes(flat, counts)
            target = z_q_flat.to(out_dtype)
            if self.rotation:
                z_q_flat = rotate_to(through, target)
            else:
                z_q_flat = through + (target - through).detach()
            z_q_flat = _linear(z_q_flat, self.project_out)  # (N, D)
            z_q = z_q_flat.reshape(*self._codes_shape(z_e, axis), self.dim).movedim(-1, axis)
        return QuantizerOutput.of_counts(z_q, codes.reshape(self._codes_shape(z_e, axis)), codebook_loss,
                                         commitment, self.beta, counts)

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """Codes (``z_e``'s shape without the channel axis, int64) for ``z_e``, without
        touching any statistics or communicating."""
        axis = self._channel_axis(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            rows = z_e.float().movedim(axis, -1).reshape(-1, self.dim)
            codes = nearest_codes(self._to_code_space(rows), self._codes_to_vectors())
        return codes.reshape(self._codes_shape(z_e, axis))

    def _vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook rows (normalised for cosine; through ``W_out`` for factorised codes), so
        that ``lookup(encode(z_e))`` holds them bit for bit."""
        return _linear(F.embedding(codes, self._codes_to_vectors()), self.project_out)

    def _batch_sizes(self, flat: torch.Tensor) -> list[int]:
        """Rows of each process's batch: the global batch's layout under sync."""
        if self._synced():
            return distributed.batch_sizes(flat.shape[0], self.group, flat.device)
        return [flat.shape[0]]

    def _rows(self, flat: torch.Tensor, picks: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Rows ``picks`` of the global batch laid out as ``sizes``, on every process."""
        if self._synced():
            return distributed.rows_of_global_batch(flat, picks, sizes, self.group)
        return flat[picks]

    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self._codebook_from_ema()

    @torch.no_grad()
    def _codebook_from_ema(self) -> None:
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Codes unused for ``restart_after`` steps take random vectors of this batch's z_e,
        distinct rows while there are enough (the global batch's, chosen by rank 0, under sync:
        ``counts`` are then global too, so every process finds the same dead codes); with EMA
        their running statistics restart as if that vector had been seen once. With no vectors
        anywhere, the dead codes wait."""
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = torch.nonzero(self.unused_steps >= self.restart_after).squeeze(1)
        if dead.numel() == 0:
            return
        sizes = self._batch_sizes(flat)
        if sum(sizes) == 0:
            return
        n, m = sum(sizes), dead.numel()
        # Distinct rows where the batch has enough: two codes restarted on one vector tie, the
        # search gives it to the lower index, and the other is dead again on arrival. Drawn with
        # replacement, m picks of n rows repeat m - n (1 - exp(-m / n)) of them: a fifth at
        # m = n / 2, which large codebooks reach (K = 16,384 on CIFAR-10's 16,384-vector batches).
        picks = torch.randperm(n, device=flat.device)[:m] if n >= m else \
            torch.randint(n, (m,), device=flat.device)
        fresh = self._rows(flat, picks, sizes)
        if self.ema:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = fresh
            self._codebook_from_ema()
            # Smoothing moves a restarted code slightly; pin it to the chosen vector exactly.
            self.codebook[dead] = fresh
        else:
            self.codebook.data[dead] = fresh
        self.unused_steps[dead] = 0

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Lloyd's k-means on one batch of z_e (the global batch under sync); empty clusters
        are re-seeded at random. A batch of no vectors (anywhere) leaves it for the next."""
        k = self.codebook_size
        sizes = self._batch_sizes(flat)
        n = sum(sizes)
        if n == 0:
            return
        picks = torch.randperm(n, device=flat.device)[:k] if n >= k else \
            torch.randint(n, (k,), device=flat.device)
        centers = self._rows(flat, picks, sizes)
        counts = torch.zeros(k, device=flat.device)
        for _ in range(self.kmeans_iters):
            codes = nearest_codes(flat, centers)
            counts, sums = cluster_statistics(flat, codes, torch.bincount(codes, minlength=k), k,
                                              sync=self.sync, group=self.group)
            empty = counts == 0
            centers = torch.where(empty.unsqueeze(1), centers, sums / counts.clamp(min=1).unsqueeze(1))
            if empty.any():
                picks = torch.randint(n, (int(empty.sum()),), device=flat.device)
                centers[empty] = self._rows(flat, picks, sizes)
        self.codebook.data.copy_(centers)
        if self.ema:
            self.ema_count.copy_(counts.clamp(min=1))
            self.ema_sum.copy_(centers * self.ema_count.unsqueeze(1))
        self.initialized.fill_(True)


def enable_sync(module: nn.Module, group=None) -> int:
    """Switch every quantizer (``Quantizer``: VQ, FSQ, LFQ) in ``module`` (itself included) to sync over ``group``
    (the default process group when None); returns how many it switched. For data-parallel
    training, where each process's codebook must follow the global batch."""
    sync, group = _sync_setting(True if group is None else group)
    quantizers = [m for m in module.modules() if isinstance(m, Quantizer)]
    for quantizer in quantizers:
        quantizer.sync, quantizer.group = sync, group
    return len(quantizers)


class CodebookUsage:
    """Code counts accumulated over many batches (an epoch or an evaluation set).

    Batch perplexity and usage depend on the batch size; these figures do not.
    """

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        """Count ``codes``; -1 (a residual stage that quantize dropout left out of the pass) is no code."""
        codes = codes.flatten().cpu()
        self.counts += torch.bincount(codes[codes >= 0], minlength=len(self.counts))

    @property
    def used(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def fraction(self) -> float:
        return self.used / len(self.counts)

    @property
    def perplexity(self) -> float:
        return float(perplexity(self.counts))

    @property
    def bits(self) -> float:
        """Entropy of the code histogram in bits (log2 K at most)."""
        return math.log2(self.perplexity)
