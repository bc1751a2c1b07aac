"""Sampling code maps from a prior, in raster order.

Both samplers draw every uniform they need up front, ``u`` (n, H, W) from ``generator``, and
pick the code at each position by inverting the CDF of the same filtered distribution
(``filtered_probs`` of ``vqkit.nn.sampling``: temperature, then top-k, then top-p). Given the
same logits they therefore pick the same codes, and for the same seed:

* ``method="naive"`` re-runs the whole network over the whole map for each of the H*W
  positions, as the common reproductions do: H*W forward passes per batch.
* ``method="incremental"`` (default) keeps the prior's ``IncrementalState``: per-layer caches
  of what earlier positions computed, so each position costs one step through the layers at
  that position only and a map costs about one forward pass of arithmetic in total. It
  computes each value with the same operations as the forward pass, so it returns the naive
  sampler's codes.
"""

from __future__ import annotations

import torch

from vqkit.errors import UsageError
from vqkit.nn.sampling import filtered_probs, sample_codes

from .base import Prior

METHODS = ("incremental", "naive")
__all__ = ["METHODS", "filtered_probs", "sample", "sample_codes"]


@torch.no_grad()
def sample(prior: Prior, n: int, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
           cond_codes: list[torch.Tensor] | None = None, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           method: str = "incremental") -> torch.Tensor:
    """Draw ``n`` code maps (n, H, W) int64 from ``prior``, given labels (n,), a conditioning
    map (n, cond_channels, H, W) and/or the code maps of coarser levels [(n, h, w), ...] (e.g.
    ``cond_codes=[top]`` for a VQ-VAE-2 bottom prior) when the prior takes them.

    The prior runs in eval mode (no dropout) and is put back in its previous mode afterwards;
    the labels and maps given are moved to its device, where the codes are drawn and returned.
    """
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(n, int) or n < 1:
        raise UsageError(f"n must be a positive integer, got {n!r}")
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"top_k must be None or a positive integer, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UsageError(f"top_p must be None or in (0, 1], got {top_p!r}")
    c = prior.config
    device = prior.device
    u = torch.rand(n, c.height, c.width, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else device).to(device)
    codes = torch.zeros(n, c.height, c.width, dtype=torch.long, device=device)
    labels, cond = (None if t is None else t.to(device) for t in (labels, cond))
    cond_codes = None if cond_codes is None else [m.to(device) for m in cond_codes]
    was_training = prior.training
    prior.eval()
    try:
        if method == "naive":
            for i in range(c.height):
                for j in range(c.width):
                    logits = prior(codes, labels, cond, cond_codes)[:, :, i, j]
                    codes[:, i, j] = sample_codes(filtered_probs(logits, temperature, top_k, top_p), u[:, i, j])
        else:
            state = prior.incremental(n, labels, cond, cond_codes)
            for i in range(c.height):
                for j in range(c.width):
                    picked = sample_codes(filtered_probs(state.logits(i, j), temperature, top_k, top_p), u[:, i, j])
                    codes[:, i, j] = picked
                    state.write(i, j, picked)
    finally:
        prior.train(was_training)
    return codes
