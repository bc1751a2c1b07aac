import math

import pytest
import torch

from vqkit.nn.likelihood import (
    GaussianLikelihood,
    LogisticMixtureLikelihood,
    bits_per_dim,
    discretized_gaussian_log_prob,
    discretized_logistic_exact_log_prob,
    discretized_logistic_log_prob,
    discretized_logistic_masses,
)

ALL_VALUES = torch.arange(256).float() / 127.5 - 1  # every 8-bit value on the [-1, 1] scale


@pytest.mark.parametrize("log_prob", [discretized_gaussian_log_prob, discretized_logistic_log_prob])
@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.9, -1.0), (-1.3, 0.5), (0.2, -7.0)])
def test_discretized_masses_sum_to_one_over_the_256_values(log_prob, mean, log_scale):
    lp = log_prob(ALL_VALUES, torch.full((256,), mean), torch.full((256,), log_scale))
    assert torch.logsumexp(lp, 0).exp().item() == pytest.approx(1.0, abs=1e-4)


def test_logistic_mixture_is_a_distribution_per_subpixel():
    lik = LogisticMixtureLikelihood(channels=1, mixtures=3)
    torch.manual_seed(0)
    params = torch.randn(1, 9, 1, 1).repeat(256, 1, 1, 1)
    out = lik(params, ALL_VALUES.view(256, 1, 1, 1))
    assert torch.logsumexp(-out.nll, 0).exp().item() == pytest.approx(1.0, abs=1e-4)
    assert out.mean.shape == (256, 1, 1, 1)


def test_gaussian_variance_follows_the_training_error():
    lik = GaussianLikelihood(channels=2, decay=0.5)
    x = torch.zeros(4, 2, 3, 3)
    params = torch.zeros(4, 2, 3, 3)
    params[:, 0] = 0.1
    params[:, 1] = 0.2
    out = lik.train()(params, x)
    assert torch.allclose(lik.variance, torch.tensor([0.01, 0.04]))
    assert out.loss.item() == pytest.approx((0.01 + 0.04) / 2)
    lik(torch.zeros_like(params), x)
    assert torch.allclose(lik.variance, torch.tensor([0.005, 0.02]))
    lik.eval()(params, x)
    assert torch.allclose(lik.variance, torch.tensor([0.005, 0.02]))


def test_bits_per_dim_adds_log_k_per_latent():
    # 3072 subpixels, 64 latents, K = 512, NLL of 5000 nats.
    expected = (5000 + 64 * math.log(512)) / (3072 * math.log(2))
    assert bits_per_dim(5000.0, 3072, [64], [512]) == pytest.approx(expected)
    assert bits_per_dim(0.0, 8, [8], [256]) == pytest.approx(8.0)  # 8 bits per latent, one per subpixel
    # Two levels: each adds its own log K_l per latent.
    assert bits_per_dim(0.0, 16, [2, 8], [16, 256]) == pytest.approx((2 * 4 + 8 * 8) / 16)


@pytest.mark.parametrize("decay", [0.9, None])
def test_gaussian_variance_is_an_ema_with_weight_decay_on_the_old_value(decay):
    """variance_1 = b_1 (the first batch's per-channel MSE), then
    variance_t = decay * variance_{t-1} + (1 - decay) * b_t, in training mode only."""
    lik = GaussianLikelihood(channels=2) if decay is None else GaussianLikelihood(channels=2, decay=decay)
    d = 0.99 if decay is None else decay
    assert lik.decay == d
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    variance = None
    lik.train()
    for scale in (0.05, 0.3, 0.1):
        params = x + scale * torch.randn(x.shape, generator=g)
        batch = ((params.double() - x.double()) ** 2).mean(dim=(0, 2, 3))
        variance = batch if variance is None else d * variance + (1 - d) * batch
        lik(params, x)
        assert torch.allclose(lik.variance.double(), variance, rtol=1e-5, atol=0), \
            f"variance {lik.variance.tolist()}, the EMA {variance.tolist()}"


def test_logistic_mixture_mean_weights_the_components_by_their_softmax():
    """mean = sum_m softmax(logits)_m * mean_m per subpixel; params (B, 3*M*C, H, W) are the
    logits, means and log-scales blocks, each (M, C) mixture-major."""
    m, c = 3, 2
    lik = LogisticMixtureLikelihood(channels=c, mixtures=m)
    g = torch.Generator().manual_seed(0)
    params = torch.randn(2, 3 * m * c, 3, 3, generator=g, dtype=torch.float64)
    params[:, :m * c] *= 3  # distinct, far from equal weights
    logits = params[:, :m * c].reshape(2, m, c, 3, 3)
    means = params[:, m * c:2 * m * c].reshape(2, m, c, 3, 3)
    weights = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    expected = (weights * means).sum(1)
    assert (expected - means.mean(1)).abs().max() > 0.3  # the unweighted mean is far off
    got = lik.mean(params.float())
    assert torch.allclose(got.double(), expected, atol=1e-5), f"max error {(got - expected).abs().max():.3g}"
    # Independently of the layout: the mean of the distribution that forward() puts on the 256 values.
    one = LogisticMixtureLikelihood(channels=1, mixtures=m)
    p = torch.tensor([1.5, -1.0, 0.2, 0.4, -0.3, -0.6, -3.0, -3.2, -2.8]).view(1, 9, 1, 1)
    nll = one(p.repeat(256, 1, 1, 1), ALL_VALUES.view(256, 1, 1, 1)).nll.double()
    expectation = float((ALL_VALUES.double() * torch.exp(-nll)).sum())
    assert float(one.mean(p)) == pytest.approx(expectation, abs=2e-3)


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _bin_nll(x: float, mean: float, scale: float, cdf) -> float:
    """-log P(bin of x) for the 8-bit value x, bins of width 2/255, the end bins taking the tails;
    a bin in the upper tail is measured from above, where the CDF's floats lose no digits."""
    h = 1 / 255
    lower, upper = (x - h - mean) / scale, (x + h - mean) / scale
    if x < -1 + h:
        mass = cdf(upper)
    elif x > 1 - h:
        mass = cdf(-lower)
    elif lower > 0:
        mass = cdf(-lower) - cdf(-upper)
    else:
        mass = cdf(upper) - cdf(lower)
    return -math.log(mass) if mass > 0 else math.inf


@pytest.mark.parametrize("kind", ["gaussian", "logistic"])
@pytest.mark.parametrize("mean,scale", [(0.3, 0.5), (-0.9, 0.05), (0.97, 0.02), (0.0, 0.004)])
def test_discretized_log_probs_are_the_bin_masses(kind, mean, scale):
    """Against math.erfc / exp in float64, every 8-bit value whose bin holds a mass well above
    the underflow threshold (where the density at the centre stands in)."""
    log_prob, cdf = ((discretized_gaussian_log_prob, _phi) if kind == "gaussian"
                     else (discretized_logistic_log_prob, _sigmoid))
    x = ALL_VALUES.double()
    got = -log_prob(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    expected = torch.tensor([_bin_nll(float(v), mean, scale, cdf) for v in x], dtype=torch.float64)
    exact = expected < -math.log(1e-4)
    assert exact.sum() >= 3 and (abs(mean) < 0.8 or exact[0 if mean < 0 else -1])  # an end bin near the mean
    assert torch.allclose(got[exact], expected[exact], rtol=1e-7, atol=1e-9), \
        f"max error {(got[exact] - expected[exact]).abs().max():.3g} nats"


def test_gaussian_nll_is_the_discretized_gaussian_with_the_tracked_variance():
    """nll = -sum log P(bin) under N(mean, variance) with the per-channel variance the
    likelihood holds (the standard deviation is its square root), float64 by hand."""
    lik = GaussianLikelihood(channels=2).eval()
    lik.variance.copy_(torch.tensor([0.01, 0.0009]))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 2, 5, 5), generator=g)
    images[0, :, 0, :2] = torch.tensor([0, 255])  # both end bins
    x = images.float() / 127.5 - 1
    params = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(-1.2, 1.2)
    nll = lik(params, x).nll
    std = [0.1, 0.03]
    expected = [sum(_bin_nll(float(x[b, c, i, j]), float(params[b, c, i, j]), std[c], _phi)
                    for c in range(2) for i in range(5) for j in range(5)) for b in range(2)]
    assert nll.tolist() == pytest.approx(expected, rel=1e-5), f"nll {nll.tolist()}, by hand {expected}"


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.9, -1.0), (-1.3, 0.5), (0.2, -7.0), (0.99, -6.5)])
def test_exact_log_prob_is_the_log_of_the_masses_in_both_tails(mean, log_scale):
    """The masses by CDF differences sum to 1; the exact log-probabilities are the logs of the
    masses written out in float64, including masses far below the 1e-5 where
    discretized_logistic_log_prob lets the density stand in. The reference takes each bin's
    mass from the tail it lies in, sigmoid(u) - sigmoid(l) below the mean and
    sigmoid(-l) - sigmoid(-u) above, so that it loses nothing to cancellation."""
    masses = discretized_logistic_masses(torch.tensor(mean), torch.tensor(log_scale))
    assert masses.shape == (256,) and masses.sum().item() == pytest.approx(1.0, abs=1e-6)
    x = ALL_VALUES.double()
    s = math.exp(log_scale)
    u = torch.where(x > 0.999, torch.inf, (x + 1 / 255 - mean) / s)
    lo = torch.where(x < -0.999, -torch.inf, (x - 1 / 255 - mean) / s)
    reference = torch.where(x < mean, torch.sigmoid(u) - torch.sigmoid(lo), torch.sigmoid(-lo) - torch.sigmoid(-u))
    exact = discretized_logistic_exact_log_prob(x, torch.full((256,), mean, dtype=torch.float64),
                                                torch.full((256,), log_scale, dtype=torch.float64))
    held = reference > 1e-300
    assert held.sum() > 100
    torch.testing.assert_close(exact[held], reference[held].log(), rtol=1e-7, atol=1e-7)
    # In float32, with scales near e^-7 the edges' rounding (1e-7 near 1, times 1/scale) moves a mass by 1e-5.
    torch.testing.assert_close(exact.exp().float(), masses, rtol=0, atol=2e-5)


def test_gaussian_nll_is_computed_once_when_read_with_the_variance_of_its_step(monkeypatch):
    """Training never reads the Gaussian's NLL, so its forward must not pay for it; read
    later, it is the NLL under the variance of that forward, not of a later step."""
    import vqkit.nn.likelihood as likelihood

    calls = []
    real = likelihood.discretized_gaussian_log_prob
    monkeypatch.setattr(likelihood, "discretized_gaussian_log_prob", lambda *a: calls.append(1) or real(*a))
    lik = GaussianLikelihood(channels=1, decay=0.5)
    x = torch.zeros(2, 1, 3, 3)
    first = lik(torch.full_like(x, 0.1), x)
    lik(torch.full_like(x, 0.5), x)  # moves the variance
    assert calls == []
    nll = first.nll
    assert torch.equal(first.nll, nll) and calls == [1]
    expected = -real(x, torch.full_like(x, 0.1), torch.full((1, 1, 1, 1), 0.5 * math.log(0.01))).flatten(1).sum(1)
    torch.testing.assert_close(nll, expected)
