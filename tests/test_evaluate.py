"""Behaviour tests for vqkit.training.evaluate: every figure recomputed by hand from model outputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import TINY, TINY2

from vqkit.data.datasets import TensorImageSet, to_model
from vqkit.nn.vqvae import VQVAE, VQVAE2, VQVAEConfig
from vqkit.training.evaluate import evaluate, ms_ssim_per_image, ms_ssim_window


def _dataset(n: int = 20, channels: int = 1, size: int = 16, seed: int = 0) -> TensorImageSet:
    """Smooth random images (blurred noise), so a few training steps give a non-trivial model."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, channels, size // 4, size // 4, generator=g)
    images = torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear")
    images = (images * 255).round().to(torch.uint8)
    return TensorImageSet("synthetic", images, torch.zeros(n, dtype=torch.int64), ["x"])


def _trained(config: VQVAEConfig, data: TensorImageSet, steps: int = 5) -> VQVAE:
    torch.manual_seed(0)
    model = VQVAE(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = to_model(data.images)
    for _ in range(steps):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model


def _by_hand(model: VQVAE, images: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        x = to_model(images)
        out = model(x)
        [codes] = model.encode(x)
    x01 = (x.double() + 1) / 2
    rec01 = (out.x_hat.double().clamp(-1, 1) + 1) / 2
    mse = float((rec01 - x01).square().mean())
    k = model.config.codebook_size
    counts = torch.bincount(codes.flatten(), minlength=k).double()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    subpixels = x[0].numel()
    latents = codes[0].numel()
    nll = float(out.nll.double().mean())
    return {
        "mse": mse,
        "codes_used": len(torch.unique(codes)),
        "perplexity": math.exp(entropy),
        "nll_bits_per_dim": nll / (subpixels * math.log(2)),
        "bits_per_dim": (nll + latents * math.log(k)) / (subpixels * math.log(2)),
    }


@pytest.mark.parametrize("likelihood", ["gaussian", "logistic_mixture"])
def test_figures_match_hand_computation(likelihood):
    config = dataclasses.replace(TINY, likelihood=likelihood, mixtures=2)
    data = _dataset(24)
    model = _trained(config, data)
    limit = 19  # batches of 7, 7, 5: a partial last batch, and the limit is honoured
    result = evaluate(model, data, batch_size=7, limit=limit)
    hand = _by_hand(model, data.images[:limit])

    assert result.images == limit
    assert result.mse == pytest.approx(hand["mse"], rel=1e-5)
    assert result.psnr == pytest.approx(10 * math.log10(1 / result.mse), rel=1e-12)
    assert result.codes_used == hand["codes_used"]
    assert 2 <= result.codes_used <= config.codebook_size == result.codebook_size
    assert result.usage == pytest.approx(result.codes_used / config.codebook_size)
    assert result.perplexity == pytest.approx(hand["perplexity"], rel=1e-5)
    assert result.nll_bits_per_dim == pytest.approx(hand["nll_bits_per_dim"], rel=1e-5)
    assert result.bits_per_dim == pytest.approx(hand["bits_per_dim"], rel=1e-5)
    assert result.bits_per_dim > result.nll_bits_per_dim
    # log2(16) bits for each of 4x4 latents, spread over 16x16 subpixels
    assert result.bits_per_dim - result.nll_bits_per_dim == pytest.approx(16 * 4 / 256, rel=1e-5)


def test_figures_do_not_depend_on_batch_size():
    data = _dataset(20)
    model = _trained(TINY, data)
    a = evaluate(model, data, batch_size=20)
    b = evaluate(model, data, batch_size=3)
    for field in ("mse", "psnr", "nll_bits_per_dim", "bits_per_dim", "perplexity"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-5), field
    assert a.codes_used == b.codes_used and a.images == b.images == 20


def test_rgb_mse_averages_over_every_subpixel():
    config = dataclasses.replace(TINY, in_channels=3)
    data = _dataset(10, channels=3)
    model = _trained(config, data, steps=3)
    result = evaluate(model, data, batch_size=4)
    hand = _by_hand(model, data.images)
    assert result.mse == pytest.approx(hand["mse"], rel=1e-5)
    assert result.bits_per_dim == pytest.approx(hand["bits_per_dim"], rel=1e-5)


def test_evaluate_leaves_model_untouched():
    data = _dataset(12)
    model = _trained(TINY, data)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, data, batch_size=5)
    assert model.training  # training mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no EMA, variance or restart bookkeeping changed
    model.eval()
    evaluate(model, data, batch_size=5)
    assert not model.training


def test_empty_evaluation_is_an_error():
    data = _dataset(4)
    model = _trained(TINY, data, steps=1)
    with pytest.raises(ValueError, match="synthetic"):
        evaluate(model, data, limit=0)


def _overshooting(config: VQVAEConfig, data: TensorImageSet, gain: float = 20.0) -> VQVAE:
    """A briefly trained model whose last decoder layer is scaled by ``gain``: most of its
    reconstructions lie outside [-1, 1]."""
    model = _trained(config, data, steps=2)
    last = [m for m in model.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.weight.mul_(gain)
        if last.bias is not None:
            last.bias.mul_(gain)
    return model


def test_mse_and_psnr_clamp_reconstructions_to_the_pixel_range():
    """MSE on the [0, 1] scale of the reconstruction clamped to [-1, 1], the pixels any output
    image can hold, not of the decoder's raw mean."""
    data = _dataset(10)
    model = _overshooting(TINY, data)
    model.eval()
    with torch.no_grad():
        x = to_model(data.images).double()
        x_hat = model(to_model(data.images)).x_hat.double()
    assert float((x_hat.abs() > 1).double().mean()) > 0.3  # the test needs outputs out of range
    clamped = float((((x_hat.clamp(-1, 1) + 1) / 2 - (x + 1) / 2) ** 2).mean())
    raw = float((((x_hat + 1) / 2 - (x + 1) / 2) ** 2).mean())
    assert raw > 2 * clamped
    result = evaluate(model, data, batch_size=4)
    assert result.mse == pytest.approx(clamped, rel=1e-5), f"evaluate's MSE {result.mse}, clamped {clamped}, raw {raw}"
    assert result.psnr == pytest.approx(10 * math.log10(1 / clamped), rel=1e-5)
    assert result.levels[0].psnr_upto == pytest.approx(10 * math.log10(1 / clamped), rel=1e-5)


def test_each_prefix_gets_its_psnr_gain_share_and_ms_ssim():
    """Per prefix of a hierarchy: PSNR of decode_levels, the gain over the prefix above (the
    top's over the test set's mean colour), shares that sum to 1, and MS-SSIM by hand."""
    data = _dataset(12, size=48)
    torch.manual_seed(0)
    model = VQVAE2(dataclasses.replace(TINY2, prefix_training="loss"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        out = model(to_model(data.images))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    result = evaluate(model, data, batch_size=5)
    model.eval()
    x01 = data.images.double() / 255
    mean_colour = float((x01 - x01.mean(dim=(0, 2, 3), keepdim=True)).square().mean())
    assert result.psnr_mean_colour == pytest.approx(10 * math.log10(1 / mean_colour), rel=1e-6)
    codes = model.encode(to_model(data.images))
    previous = result.psnr_mean_colour
    assert result.ms_ssim_window == 3  # 48 pixels a side: room for a 3-pixel window after four halvings
    for upto, level in enumerate(result.levels, 1):
        rec01 = (model.decode_levels(codes, upto).double() + 1) / 2
        assert level.psnr_upto == pytest.approx(10 * math.log10(1 / float((rec01 - x01).square().mean())), rel=1e-5)
        assert level.psnr_gain == pytest.approx(level.psnr_upto - previous, abs=1e-9)
        assert level.ms_ssim_upto == pytest.approx(float(ms_ssim_per_image(rec01, x01, 3).mean()), rel=1e-5)
        previous = level.psnr_upto
    assert sum(lv.gain_share for lv in result.levels) == pytest.approx(1.0)
    assert result.levels[-1].gain_share == pytest.approx(
        (result.psnr - result.levels[0].psnr_upto) / (result.psnr - result.psnr_mean_colour))
    assert result.ms_ssim == result.levels[-1].ms_ssim_upto
    assert "of the gain over the mean colour" in result.summary()


def test_ms_ssim_window_and_known_values():
    assert [ms_ssim_window(s, s) for s in (32, 33, 48, 128, 160, 161, 512)] == [None, 3, 3, 7, 9, 11, 11]
    from vqkit.codec.rd import ms_ssim
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 170, 180, generator=g) * 255).round().to(torch.uint8)
    y = (x.double() + 40 * torch.randn(3, 170, 180, generator=g)).clamp(0, 255).round().to(torch.uint8)
    value = float(ms_ssim_per_image(x[None].double() / 255, y[None].double() / 255, 11)[0])
    assert value == pytest.approx(ms_ssim(x, y), rel=1e-9)  # the paper's settings, as `vqkit rd` measures
    assert 0 < value < 0.99
    assert float(ms_ssim_per_image(x[None].double() / 255, x[None].double() / 255, 11)[0]) == pytest.approx(1.0)
