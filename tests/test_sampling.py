"""Behaviour tests for vqkit.prior.sampling: the incremental sampler is the naive one, faster."""

from __future__ import annotations

import pytest
import torch

from vqkit.prior import PriorConfig, build_prior, filtered_probs, sample
from vqkit.prior.sampling import sample_codes

H, W, K = 5, 6, 11


def _prior(arch, **kw):
    torch.manual_seed(0)
    config = dict(arch=arch, codebook_size=K, height=H, width=W, channels=16, layers=3,
                  attention_heads=2, attention_every=2)
    prior = build_prior(PriorConfig(**{**config, **kw}))
    # Sharper than at initialisation, so that top-k and top-p filters actually remove codes.
    with torch.no_grad():
        prior.head[-1].weight.mul_(8)
    return prior


SETTINGS = [dict(), dict(temperature=0.7), dict(top_k=3), dict(top_p=0.6),
            dict(temperature=1.3, top_k=5, top_p=0.8)]


@pytest.mark.parametrize("arch", ["pixelcnn", "pixelsnail"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_incremental_equals_naive(arch, settings):
    prior = _prior(arch)
    runs = {m: sample(prior, 3, generator=torch.Generator().manual_seed(7), method=m, **settings)
            for m in ("naive", "incremental")}
    assert runs["naive"].dtype == torch.int64 and runs["naive"].shape == (3, H, W)
    assert torch.equal(runs["naive"], runs["incremental"])
    assert len(runs["naive"].unique()) > 1


@pytest.mark.parametrize("arch", ["pixelcnn", "pixelsnail"])
def test_incremental_equals_naive_with_labels_and_cond(arch):
    prior = _prior(arch, num_classes=4, cond_channels=3, kernel_size=5)
    labels = torch.tensor([0, 3, 1])
    cond = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(8))
    for seed in (1, 2):
        runs = [sample(prior, 3, labels, cond, top_k=6, generator=torch.Generator().manual_seed(seed), method=m)
                for m in ("naive", "incremental")]
        assert torch.equal(*runs)


@pytest.mark.parametrize("arch", ["pixelcnn", "pixelsnail"])
def test_incremental_logits_match_the_forward_pass(arch):
    prior = _prior(arch, num_classes=2, cond_channels=1).eval()
    codes = torch.randint(K, (2, H, W), generator=torch.Generator().manual_seed(9))
    labels, cond = torch.tensor([1, 0]), torch.randn(2, 1, H, W)
    with torch.no_grad():
        full = prior(codes, labels, cond)
        state = prior.incremental(2, labels, cond)
        for i in range(H):
            for j in range(W):
                torch.testing.assert_close(state.logits(i, j), full[:, :, i, j], rtol=0, atol=1e-5)
                state.write(i, j, codes[:, i, j])


def test_sampling_follows_the_distribution_and_restores_training_mode():
    prior = _prior("pixelcnn", height=1, width=1, dropout=0.1).train()
    # A 1x1 map has one position whose logits do not depend on any code.
    codes = sample(prior, 4000, generator=torch.Generator().manual_seed(0), top_k=4)
    assert prior.training
    with torch.no_grad():
        probs = filtered_probs(prior.eval()(torch.zeros(1, 1, 1, dtype=torch.long))[:, :, 0, 0], top_k=4)[0]
    freq = torch.bincount(codes.flatten(), minlength=K).float() / codes.numel()
    assert (freq[probs == 0] == 0).all()
    assert (freq - probs).abs().max() < 0.03


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    assert torch.allclose(filtered_probs(logits), torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    assert torch.equal(filtered_probs(logits, top_k=1) > 0, torch.tensor([[True, False, False, False]]))
    assert torch.equal(filtered_probs(logits, top_k=2) > 0, torch.tensor([[True, True, True, False]]))  # tie kept
    assert torch.equal(filtered_probs(logits, top_p=0.45) > 0, torch.tensor([[True, False, False, False]]))
    assert torch.equal(filtered_probs(logits, top_p=0.6) > 0, torch.tensor([[True, True, False, False]]))
    hot = filtered_probs(logits, temperature=0.01)
    assert hot[0, 0] > 0.999


def test_inverse_cdf_never_picks_a_filtered_code():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).repeat(5, 1)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999, 1 - 2 ** -53], dtype=torch.float64)
    assert sample_codes(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_sample_errors():
    prior = _prior("pixelcnn")
    for kw, message in [(dict(method="beam"), "method must be one of"), (dict(temperature=0), "temperature"),
                        (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"),
                        (dict(labels=torch.zeros(2, dtype=torch.long)), "unconditional")]:
        with pytest.raises(ValueError, match=message):
            sample(prior, 2, **kw)
    with pytest.raises(ValueError, match="n must be a positive"):
        sample(prior, 0)


def test_top_p_stops_at_the_first_code_that_reaches_the_mass_exactly():
    """The nucleus is the smallest set of most likely codes whose mass is >= top_p: when the
    codes kept so far sum to top_p exactly, the next code is dropped. Powers of two, so the
    softmax and its cumulative sums are exact and the boundary is hit on the nose."""
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625],
                          [0.0625, 0.125, 0.5, 0.0625, 0.25]])  # the same, shuffled
    logits = probs.log()
    assert torch.equal(filtered_probs(logits), probs)  # exact, so the masses below are too
    for top_p, kept in [(0.5, 1), (0.75, 2), (0.875, 3)]:
        expected = torch.zeros_like(probs)
        for row in range(2):
            top = probs[row].argsort(descending=True)[:kept]
            expected[row, top] = probs[row, top]
        got = filtered_probs(logits, top_p=top_p)
        assert torch.equal(got, expected), f"top_p={top_p}: kept {got.tolist()}, nucleus {expected.tolist()}"
    # Just past a boundary the next code is needed, and kept.
    assert torch.equal(filtered_probs(logits, top_p=0.76) > 0, probs >= 0.125)
