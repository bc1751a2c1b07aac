"""Behaviour tests for priors conditioned on coarser code maps (VQ-VAE-2 Algorithm 2): the
conditioning reaches the positions a coarse code covers, keeps the prior causal, samples the
same incrementally as naively, round-trips through JSON, and carries real information."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vqkit.prior import PriorConfig, build_prior, sample

ARCHS = ["pixelcnn", "pixelsnail"]
H, W, K = 6, 6, 11
# Three levels: this prior (6x6) is conditioned on a middle map (3x3, factor 2) and a top map
# (1x2, factors 6 and 3).
TWO_MAPS = [[5, 3, 3], [3, 1, 2]]


def _prior(arch, **kw):
    torch.manual_seed(0)
    config = dict(arch=arch, codebook_size=K, height=H, width=W, channels=16, layers=3,
                  attention_heads=2, attention_every=2, cond_codes=TWO_MAPS)
    return build_prior(PriorConfig(**{**config, **kw})).eval()


def _cond_codes(specs, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(k, (n, h, w), generator=g) for k, h, w in specs]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cond_layers", [0, 2])
def test_a_top_code_reaches_the_bottom_positions_it_covers(arch, cond_layers):
    prior = _prior(arch, cond_codes=[[5, 3, 3]], cond_layers=cond_layers)
    codes = torch.randint(K, (1, H, W), generator=torch.Generator().manual_seed(2))
    (top,) = _cond_codes(prior.config.cond_codes, 1)
    # One copy of the top map per top cell, with that cell's code changed.
    cells = 9
    perturbed = top.repeat(cells, 1, 1)
    perturbed.view(cells, cells)[torch.arange(cells), torch.arange(cells)] = (top.flatten() + 1) % 5
    with torch.no_grad():
        # Same batch size in both passes: a convolution may round differently for another one.
        base = prior(codes.repeat(cells, 1, 1), cond_codes=[top.repeat(cells, 1, 1)])
        out = prior(codes.repeat(cells, 1, 1), cond_codes=[perturbed])
    changed = (out != base).any(1)  # (cells, H, W)
    reach = 2 * cond_layers  # top cells: two 3x3 convolutions per residual block
    for cell in range(cells):
        ti, tj = divmod(cell, 3)
        assert changed[cell, 2 * ti:2 * ti + 2, 2 * tj:2 * tj + 2].all(), (cell, changed[cell])
        # The bias changes only within ``reach`` top cells, and the prior is causal, so no logit
        # before the first bottom position of that neighbourhood can change.
        first = 2 * max(ti - reach, 0) * W + 2 * max(tj - reach, 0)
        assert not changed[cell].flatten()[:first].any(), (cell, changed[cell])


@pytest.mark.parametrize("arch", ARCHS)
def test_bottom_stays_causal_given_the_top(arch):
    prior = _prior(arch)
    codes = torch.randint(K, (1, H, W), generator=torch.Generator().manual_seed(3))
    cond_codes = _cond_codes(TWO_MAPS, 1)
    n = H * W
    perturbed = codes.repeat(n, 1, 1)
    flat = perturbed.view(n, n)
    flat[torch.arange(n), torch.arange(n)] = (flat.diagonal() + 1 + torch.arange(n) % (K - 1)) % K
    cond_codes = [m.repeat(n, 1, 1) for m in cond_codes]
    with torch.no_grad():
        # Same batch size in both passes: a convolution may round differently for another one.
        base = prior(codes.repeat(n, 1, 1), cond_codes=cond_codes)
        out = prior(perturbed, cond_codes=cond_codes)
    changed = (out != base).any(1).flatten(1)  # changed[q, p]: code q moved the logits at p
    assert not changed.tril().any(), torch.nonzero(changed.tril()).tolist()
    right = [q for q in range(n - 1) if (q + 1) % W]
    assert changed[right, [q + 1 for q in right]].all()


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_sampler_equals_naive_with_cond_codes(arch):
    prior = _prior(arch, num_classes=3, cond_channels=2, kernel_size=5)
    with torch.no_grad():  # sharper than at initialisation, so that top_k removes codes
        prior.head[-1].weight.mul_(8)
    labels, cond = torch.tensor([0, 2, 1]), torch.randn(3, 2, H, W, generator=torch.Generator().manual_seed(4))
    cond_codes = _cond_codes(TWO_MAPS, 3)
    for seed in (1, 2):
        runs = [sample(prior, 3, labels, cond, cond_codes, top_k=6, generator=torch.Generator().manual_seed(seed),
                       method=m) for m in ("naive", "incremental")]
        assert torch.equal(*runs)
    other = sample(prior, 3, labels, cond, _cond_codes(TWO_MAPS, 3, seed=5), top_k=6,
                   generator=torch.Generator().manual_seed(2))
    assert not torch.equal(runs[1], other)


def test_config_round_trip_and_validation():
    config = PriorConfig(arch="pixelsnail", codebook_size=K, height=H, width=W, channels=16, layers=2,
                         attention_heads=2, cond_codes=[(5, 3, 3), [3, 1, 2]], cond_layers=1)
    assert config.cond_codes == TWO_MAPS
    again = PriorConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    prior = build_prior(config)
    build_prior(again).load_state_dict(prior.state_dict())  # a checkpoint rebuilds from its config
    assert PriorConfig().cond_codes == [] and PriorConfig().cond_codes is not PriorConfig().cond_codes
    for kw, message in [(dict(cond_codes=[[5, 4, 3]]), r"cond_codes\[0\]: a 4x3 map does not divide the prior's 6x6"),
                        (dict(cond_codes=[[5, 3, 3], [3, 12, 6]]), r"cond_codes\[1\]: a 12x6 map does not"),
                        (dict(cond_codes=[[5, 3]]), r"cond_codes\[0\] must be \[codebook_size, height, width\]"),
                        (dict(cond_codes=[[0, 3, 3]]), "positive integers"),
                        (dict(cond_codes=[5, 3, 3]), r"cond_codes\[0\] must be"),
                        (dict(cond_codes="top"), "cond_codes must be a list"),
                        (dict(cond_layers=-1), "cond_layers must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            PriorConfig(**{**config.to_dict(), **kw})


@pytest.mark.parametrize("arch", ARCHS)
def test_cond_codes_errors(arch):
    prior = _prior(arch)
    codes = torch.zeros(2, H, W, dtype=torch.long)
    middle, top = _cond_codes(TWO_MAPS, 2)
    for cond_codes, message in [(None, r"conditioned on 2 code map\(s\): pass cond_codes=\[\(2, 3, 3\) in \[0, 5\)"),
                                (middle, "cond_codes must be a list of code maps"),
                                ([middle], r"expected 2 conditioning code map\(s\).*got 1"),
                                ([middle, top, top], "got 3"),
                                ([top, middle], r"cond_codes\[0\]: expected codes \(2, 3, 3\), got \(2, 1, 2\)"),
                                ([middle[:1], top], r"cond_codes\[0\]: expected codes \(2, 3, 3\), got \(1, 3, 3\)"),
                                ([middle, top.float()], r"cond_codes\[1\]: codes must be an integer tensor"),
                                ([middle + 5, top], r"cond_codes\[0\]: codes must be in \[0, 5\), got values in"),
                                ([middle, top - 3], r"cond_codes\[1\]: codes must be in \[0, 3\)")]:
        with pytest.raises(ValueError, match=message):
            prior(codes, cond_codes=cond_codes)
    with pytest.raises(ValueError, match="pass cond_codes"):
        prior.nll(codes)
    with pytest.raises(ValueError, match="pass cond_codes"):
        prior.incremental(2)
    with pytest.raises(ValueError, match=r"expected 2 conditioning code map"):
        sample(prior, 2, cond_codes=[middle])
    plain = _prior(arch, cond_codes=[])
    with pytest.raises(ValueError, match="takes no conditioning code maps"):
        plain(codes, cond_codes=[top])
    assert plain(codes, cond_codes=[]).shape == plain(codes).shape == (2, K, H, W)


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_a_bottom_map_that_the_top_map_determines(arch):
    # Each top code fixes the 2x2 bottom codes it covers through a random table: given the top
    # map, every bottom code is predictable, including the first one of each map.
    k_top, k = 4, 8
    g = torch.Generator().manual_seed(6)
    table = torch.randint(k, (k_top, 2, 2), generator=g)
    top = torch.randint(k_top, (32, 2, 2), generator=g)
    bottom = table[top].permute(0, 1, 3, 2, 4).reshape(32, 4, 4)  # bottom[2i+a, 2j+b] = table[top[i, j], a, b]
    prior = _prior(arch, codebook_size=k, height=4, width=4, channels=32, layers=2,
                   cond_codes=[[k_top, 2, 2]], cond_layers=1).train()
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(60):
        loss = prior.nll(bottom, cond_codes=[top]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    with torch.no_grad():
        matched = prior.nll(bottom, cond_codes=[top]).mean().item()
        mismatched = prior.nll(bottom, cond_codes=[top.roll(1, 0)]).mean().item()
    assert matched < 0.1 < math.log(k), matched
    # The information comes from the top map: given another map's top codes, the prior is
    # confidently wrong.
    assert mismatched > 1.0, mismatched
