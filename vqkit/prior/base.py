"""What every stage-2 prior shares: the factorisation, input checks, conditioning and NLL.

A prior models a code map ``c`` (B, H, W) as ``p(c) = prod_i p(c_i | c_<i, y)`` over the
positions in raster order (row by row, left to right), optionally given a class label ``y``
(B,), a float spatial conditioning map (B, cond_channels, H, W) and/or the code maps of coarser
levels (``cond_codes``, VQ-VAE-2; see ``vqkit.prior.condition``). ``forward`` returns the
logits of every conditional at once, (B, K, H, W): the logits at position ``i`` depend only on
the codes at positions before ``i`` (teacher forcing). Sampling has to go one position at a
time; ``incremental`` gives the state that lets a sampler do so at the cost of about one
forward pass per map (see ``vqkit.prior.sampling``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.errors import UsageError
from vqkit.nn.pretrained import PretrainedMixin

from .condition import CodeConditioner
from .config import PriorConfig


class IncrementalState(ABC):
    """A batch of maps being generated in raster order.

    The caller alternates ``logits(i, j)`` (the logits (n, K) of position (i, j), given
    every code written so far) and ``write(i, j, codes)`` (codes (n,) chosen for (i, j)), for
    the positions in raster order. The logits equal those of the full forward pass over a map
    holding the written codes.
    """

    @abstractmethod
    def logits(self, i: int, j: int) -> torch.Tensor: ...

    @abstractmethod
    def write(self, i: int, j: int, codes: torch.Tensor) -> None: ...


class Prior(nn.Module, PretrainedMixin, ABC):
    """Base class: code embedding, label embedding, conditioning stacks and projection.

    The label and the spatial conditioning (the float ``cond`` map beside the conditioning
    stacks' features of ``cond_codes``) enter each layer as an additive bias of
    ``bias_channels`` channels in total, which subclasses split between their layers.

    ``Prior.from_pretrained(folder)`` returns the subclass that the saved config's ``arch`` names.
    """

    model_type: ClassVar[str] = "prior"
    config_class: ClassVar[type] = PriorConfig

    @classmethod
    def from_config(cls, config: PriorConfig) -> Prior:
        """A fresh prior of the architecture ``config.arch`` names (whichever class it is called on)."""
        from vqkit.prior import build_prior

        return build_prior(config)

    def __init__(self, config: PriorConfig, bias_channels: int):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.codebook_size, config.channels)
        self.label_embed = (nn.Embedding(config.num_classes, bias_channels)
                            if config.num_classes is not None else None)
        self.code_conditioner = CodeConditioner(config.cond_codes, config.height, config.width,
                                                config.channels, config.cond_layers)
        spatial = config.cond_channels + self.code_conditioner.out_channels
        # A 1x1 convolution, written as a linear map over the channels-last map.
        self.cond_proj = nn.Linear(spatial, bias_channels) if spatial else None

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def check_codes(self, codes: torch.Tensor) -> None:
        c = self.config
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (c.height, c.width):
            raise UsageError(f"expected codes (B, {c.height}, {c.width}), got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise UsageError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= c.codebook_size):
            raise UsageError(f"codes must be in [0, {c.codebook_size}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")

    def conditioning(self, n: int, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                     cond_codes: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """Check ``labels``, ``cond`` and ``cond_codes`` for a batch of ``n`` and return the
        summed bias (n, H, W, bias_channels) (a broadcast view when only labels are given), or
        None."""
        c = self.config
        bias = None
        if c.num_classes is None:
            if labels is not None:
                raise UsageError("labels were given but the prior is unconditional (num_classes=None)")
        else:
            if labels is None:
                raise UsageError(f"the prior is class-conditional (num_classes={c.num_classes}): pass labels (B,)")
            if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise UsageError(f"expected integer labels of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
            if labels.min() < 0 or labels.max() >= c.num_classes:
                raise UsageError(f"labels must be in [0, {c.num_classes}), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            bias = self.label_embed(labels.to(self.device))[:, None, None, :]
        spatial = []  # channels-last (n, H, W, *) maps that cond_proj projects together
        if c.cond_channels == 0:
            if cond is not None:
                raise UsageError("cond was given but the prior has cond_channels=0")
        else:
            expected = (n, c.cond_channels, c.height, c.width)
            if cond is None:
                raise UsageError(f"the prior takes a conditioning map: pass cond {expected}")
            if tuple(cond.shape) != expected or not cond.dtype.is_floating_point:
                raise UsageError(f"expected a float cond of shape {expected}, got {cond.dtype} {tuple(cond.shape)}")
            spatial.append(cond.to(self.device, self.embed.weight.dtype).permute(0, 2, 3, 1))
        self.code_conditioner.check(n, cond_codes)
        if c.cond_codes:
            spatial.append(self.code_conditioner(cond_codes))
        if spatial:
            projected = self.cond_proj(spatial[0] if len(spatial) == 1 else torch.cat(spatial, -1))
            bias = projected if bias is None else bias + projected
        return None if bias is None else bias.expand(n, c.height, c.width, bias.shape[-1])

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, cond_codes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Codes (B, H, W) -> logits (B, K, H, W) of ``p(c_i | c_<i)`` at every position, given
        labels (B,), cond (B, cond_channels, H, W) and cond_codes [(B, h, w), ...] as configured."""
        self.check_codes(codes)
        bias = self.conditioning(codes.shape[0], labels, cond, cond_codes)
        return self.logits_map(codes.to(self.device), bias).permute(0, 3, 1, 2)

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
            cond: torch.Tensor | None = None, cond_codes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean negative log-likelihood per code, in nats, (B,)."""
        logits = self(codes, labels, cond, cond_codes)
        return F.cross_entropy(logits, codes.to(self.device), reduction="none").flatten(1).mean(1)

    def incremental(self, n: int, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                    cond_codes: list[torch.Tensor] | None = None) -> IncrementalState:
        """A state for generating ``n`` maps position by position (call under no_grad, in eval).

        The conditioning (label embedding, projection, conditioning stacks) is computed here,
        once for the whole map."""
        if n < 1:
            raise UsageError(f"n must be positive, got {n}")
        return self.make_state(n, self.conditioning(n, labels, cond, cond_codes))

    @abstractmethod
    def logits_map(self, codes: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Checked codes (B, H, W) and bias -> logits, channels-last (B, H, W, K)."""

    @abstractmethod
    def make_state(self, n: int, bias: torch.Tensor | None) -> IncrementalState: ...
