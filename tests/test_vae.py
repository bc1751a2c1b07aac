"""Behaviour tests for vqkit.nn.vae: the KL formula, the ELBO, reparameterised gradients, the
config, sampling, saving, and the stage-1 commands that take a Gaussian VAE run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import DATA, TINY_NET

from vqkit.data.datasets import load_dataset
from vqkit.errors import ConfigError, UsageError
from vqkit.nn.likelihood import discretized_logistic_log_prob
from vqkit.nn.presets import preset
from vqkit.nn.vae import GaussianVAE, VAEConfig, elbo_bits_per_dim, gaussian_kl
from vqkit.nn.vqvae import build_model
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import vae_samples
from vqkit.training.latents import evaluate_vae
from vqkit.training.stage1 import TrainConfig, train

TINY_VAE = VAEConfig(in_channels=1, downsample=2, mixtures=2, **TINY_NET)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_kl_matches_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.0, 1.5, -0.7, 0.3])
    log_var = torch.tensor([0.0, -1.0, 0.8, -3.0])
    z = mean + torch.exp(0.5 * log_var) * torch.randn(400_000, 4, generator=g)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(0.0, 1.0)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(0)
    closed = gaussian_kl(mean, log_var)
    assert torch.allclose(closed, monte_carlo, atol=0.01)
    assert closed[0] == 0  # q = p
    assert torch.allclose(closed, torch.distributions.kl_divergence(q, p))


def test_loss_is_the_negative_elbo_per_subpixel():
    torch.manual_seed(0)
    model = GaussianVAE(TINY_VAE)
    x = _images()
    out = model(x)
    assert out.mean.shape == out.log_var.shape == (4, 4, 7, 7)
    assert out.nll.shape == out.kl.shape == (4,)
    assert torch.allclose(out.kl, gaussian_kl(out.mean, out.log_var).flatten(1).sum(1))
    assert torch.allclose(out.loss, (out.nll + out.kl).mean() / x[0].numel(), rtol=1e-5)
    assert math.isclose(elbo_bits_per_dim(2.0 * math.log(2) * 784, 0.0, 784), 2.0)


def test_gradients_reach_the_encoder_through_the_sample():
    torch.manual_seed(0)
    model = GaussianVAE(TINY_VAE)
    model(_images()).loss.backward()
    first = model.encoder.net[0].weight.grad
    assert first is not None and first.abs().sum() > 0
    # The reparameterised sample's noise differs between passes; the posterior does not.
    a, b = model(_images()), model(_images())
    assert torch.equal(a.mean, b.mean) and not torch.equal(a.nll, b.nll)


def test_nll_is_the_likelihood_of_the_decoded_latents():
    torch.manual_seed(0)
    model = GaussianVAE(dataclasses.replace(TINY_VAE, mixtures=1)).eval()
    x = _images(2)
    z = model.encode(x)
    params = model.decoder(z).view(2, 3, 1, 1, 28, 28)  # logits, means, log-scales of 1 component
    log_p = discretized_logistic_log_prob(x, params[:, 1, 0], params[:, 2, 0].clamp(min=-7.0))
    assert torch.allclose(model.nll(x, z), -log_p.flatten(1).sum(1), rtol=1e-5)


def test_config_refuses_the_mse_likelihood_and_round_trips():
    with pytest.raises(ConfigError, match="true likelihood"):
        VAEConfig(likelihood="gaussian")
    with pytest.raises(ConfigError, match="downsample"):
        VAEConfig(downsample=-1)
    with pytest.raises(ConfigError, match="not divisible"):
        TINY_VAE.latent_shape(30, 28)
    assert VAEConfig.from_dict(TINY_VAE.to_dict()) == TINY_VAE
    config = preset("vae-mnist")
    assert isinstance(build_model(config), GaussianVAE)
    assert config.latent_shape(28, 28) == (7, 7)


def test_bad_input_is_a_clear_error():
    model = GaussianVAE(TINY_VAE)
    with pytest.raises(UsageError, match="expected images"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(UsageError, match="expected latents"):
        model.decode(torch.zeros(2, 5, 7, 7))


def test_sampling_is_seeded_and_in_range():
    torch.manual_seed(0)
    model = GaussianVAE(TINY_VAE).eval()
    a = model.sample(3, 28, 28, torch.Generator().manual_seed(1))
    b = model.sample(3, 28, 28, torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_bf16_autocast_forward_is_finite():
    torch.manual_seed(0)
    model = GaussianVAE(TINY_VAE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_images())
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GaussianVAE(TINY_VAE).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = GaussianVAE.from_pretrained(tmp_path / "m")
    x = _images(2)
    assert torch.equal(loaded.encode(x), model.encode(x))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vae") / "run"
    train(run, TINY_VAE, TrainConfig(data=DATA, steps=3, batch_size=8), progress=False, tensorboard=False)
    return run


def test_a_vae_run_trains_evaluates_and_samples(vae_run):
    model, checkpoint = ckpt.load_model(vae_run, kinds=ckpt.STAGE1_KINDS)
    assert isinstance(model, GaussianVAE) and checkpoint.step == 3
    assert ckpt.read_config(vae_run)["image_shape"] == [1, 28, 28]
    result = evaluate_vae(model, load_dataset(DATA, "test"), batch_size=16, limit=40)
    assert result.images == 40 and result.latents == 4 * 7 * 7
    assert math.isclose(result.bits_per_dim, result.nll_bits_per_dim + result.kl_bits_per_dim, rel_tol=1e-9)
    assert math.isclose(result.kl_per_position, 4 * result.kl_per_latent, rel_tol=1e-9)
    samples = vae_samples(vae_run, 5, seed=0)
    assert samples.shape == (5, 1, 28, 28) and samples.dtype == torch.uint8
    assert torch.equal(samples, vae_samples(vae_run, 5, seed=0))


def test_commands_that_need_codes_refuse_a_vae_run(vae_run):
    with pytest.raises(ckpt.CheckpointError, match="Gaussian VAE"):
        ckpt.load_model(vae_run)


def test_a_vae_run_exports_and_reports(vae_run, tmp_path):
    from vqkit.inspect.report import build_report
    from vqkit.runs.export import export_run

    out = export_run(vae_run, tmp_path / "model")
    loaded = GaussianVAE.from_pretrained(out)
    model, _ = ckpt.load_model(vae_run, kinds=("vae",))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert "# Gaussian VAE" in (out / "README.md").read_text()
    report = build_report(vae_run, tmp_path / "r.html", data=DATA, progress=False)
    assert {"summary", "reconstructions", "samples"} <= set(report.section_ids)
