"""Residual vector quantization (Juang and Gray 1982; SoundStream, Zeghidour et al. 2021): a stack
of S vector quantizers, each quantizing what the stages before it left over, with quantize dropout
so that any prefix of the stages decodes (one model, several rates).

With ``r_0 = z_e``, stage s quantizes ``r_s`` to its code ``k_s`` and vector ``q_s = e^(s)_{k_s}``
and leaves ``r_{s+1} = r_s - q_s``; the output is ``z_q = sum_s q_s``, passed on with one straight-
through gradient over the sum (identity w.r.t. ``z_e``: not S of them, as a sum of per-stage
estimators would give). Each stage is a ``VectorQuantizer`` with its own codebook, EMA, k-means
initialisation on its first residuals, dead-code restarts and sync (``shared=True``: one codebook
for every stage), and its own loss on its residual: ``loss = sum_s (codebook_s + beta commitment_s)``,
the residual ``r_s`` carrying the gradient to ``z_e`` through the earlier stages' detached ``q``.

``codes`` have ``z_e``'s shape without the channel axis and with a depth axis of S last; ``lookup``
takes any prefix ``codes[..., :n]`` (1 <= n <= S) and returns ``sum_{s < n} q_s``. With
``quantize_dropout`` each training pass uses only the first n stages, n drawn uniformly from 1..S
(the same n for the whole batch; under sync rank 0 draws it for the group, so every process makes
the same stages' collectives), and the codes of the stages left out are -1.

In a model config it is the ``"residual"`` quantizer kind (``vqkit.nn.quantizers``): the model
splits the depth axis into S code maps of one resolution, stage 0 first, which code sets, priors
(stage s conditioned on the stages above it) and the codec take like a hierarchy's levels.
"""

from __future__ import annotations

import torch
from torch import nn

from vqkit import distributed
from vqkit.errors import UsageError
from vqkit.nn.quantize import QuantizerOutput, VectorQuantizer


class ResidualVQ(nn.Module):
    """A stack of ``VectorQuantizer`` stages on successive residuals (see the module docstring).

    Args:
        stages: S, the number of quantizers.
        codebook_size: K of each stage.
        dim: D, the size of ``z_e``'s channel axis.
        shared: one codebook for every stage instead of one each.
        quantize_dropout: in training, quantize with the first n stages only, n uniform in 1..S.
        channel_dim: the axis of ``z_e`` that holds the D channels.
        **options: the stages' other ``VectorQuantizer`` arguments (``beta``, ``ema``,
            ``kmeans_init``, ``restart_after``, ``sync``, ``cosine``; not ``factor_dim`` or ``rotation``).
    """

    def __init__(self, stages: int, codebook_size: int, dim: int, shared: bool = False,
                 quantize_dropout: bool = False, channel_dim: int = 1, **options):
        super().__init__()
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise UsageError(f"stages must be a positive integer, got {stages!r}")
        if options.get("factor_dim") is not None:
            raise UsageError("residual stages quantize the residual in z_e's own space: factor_dim does not apply")
        if options.get("rotation"):
            raise UsageError("the stages' vectors reach z_q through one straight-through estimator over their sum, "
                             "so a stage's rotation trick would change no gradient: rotation does not apply")
        self.num_stages = stages
        self.codebook_size = codebook_size
        self.dim = dim
        self.shared = shared
        self.quantize_dropout = quantize_dropout
        self.channel_dim = channel_dim
        # The stages see rows (N, D); the channel axis is handled here once.
        make = lambda: VectorQuantizer(codebook_size, dim, channel_dim=-1, **options)
        self.quantizers = nn.ModuleList([make()] if shared else [make() for _ in range(stages)])

    def stage(self, s: int) -> VectorQuantizer:
        return self.quantizers[0 if self.shared else s]

    def _stages_this_pass(self, device: torch.device) -> int:
        """n: every stage, or (quantize dropout in training) a uniform draw in 1..S, rank 0's under sync."""
        if not (self.training and self.quantize_dropout):
            return self.num_stages
        n = torch.randint(1, self.num_stages + 1, (1,), device=device)
        first = self.stage(0)
        if first._synced():
            n = distributed.broadcast(n, 0) if first.group is None else _broadcast(n, first.group)
        return int(n)

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z_e`` (D channels along ``channel_dim``) with the stages in turn; ``codes``
        gain a depth axis of S last; ``perplexity`` and ``usage`` are one per stage (S,), 0 usage
        and perplexity 1 for stages left out by quantize dropout."""
        axis = self._axis(z_e)
        rows = z_e.movedim(axis, -1).reshape(-1, self.dim)  # (N, D)
        used = self._stages_this_pass(z_e.device)
        residual = rows
        total = torch.zeros_like(rows, dtype=torch.promote_types(rows.dtype, torch.float32))
        codes = torch.full((rows.shape[0], self.num_stages), -1, dtype=torch.long, device=z_e.device)
        losses, codebook_losses, commitments = [], [], []
        perplexities = torch.ones(self.num_stages, device=z_e.device)
        usage = torch.zeros(self.num_stages, device=z_e.device)
        for s in range(used):
            out = self.stage(s)(residual)
            q = out.z_q.detach()  # (N, D): the stage's code vectors, without its estimator
            codes[:, s] = out.codes
            total = total + q
            residual = residual - q
            losses.append(out.loss)
            codebook_losses.append(out.codebook_loss)
            commitments.append(out.commitment_loss)
            perplexities[s] = out.perplexity
            usage[s] = out.usage
        through = rows.to(total.dtype)
        z_q = through + (total - through).detach()
        shape = z_e.shape[:axis] + z_e.shape[axis + 1:]
        return QuantizerOutput(
            z_q=z_q.reshape(*shape, self.dim).movedim(-1, axis),
            codes=codes.reshape(*shape, self.num_stages),
            loss=torch.stack(losses).sum(),
            codebook_loss=torch.stack(codebook_losses).sum(),
            commitment_loss=torch.stack(commitments).sum(),
            perplexity=perplexities,
            usage=usage,
        )

    def _axis(self, z_e: torch.Tensor) -> int:
        """``channel_dim`` as a non-negative axis of ``z_e``, after checking the input."""
        if not -z_e.dim() <= self.channel_dim < z_e.dim() or z_e.shape[self.channel_dim] != self.dim:
            raise UsageError(f"z_e of shape {tuple(z_e.shape)} has no axis {self.channel_dim} (channel_dim) "
                             f"of {self.dim} channels")
        if not z_e.is_floating_point():
            raise UsageError(f"z_e must be a floating-point tensor, got {z_e.dtype}")
        return self.channel_dim % z_e.dim()

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """Codes (``z_e``'s shape without the channel axis, then S) of every stage."""
        axis = self._axis(z_e)
        residual = z_e.float().movedim(axis, -1).reshape(-1, self.dim)
        codes = []
        for s in range(self.num_stages):
            codes.append(self.stage(s).encode(residual))
            residual = residual - self.stage(s).lookup(codes[-1])
        shape = z_e.shape[:axis] + z_e.shape[axis + 1:]
        return torch.stack(codes, -1).reshape(*shape, self.num_stages)

    def lookup(self, codes: torch.Tensor, without: int | None = None) -> torch.Tensor:
        """``sum_{s < n} q_s`` for codes ``(..., n)`` of the first n stages (1 <= n <= S), float32,
        with the channel axis put back at ``channel_dim``: any prefix decodes. ``without``
        leaves stage ``without``'s vectors out of the sum (zeros when it is the only stage)."""
        if codes.dim() < 1 or not 1 <= codes.shape[-1] <= self.num_stages:
            raise UsageError(f"codes must end in a depth axis of 1..{self.num_stages} stages, got shape "
                             f"{tuple(codes.shape)}")
        vectors = sum(self.stage(s).lookup(codes[..., s]) * (s != without)
                      for s in range(codes.shape[-1]))  # (..., D)
        ndim = codes.dim()
        return vectors.movedim(-1, self.channel_dim % ndim)


def _broadcast(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor`` as the group's first rank holds it, on every process of ``group``."""
    torch.distributed.broadcast(tensor, torch.distributed.get_global_rank(group, 0), group=group)
    return tensor
