"""Behaviour tests for vqkit.training.latents and vqkit.inspect.collapse: active units on
constructed latents, the swap cost of a decoder that ignores its latents and of one that does
not, and the collapse comparison end to end on a tiny budget."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DATA, TINY

from vqkit.data.datasets import TensorImageSet, load_dataset
from vqkit.errors import UsageError
from vqkit.inspect.collapse import CollapseRow, CollapseSettings, model_configs, run_collapse
from vqkit.nn.vae import VAEConfig
from vqkit.nn.vqvae import VQVAE
from vqkit.training.latents import ACTIVE_THRESHOLD, _LatentStats, latent_use


def test_active_units_count_the_dimensions_whose_mean_varies():
    g = torch.Generator().manual_seed(0)
    n = 400
    means = torch.zeros(n, 5)
    means[:, 0] = torch.randn(n, generator=g)                   # variance ~1: active
    means[:, 1] = 0.3 * torch.randn(n, generator=g)             # ~0.09: active
    means[:, 2] = 0.03 * torch.randn(n, generator=g)            # ~0.0009: inactive
    means[:, 3] = 7.0                                           # constant: inactive
    means[:, 4] = torch.arange(n) % 2 * 2.0                     # 0, 2, 0, ...: variance ~1, active
    stats = _LatentStats()
    nll = torch.ones(n)
    stats.add(means[:250], nll[:250], nll[:250], subpixels=10)
    stats.add(means[250:], nll[250:], nll[250:], subpixels=10)  # accumulated over batches
    use = stats.result()
    assert (use.latents, use.active_units) == (5, 3)
    assert use.active_fraction == pytest.approx(0.6)
    assert use.swap_bits_per_dim == 0.0
    assert ACTIVE_THRESHOLD == 0.01


def test_swap_cost_is_the_mean_nll_difference_in_bits_per_dim():
    stats = _LatentStats()
    own, swapped = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    stats.add(torch.randn(2, 3), own, swapped, subpixels=4)
    assert stats.result().swap_bits_per_dim == pytest.approx((2.0 + 4.0) / 2 / (4 * math.log(2)))
    with pytest.raises(UsageError, match="at least 2"):
        _LatentStats().result()


def test_a_vq_models_latent_use_counts_code_vector_dimensions():
    torch.manual_seed(0)
    model = VQVAE(TINY).eval()
    data = load_dataset(DATA, "test")
    use = latent_use(model, data, batch_size=16, limit=40)
    assert use.latents == TINY.code_dim * 7 * 7 and use.images == 40
    # The same image in every position: its codes are everyone's, so swapping costs nothing.
    same = TensorImageSet("same", data.images[:1].expand(8, -1, -1, -1).contiguous(), torch.zeros(8).long(),
                          data.class_names)
    flat = latent_use(model, same, batch_size=8)
    assert flat.swap_bits_per_dim == 0.0 and flat.active_units == 0


def test_collapse_compares_the_same_trunk():
    configs = model_configs(1, ["conv"])
    vae, vq = configs["vae-conv"], configs["vqvae-conv"]
    assert isinstance(vae, VAEConfig) and vae.likelihood == vq.likelihood == "logistic_mixture"
    assert (vae.hidden, vae.res_hidden, vae.num_res_blocks, vae.downsample) == \
        (vq.hidden, vq.res_hidden, vq.num_res_blocks, vq.downsample)
    with pytest.raises(UsageError, match="decoders"):
        CollapseSettings(data=DATA, decoders=["rnn"])


def test_collapse_row_uses_the_issues_criterion():
    row = dict(name="x", model="VAE", decoder="conv", steps=1, bits_per_dim=1.0, nll_bits_per_dim=1.0,
               kl_per_position=1.0, latents=100, swap_bits_per_dim=0.0, psnr=10.0, usage=None,
               kl_curve=([], []))
    assert CollapseRow(**row, kl_per_latent=0.05, active_units=50, active_fraction=0.5).collapsed
    assert CollapseRow(**row, kl_per_latent=0.5, active_units=10, active_fraction=0.1).collapsed
    assert not CollapseRow(**row, kl_per_latent=0.5, active_units=11, active_fraction=0.11).collapsed


def test_run_collapse_end_to_end_and_reuses_finished_runs(tmp_path, monkeypatch):
    # The comparison's trunks are the presets'; a tiny one keeps this test fast.
    import vqkit.inspect.collapse as collapse
    tiny = dict(hidden=8, res_hidden=4, num_res_blocks=1)
    real = collapse.model_configs
    monkeypatch.setattr(collapse, "model_configs", lambda c, d: {
        name: type(config).from_dict({**config.to_dict(), **tiny}) for name, config in real(c, d).items()})
    settings = CollapseSettings(data=DATA, budget=60, steps=3, batch_size=8, eval_images=20, samples=3,
                                decoders=["conv"])
    result = run_collapse(tmp_path, settings, progress=False)
    assert [row.name for row in result.rows] == ["vae-conv", "vqvae-conv"]
    vq = result.rows[1]
    assert vq.kl_per_latent == pytest.approx(math.log(256)) and vq.usage is not None
    assert result.rows[0].steps == 3 and result.rows[0].kl_curve[0]  # logged every 10 steps and at the end
    saved = json.loads((tmp_path / "collapse.json").read_text())
    assert saved["rows"][0]["collapsed"] == result.rows[0].collapsed
    assert (tmp_path / "collapse.png").stat().st_size > 0 and (tmp_path / "samples.png").stat().st_size > 0
    assert "vqvae-conv" in result.table()
    again = run_collapse(tmp_path, settings, progress=False)  # nothing retrained: same figures
    assert again.rows[0].bits_per_dim == result.rows[0].bits_per_dim
    from vqkit.inspect.report import build_report
    report = build_report(tmp_path, tmp_path / "collapse.html", progress=False)
    assert report.section_ids == ["collapse", "collapse-figure", "samples-figure"]
