"""Sampling code maps from a prior, in raster order.

Both samplers draw every uniform they need up front, ``u`` (n, H, W) from ``generator``, and
pick the code at each position by inverting the CDF of the same filtered distribution
(``filtered_probs``: temperature, then top-k, then top-p). Given the same logits they therefore
pick the same codes, and for the same seed:

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

from .base import Prior

METHODS = ("incremental", "naive")


def filtered_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Logits (n, K) -> probabilities (n, K) of ``softmax(logits / temperature)`` restricted to
    the ``top_k`` most likely codes (ties at the k-th value kept), then to the smallest set of
    most likely codes whose mass reaches ``top_p`` ("nucleus", Holtzman et al. 2020), not
    renormalised (``sample_codes`` divides by the total). Filtered codes get exactly 0."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # Drop a code when the codes more likely than it already reach top_p; the most
        # likely code is always kept.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    return probs


def sample_codes(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: probabilities (n, K) and uniforms (n,) in [0, 1) -> codes (n,) int64.

    Picks the first code whose cumulative mass exceeds ``u * total``. The target is kept
    strictly below the total, so a code of probability 0 is never picked even when ``u`` is
    within rounding of 1.
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None].double() * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


@torch.no_grad()
def sample(prior: Prior, n: int, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
           cond_codes: list[torch.Tensor] | None = None, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           method: str = "incremental") -> torch.Tensor:
    """Draw ``n`` code maps (n, H, W) int64 from ``prior``, given labels (n,), a conditioning
    map (n, cond_channels, H, W) and/or the code maps of coarser levels [(n, h, w), ...] (e.g.
    ``cond_codes=[top]`` for a VQ-VAE-2 bottom prior) when the prior takes them.

    The prior runs in eval mode (no dropout) and is put back in its previous mode afterwards.
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
