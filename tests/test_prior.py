"""Behaviour tests for vqkit.prior: causality, receptive field, conditioning, learning, config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vqkit.prior import PriorConfig, build_prior

H, W, K = 5, 6, 11


def _config(arch, **kw):
    base = dict(arch=arch, codebook_size=K, height=H, width=W, channels=16, layers=3,
                attention_heads=2, attention_every=2)
    return PriorConfig(**{**base, **kw})


def _prior(arch, **kw):
    torch.manual_seed(0)
    return build_prior(_config(arch, **kw)).eval()


def _conditioning(config, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(config.num_classes, (n,), generator=g) if config.num_classes else None
    cond = torch.randn(n, config.cond_channels, H, W, generator=g) if config.cond_channels else None
    return labels, cond


def _influence(prior, codes, labels=None, cond=None):
    """changed[q, p]: whether changing the code at raster position q changes any logit at
    raster position p (one perturbed copy of ``codes`` per position, in one batch)."""
    n = H * W
    perturbed = codes.repeat(n, 1, 1)
    flat = perturbed.view(n, n)
    flat[torch.arange(n), torch.arange(n)] = (flat.diagonal() + 1 + torch.arange(n) % (K - 1)) % K
    rep = lambda t: None if t is None else t.repeat(n, *[1] * (t.dim() - 1))  # noqa: E731
    with torch.no_grad():
        base = prior(codes, labels, cond)
        out = prior(perturbed, rep(labels), rep(cond))
    return (out != base).any(1).flatten(1)


CONDITIONINGS = [dict(), dict(num_classes=3), dict(cond_channels=2), dict(num_classes=3, cond_channels=2)]


@pytest.mark.parametrize("arch", ["pixelcnn", "pixelsnail"])
@pytest.mark.parametrize("extra", CONDITIONINGS, ids=["plain", "labels", "cond", "both"])
def test_logits_depend_only_on_earlier_positions(arch, extra):
    prior = _prior(arch, **extra)
    codes = torch.randint(K, (1, H, W), generator=torch.Generator().manual_seed(2))
    labels, cond = _conditioning(prior.config, 1)
    changed = _influence(prior, codes, labels, cond)
    # Strictly causal: position q never influences position p <= q ...
    assert not changed.tril().any(), torch.nonzero(changed.tril()).tolist()
    # ... but every code influences a later one, and its right neighbour in particular.
    assert changed[:-1].any(1).all()
    right = [q for q in range(H * W - 1) if (q + 1) % W]
    assert changed[right, [q + 1 for q in right]].all()


@pytest.mark.parametrize("arch,kw", [("pixelcnn", dict(layers=5)), ("pixelsnail", dict(layers=2))])
def test_no_blind_spot(arch, kw):
    # Gated PixelCNN: 5 layers of 3x3 reach 5 rows up and 5 columns either side, enough for a
    # 5x6 map; PixelSNAIL: attention reaches every earlier position.
    prior = _prior(arch, **kw)
    codes = torch.randint(K, (1, H, W), generator=torch.Generator().manual_seed(3))
    changed = _influence(prior, codes)
    for i, j in [(H - 1, W - 1), (2, 2), (1, 0)]:
        p = i * W + j
        assert changed[:p, p].all(), [divmod(q, W) for q in range(p) if not changed[q, p]]


@pytest.mark.parametrize("arch", ["pixelcnn", "pixelsnail"])
def test_labels_and_cond_change_the_distribution(arch):
    prior = _prior(arch, num_classes=3, cond_channels=2)
    codes = torch.randint(K, (2, H, W), generator=torch.Generator().manual_seed(4))
    cond = torch.randn(2, 2, H, W)
    with torch.no_grad():
        base = prior(codes, torch.tensor([0, 1]), cond)
        other_label = prior(codes, torch.tensor([1, 1]), cond)
        other_cond = prior(codes, torch.tensor([0, 1]), cond * 2)
    assert not torch.allclose(base[0], other_label[0]) and torch.equal(base[1], other_label[1])
    assert not torch.allclose(base, other_cond)
    # Both reach the very first position too, whose distribution is otherwise fixed.
    assert (base[0, :, 0, 0] - other_label[0, :, 0, 0]).abs().max() > 1e-4
    assert (base[:, :, 0, 0] - other_cond[:, :, 0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["pixelcnn", "pixelsnail"])
def test_overfits_a_tiny_code_set(arch):
    prior = _prior(arch, codebook_size=16, height=4, width=4, channels=32, layers=2)
    prior.train()
    codes = torch.randint(16, (4, 4, 4), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(150):
        loss = prior.nll(codes).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # log 16 = 2.77 nats for a uniform guess; the first position of each map is unpredictable
    # (no label), which alone costs up to log(4) / 16 = 0.09 nats per code.
    assert prior.nll(codes).mean().item() < 0.3 < math.log(16)


def test_nll_is_mean_cross_entropy_in_nats():
    prior = _prior("pixelcnn")
    codes = torch.randint(K, (3, H, W))
    logits = prior(codes)
    assert logits.shape == (3, K, H, W)
    expected = -logits.log_softmax(1).gather(1, codes[:, None]).squeeze(1).mean((1, 2))
    assert torch.allclose(prior.nll(codes), expected, atol=1e-6)


def test_config_round_trip_and_validation():
    config = _config("pixelsnail", num_classes=10, cond_channels=3, dropout=0.1)
    assert PriorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown prior config keys: colour"):
        PriorConfig.from_dict({**config.to_dict(), "colour": 1})
    for kw, message in [(dict(arch="transformer"), "arch must be one of"),
                        (dict(codebook_size=0), "codebook_size must be a positive"),
                        (dict(kernel_size=4), "kernel_size must be an odd"),
                        (dict(channels=10, attention_heads=4), "divisible by attention_heads"),
                        (dict(dropout=1.0), "dropout must be in"),
                        (dict(num_classes=0), "num_classes must be None or"),
                        (dict(cond_channels=-1), "cond_channels must be")]:
        with pytest.raises(ValueError, match=message):
            PriorConfig(**{**config.to_dict(), **kw})


@pytest.mark.parametrize("arch", ["pixelcnn", "pixelsnail"])
def test_input_errors(arch):
    plain = _prior(arch)
    codes = torch.zeros(2, H, W, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expected codes \(B, 5, 6\)"):
        plain(torch.zeros(2, H, W + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        plain(codes.float())
    with pytest.raises(ValueError, match=r"codes must be in \[0, 11\)"):
        plain(codes + K)
    with pytest.raises(ValueError, match="unconditional"):
        plain(codes, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cond_channels=0"):
        plain(codes, cond=torch.zeros(2, 1, H, W))
    conditional = _prior(arch, num_classes=3, cond_channels=2)
    labels, cond = torch.zeros(2, dtype=torch.long), torch.zeros(2, 2, H, W)
    with pytest.raises(ValueError, match="pass labels"):
        conditional(codes, cond=cond)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        conditional(codes, labels + 3, cond)
    with pytest.raises(ValueError, match=r"integer labels of shape \(2,\)"):
        conditional(codes, labels[:1], cond)
    with pytest.raises(ValueError, match="pass cond"):
        conditional(codes, labels)
    with pytest.raises(ValueError, match=r"float cond of shape \(2, 2, 5, 6\)"):
        conditional(codes, labels, cond[:, :1])
