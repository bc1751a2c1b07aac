"""Vector quantization: the discrete bottleneck of VQ-VAE (van den Oord et al. 2017, section 3.1).

Names and shapes used throughout:

* ``z_e``: encoder output, ``(B, D, H, W)``; each of the ``N = B*H*W`` positions is one
  D-dimensional vector to quantize.
* ``codebook``: the K embedding vectors ``e_j``, ``(K, D)``.
* ``codes``: ``k = argmin_j ||z_e - e_j||_2`` (eq. 1), ``(B, H, W)`` int64.
* ``z_q``: ``e_k``, ``(B, D, H, W)``, passed to the decoder with the straight-through
  gradient: the forward value is ``z_q``, the gradient w.r.t. ``z_e`` is the identity.

Loss (eq. 3 without the reconstruction term, means over elements)::

    ||sg[z_e] - e||^2  +  beta * ||z_e - sg[e]||^2
      codebook term         commitment term

With ``ema=True`` the codebook term is dropped and the codebook follows exponential moving
averages of the vectors assigned to each code (appendix A.1)::

    N_i <- decay * N_i + (1 - decay) * n_i
    m_i <- decay * m_i + (1 - decay) * sum_{j: k_j = i} z_e_j
    e_i  = m_i / N~_i,   N~_i = (N_i + eps) / (sum N + K eps) * sum N   (Laplace smoothing)

All codebook maths runs in float32, also under autocast: distances between nearby vectors
and running averages with decay 0.99 lose most of their digits in bfloat16/float16.

Data-parallel training (``vqkit.distributed``): the codebook must stay identical on every
process, so everything that changes it is computed over the global batch. The EMA counts and
sums are all-reduced before the update (``cluster_statistics``), k-means runs Lloyd's steps
on all-reduced statistics, and the vectors that seed k-means or restart dead codes are rows
of the global batch chosen by rank 0 (``distributed.rows_of_global_batch``). Outside a
process group none of this communicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqkit import distributed

# Rows of z per distance block: a (rows x K) float32 block is 4 MiB, small enough
# to stay in cache between the matmul that writes it and the argmin that reads it
# (measured best of 2^14..2^22 in benchmarks/bench_quantizer.py).
_CHUNK_ELEMENTS = 1 << 20


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``argmin_j ||z_n - e_j||^2`` for each row of ``z`` (N, D) against ``codebook`` (K, D).

    Uses ``||z||^2 - 2 z.e + ||e||^2`` and drops ``||z||^2`` (constant per row), computing
    the distances in row blocks so memory stays O(N + block x K) instead of O(N x K).
    Returns int64 (N,).
    """
    z = z.float()
    codebook = codebook.float()
    e_sq = codebook.square().sum(1)
    n, k = z.shape[0], codebook.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // k)
    codes = torch.empty(n, dtype=torch.long, device=z.device)
    dist = torch.empty(min(rows, n), k, dtype=torch.float32, device=z.device)
    codebook_t = codebook.t()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = dist[: stop - start]
        torch.addmm(e_sq, z[start:stop], codebook_t, beta=1.0, alpha=-2.0, out=block)
        torch.argmin(block, dim=1, out=codes[start:stop])
    return codes


@torch.no_grad()
def cluster_statistics(flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_i`` (K,) and ``s_i = sum_{j: k_j = i} z_j`` (K, D) of the rows ``flat`` (N, D)
    assigned ``codes`` (N,) with ``counts = bincount(codes)``, summed over all processes when
    training is distributed (one all-reduce of K x (D+1)).

    Float32, also under autocast: the counts stay exact up to 2**24 per code and the sums keep
    the digits that the EMA with decay 0.99 accumulates; bfloat16 keeps 8 bits of mantissa.
    """
    sums = torch.zeros(k, flat.shape[1], dtype=torch.float32, device=flat.device)
    sums.index_add_(0, codes, flat.float())
    counts = counts.float()
    if distributed.active():
        both = distributed.all_reduce_sum(torch.cat([counts.unsqueeze(1), sums], 1))
        counts, sums = both[:, 0], both[:, 1:]
    return counts, sums


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(-sum_i p_i log p_i)`` with ``p = counts / sum(counts)``: the effective number of
    codes in use (1 when one code takes everything, K when all are used equally)."""
    p = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


@dataclass
class QuantizerOutput:
    """What one quantizer pass returns.

    ``z_q`` (B, D, H, W) carries the straight-through gradient; ``codes`` (B, H, W);
    ``loss = codebook_loss + beta * commitment_loss`` (codebook term zero with EMA);
    ``perplexity`` and ``usage`` (fraction of the K codes hit) describe this batch only.
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer with a learned (or EMA) codebook.

    Args:
        codebook_size: K.
        dim: D, the channels of ``z_e``.
        beta: commitment weight (0.25 in the paper).
        ema: update the codebook by moving averages instead of the codebook loss.
        decay, eps: EMA decay and Laplace smoothing constant.
        kmeans_init: on the first training batch, set the codebook by k-means on ``z_e``.
        restart_after: re-seed a code from the current batch's ``z_e`` once it has gone this
            many training steps unused (0 disables restarts).
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
    ):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook_size and dim must be positive, got {codebook_size}, {dim}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.kmeans_iters = kmeans_iters
        self.restart_after = restart_after
        init = torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z_e.shape
        if d != self.dim:
            raise ValueError(f"z_e has {d} channels but the codebook has dimension {self.dim}")
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and not bool(self.initialized):
                self._kmeans_init(flat.detach())
            codes = nearest_codes(flat.detach(), self.codebook)
            counts = torch.bincount(codes, minlength=self.codebook_size)
            z_q_flat = F.embedding(codes, self.codebook)
            commitment = F.mse_loss(flat, z_q_flat.detach())
            if self.ema:
                codebook_loss = torch.zeros((), device=z_e.device)
            else:
                codebook_loss = F.mse_loss(z_q_flat, flat.detach())
            if self.training:
                with torch.no_grad():
                    if self.ema:
                        n, sums = cluster_statistics(flat, codes, counts, self.codebook_size)
                        self._ema_update(n, sums)
                        counts = n.long()
                    elif distributed.active():
                        counts = distributed.all_reduce_sum(counts)
                    if self.restart_after > 0:
                        self._restart_dead_codes(flat, counts)
            z_q_flat = flat + (z_q_flat - flat).detach()
            z_q = z_q_flat.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return QuantizerOutput(
            z_q=z_q,
            codes=codes.reshape(b, h, w),
            loss=codebook_loss + self.beta * commitment,
            codebook_loss=codebook_loss,
            commitment_loss=commitment,
            perplexity=perplexity(counts),
            usage=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) for ``z_e`` (B, D, H, W), without touching any statistics."""
        b, d, h, w = z_e.shape
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)
        return nearest_codes(flat, self.codebook).reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``z_q`` (B, D, H, W) for integer ``codes`` (B, H, W)."""
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes, self.codebook.float()).permute(0, 3, 1, 2)

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
        """Codes unused for ``restart_after`` steps take random vectors of this batch's z_e
        (the global batch's, chosen by rank 0, when distributed: ``counts`` are then global
        too, so every process finds the same dead codes); with EMA their running statistics
        restart as if that vector had been seen once."""
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = torch.nonzero(self.unused_steps >= self.restart_after).squeeze(1)
        if dead.numel() == 0:
            return
        picks = torch.randint(flat.shape[0] * distributed.world_size(), (dead.numel(),), device=flat.device)
        fresh = distributed.rows_of_global_batch(flat, picks)
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
        """Lloyd's k-means on one batch of z_e (the global batch when distributed);
        empty clusters are re-seeded at random."""
        k = self.codebook_size
        n = flat.shape[0] * distributed.world_size()
        picks = torch.randperm(n, device=flat.device)[:k] if n >= k else \
            torch.randint(n, (k,), device=flat.device)
        centers = distributed.rows_of_global_batch(flat, picks)
        counts = torch.zeros(k, device=flat.device)
        for _ in range(self.kmeans_iters):
            codes = nearest_codes(flat, centers)
            counts, sums = cluster_statistics(flat, codes, torch.bincount(codes, minlength=k), k)
            empty = counts == 0
            centers = torch.where(empty.unsqueeze(1), centers, sums / counts.clamp(min=1).unsqueeze(1))
            if empty.any():
                picks = torch.randint(n, (int(empty.sum()),), device=flat.device)
                centers[empty] = distributed.rows_of_global_batch(flat, picks)
        self.codebook.data.copy_(centers)
        if self.ema:
            self.ema_count.copy_(counts.clamp(min=1))
            self.ema_sum.copy_(centers * self.ema_count.unsqueeze(1))
        self.initialized.fill_(True)


class CodebookUsage:
    """Code counts accumulated over many batches (an epoch or an evaluation set).

    Batch perplexity and usage depend on the batch size; these figures do not.
    """

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=len(self.counts))

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
