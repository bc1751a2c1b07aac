"""Distances between two sets of feature vectors (torch only, no files, no matplotlib): the
Fréchet distance of the Gaussians fitted to them, and the precision and recall of Kynkäänniemi
et al. 2019 ("Improved Precision and Recall Metric for Assessing Generative Models").

Fréchet distance of N(mu_1, S_1) and N(mu_2, S_2) (what "FID" computes in the features of an
Inception network; here the features are those of vqkit's own classifier, so the number is not
comparable with published FIDs)::

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^(1/2) S_2 S_1^(1/2))^(1/2))

computed in float64 through symmetric eigendecompositions (``S_1^(1/2)`` from that of S_1,
then the eigenvalues of the symmetric ``S_1^(1/2) S_2 S_1^(1/2)``, whose square roots sum to the
trace term), negative eigenvalues of rounding clipped to 0.

Precision and recall: each set is a manifold estimate, the union of balls around its points
whose radius is the distance to the point's k-th nearest neighbour in its own set (k = 3).
Precision is the share of generated points inside the real manifold (are samples realistic?),
recall the share of real points inside the generated manifold (do samples cover the data?).
"""

from __future__ import annotations

import torch

from vqkit.errors import UsageError


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (F,) and covariance (F, F) (unbiased, float64) of features (N, F), N >= 2."""
    if features.dim() != 2 or len(features) < 2:
        raise UsageError(f"feature statistics need (N, F) features with N >= 2, got {tuple(features.shape)}")
    x = features.to(torch.float64)
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, sigma1, mu2, sigma2 = (t.to(torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise UsageError(f"Fréchet distance of Gaussians of different dimensions: means {tuple(mu1.shape)} "
                         f"and {tuple(mu2.shape)}, covariances {tuple(sigma1.shape)} and {tuple(sigma2.shape)}")
    root = _sqrt_psd(sigma1)
    middle = root @ sigma2 @ root
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(float(d), 0.0)


def frechet_distance_of(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to features a (N, F) and b (M, F)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _kth_neighbour_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """For each row of x (N, F), the distance to its k-th nearest other row (N,)."""
    if len(x) <= k:
        raise UsageError(f"precision and recall with k={k} need more than {k} points per set, got {len(x)}")
    radii = []
    for start in range(0, len(x), block):
        d = torch.cdist(x[start:start + block], x)          # (b, N); the point itself at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """Whether each of points (M, F) lies in some ball (centres (N, F), radii (N,)): bool (M,)."""
    inside = []
    for start in range(0, len(points), block):
        d = torch.cdist(points[start:start + block], centres)  # (b, N)
        inside.append((d <= radii[None, :]).any(1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Precision (share of ``fake`` inside the k-NN manifold of ``real``) and recall (share of
    ``real`` inside that of ``fake``), features (N, F) and (M, F), in float64."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise UsageError(f"precision and recall need (N, F) features of one F, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    real, fake = real.to(torch.float64), fake.to(torch.float64)
    real_radii = _kth_neighbour_radii(real, k, block)
    fake_radii = _kth_neighbour_radii(fake, k, block)
    precision = _covered(fake, real, real_radii, block).double().mean()
    recall = _covered(real, fake, fake_radii, block).double().mean()
    return float(precision), float(recall)
