"""Picking values from a categorical distribution by inverting its CDF: what the code-map
samplers (``vqkit.prior.sampling``) and the PixelCNN likelihood's pixel sampler
(``vqkit.nn.pixelcnn``) share.

A sampler draws its uniforms up front and picks each value by ``sample_codes(probs, u)``; two
samplers that compute the same probabilities from the same uniforms therefore pick the same
values, which is what lets an incremental sampler be checked against a naive one.
"""

from __future__ import annotations

import torch


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
