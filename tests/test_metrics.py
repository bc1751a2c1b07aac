"""Fréchet distance against the closed form for Gaussians, and k-NN precision and recall on
constructed sets (vqkit.inspect.metrics)."""

from __future__ import annotations

import pytest
import torch

from vqkit.errors import UsageError
from vqkit.inspect.metrics import feature_stats, frechet_distance, frechet_distance_of, precision_recall


def _diagonal_case():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(var1_i) - sqrt(var2_i))^2
    expected = float((mu1 - mu2).square().sum() + (var1.sqrt() - var2.sqrt()).square().sum())
    return mu1, var1, mu2, var2, expected


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, var1, mu2, var2, expected = _diagonal_case()
    assert expected == pytest.approx(1 + 6.25 + 4 + 1 + 0)
    assert frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_is_unchanged_by_a_common_rotation():
    # The rotated covariances are full matrices that do not commute with the identity basis, so
    # this exercises the matrix square roots, not just their diagonal.
    mu1, var1, mu2, var2, expected = _diagonal_case()
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    s1, s2 = q @ torch.diag(var1).double() @ q.T, q @ torch.diag(var2).double() @ q.T
    assert frechet_distance(q @ mu1.double(), s1, q @ mu2.double(), s2) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_samples_approaches_that_of_their_gaussians():
    g = torch.Generator().manual_seed(0)
    mu1, var1, mu2, var2, expected = _diagonal_case()
    a = mu1 + var1.sqrt() * torch.randn(200_000, 3, generator=g)
    b = mu2 + var2.sqrt() * torch.randn(200_000, 3, generator=g)
    assert frechet_distance_of(a, b) == pytest.approx(expected, rel=0.02)
    mu, cov = feature_stats(a)
    assert mu.dtype == torch.float64 and cov.shape == (3, 3)
    assert torch.allclose(cov, torch.diag(var1).double(), atol=0.05)


def test_a_set_against_itself_is_the_best_score():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-9)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_and_recall_on_a_constructed_case():
    real = torch.tensor([[float(i), 0.0] for i in range(10)])          # 0..9 on a line; k=1 radii 1
    fake = torch.tensor([[0.5, 0.0], [1.5, 0.0], [2.5, 0.0], [100.0, 0.0], [101.0, 0.0]])  # k=1 radii 1
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(3 / 5)   # the three fakes inside the real balls
    assert recall == pytest.approx(4 / 10)     # real 0..3 lie within 1 of a fake near them
    # k=2: the real radii are 1 (2 at the ends); the fake ones 2, 1, 2, 97.5 and 98.5.
    precision, recall = precision_recall(real, fake, k=2)
    assert precision == pytest.approx(3 / 5)
    assert recall == pytest.approx(1.0)        # the ball of radius 97.5 around 100 covers 3..9


def test_precision_is_blockwise_the_same():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(70, 4, generator=g), torch.randn(50, 4, generator=g) + 0.5
    assert precision_recall(real, fake, k=3, block=7) == precision_recall(real, fake, k=3, block=1024)


def test_bad_inputs_are_usage_errors():
    with pytest.raises(UsageError, match="different dimensions"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(UsageError, match="more than 3 points"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))
    with pytest.raises(UsageError, match="one F"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 3))
    with pytest.raises(UsageError, match="N >= 2"):
        feature_stats(torch.zeros(1, 4))
