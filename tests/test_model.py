import pytest
import torch

from vqkit.nn.presets import PRESETS, preset
from vqkit.nn.vqvae import VQVAE, VQVAEConfig

TINY = dict(hidden=8, res_hidden=4, num_res_blocks=1, code_dim=4, codebook_size=16)


@pytest.mark.parametrize("name,shape,latent", [
    ("cifar10", (2, 3, 32, 32), (16, 16)),
    ("cifar10-paper", (2, 3, 32, 32), (8, 8)),
    ("mnist", (2, 1, 28, 28), (7, 7)),
    ("demo", (2, 1, 28, 28), (7, 7)),
])
def test_presets_shapes(name, shape, latent):
    torch.manual_seed(0)
    model = VQVAE(preset(name))
    x = torch.rand(shape) * 2 - 1
    out = model(x)
    assert [c.shape for c in out.codes] == [(shape[0], *latent)]
    assert out.x_hat.shape == shape
    assert out.nll.shape == (shape[0],)
    model.eval()
    assert model.decode(model.encode(x)).shape == shape


def test_paper_preset_is_section_4_1():
    c = PRESETS["cifar10-paper"]
    assert (c.hidden, c.res_hidden, c.num_res_blocks, c.downsample, c.codebook_size) == (256, 256, 2, 2, 512)
    assert c.beta == 0.25


@pytest.mark.parametrize("likelihood", ["gaussian", "logistic_mixture"])
def test_training_step_reaches_encoder_decoder_and_codebook(likelihood):
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=3, ema=False, kmeans_init=False, restart_after=0,
                              likelihood=likelihood, **TINY))
    out = model(torch.rand(2, 3, 8, 8) * 2 - 1)
    out.loss.backward()
    assert model.encoders[0].net[0].weight.grad.abs().sum() > 0
    assert model.decoder.net[0].weight.grad.abs().sum() > 0
    assert model.quantizers[0].codebook.grad.abs().sum() > 0
    assert torch.isfinite(out.nll).all()


def test_reconstruction_gradient_does_not_leak_into_the_codebook():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=1, ema=False, kmeans_init=False, restart_after=0, **TINY))
    out = model(torch.rand(2, 1, 8, 8) * 2 - 1)
    grad = torch.autograd.grad(out.recon_loss, model.quantizers[0].codebook, allow_unused=True)[0]
    assert grad is None or torch.count_nonzero(grad) == 0


def test_size_not_divisible_by_stride_is_a_clear_error():
    model = VQVAE(VQVAEConfig(in_channels=1, downsample=2, **TINY))
    with pytest.raises(ValueError, match="not divisible by the model's total stride 4"):
        model(torch.zeros(1, 1, 30, 28))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, H, W\)"):
        model(torch.zeros(1, 3, 28, 28))


def test_config_round_trip_and_validation():
    config = preset("mnist")
    assert VQVAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown VQ-VAE config keys: bogus"):
        VQVAEConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="likelihood"):
        VQVAEConfig(likelihood="laplace")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("imagenet")
