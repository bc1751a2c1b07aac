"""The PixelCNN likelihood (vqkit.nn.pixelcnn) against its maths: causal over the subpixels in
(raster, R, G, B) order, the NLL the exact sum of the per-subpixel conditionals, each conditional
a distribution over the 256 values, the mixture and coupling as written, the incremental sampler
the naive one; and as the likelihood of a VQ-VAE and a VQ-VAE-2, from the Python API and the
command line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA, cli_ok

from vqkit.cli.main import main
from vqkit.codec.codec import Codec
from vqkit.data.images import load_image, save_png
from vqkit.errors import ConfigError
from vqkit.nn.likelihood import GaussianLikelihood, LogisticMixtureLikelihood, make_likelihood
from vqkit.nn.pixelcnn import PixelCNNLikelihood
from vqkit.nn.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig, build_model
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import decode_codes

VALUES = torch.arange(256) / 127.5 - 1
TINY = dict(hidden=8, res_hidden=4, num_res_blocks=1, code_dim=4, likelihood="pixelcnn", mixtures=3,
            pixelcnn_layers=2, pixelcnn_channels=8, pixelcnn_kernel_size=3)


def _likelihood(channels: int, seed: int = 0, **kw) -> PixelCNNLikelihood:
    torch.manual_seed(seed)
    lik = PixelCNNLikelihood(channels, **{**dict(mixtures=3, layers=2, width=8, kernel_size=3), **kw})
    with torch.no_grad():  # sharper than at initialisation, so that every input matters
        lik.head[-1].weight.mul_(4)
    return lik


def _inputs(lik: PixelCNNLikelihood, b: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(b, lik.decoder_channels, h, w, generator=g)
    x = VALUES[torch.randint(256, (b, lik.channels, h, w), generator=g)]
    return params, x


def _order(lp: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W*C): the subpixels in raster order, then channel order."""
    return lp.permute(0, 2, 3, 1).flatten(1)


@pytest.mark.parametrize("channels", [1, 3])
def test_causal_over_subpixels_in_raster_then_channel_order(channels):
    """Perturbing subpixel t changes no conditional before t and some after it; nor does it
    change the network's output at its own pixel (the coupling alone carries it to the pixel's
    later subpixels)."""
    lik = _likelihood(channels)
    params, x = _inputs(lik, 1, 3, 4)
    with torch.no_grad():
        base = _order(lik.log_probs(params, x))[0]
        head = lik._head(params, x)
        n = base.numel()
        for t in range(n - 1):
            pixel, c = divmod(t, channels)
            i, j = divmod(pixel, 4)
            y = x.clone()
            y[0, c, i, j] = -x[0, c, i, j] + 0.5  # another value
            moved = _order(lik.log_probs(params, y))[0]
            torch.testing.assert_close(moved[:t], base[:t], rtol=0, atol=1e-6)
            assert (moved[t + 1:] - base[t + 1:]).abs().max() > 1e-4, f"subpixel {t} reaches nothing after it"
            torch.testing.assert_close(lik._head(params, y)[:, i, j], head[:, i, j], rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels,h,w", [(1, 3, 3), (3, 2, 2)])
def test_nll_is_the_sum_of_each_subpixels_conditional_computed_alone(channels, h, w):
    """The vectorised NLL (each pixel's joint, teacher-forced) against, for every subpixel on its
    own, its 256-way conditional from the network run on the image: each sums to 1, and the
    log-probabilities of the true values sum to -NLL."""
    lik = _likelihood(channels)
    params, x = _inputs(lik, 2, h, w)
    with torch.no_grad():
        out = lik(params, x)
        total = torch.zeros(2, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                head = lik._head(params, x)[:, i, j]
                for c in range(channels):
                    lp = lik.value_log_probs(head, x[:, :, i, j], c)
                    assert lp.shape == (2, 256)
                    torch.testing.assert_close(lp.exp().sum(1), torch.ones(2), rtol=0, atol=1e-4)
                    v = ((x[:, c, i, j] + 1) * 127.5).round().long()
                    total += lp.gather(1, v[:, None])[:, 0].double()
        torch.testing.assert_close(out.nll.double(), -total, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lik.log_probs(params, x).flatten(1).sum(1), -out.nll, rtol=1e-5, atol=1e-4)
    assert out.loss.item() == pytest.approx(out.nll.mean().item() / (channels * h * w), rel=1e-5)


def _logistic_bins(mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """P(v) of the 256 values v under the discretised logistic, written out in float64: the
    sigmoid's differences across each bin, the end bins taking the tails. (...) -> (..., 256)."""
    s = log_scale.double().exp()[..., None]
    edges = (torch.arange(1, 256, dtype=torch.float64) - 0.5) / 127.5 - 1  # the 255 inner bin edges
    cdf = torch.sigmoid((edges - mean.double()[..., None]) / s)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf, torch.ones_like(cdf[..., :1])], -1)
    return cdf[..., 1:] - cdf[..., :-1]


def test_mixture_and_coupling_are_pixelcnn_plus_plus():
    """Head parameters laid out per component as [logit, 3 means, 3 log-scales, 3 coefficients]:
    p(r, g, b) = sum_k pi_k L(r; mu_R) L(g; mu_G + a_0 r) L(b; mu_B + a_1 r + a_2 g), written out
    over every (g, b) for one r; its sums over b and over (g, b) give the G and R conditionals,
    against those the likelihood gives."""
    lik = _likelihood(3, mixtures=2)
    logits = torch.tensor([0.3, -0.4])
    mu = torch.tensor([[-0.2, 0.1, 0.4], [0.5, -0.3, 0.0]])
    log_s = torch.tensor([[-2.0, -2.5, -1.5], [-1.8, -2.2, -2.8]])
    raw = torch.tensor([[0.7, -0.9, 0.2], [-0.3, 0.6, 1.1]])  # tanh gives the coefficients
    out = torch.cat([logits[:, None], mu, log_s, raw], 1).flatten()[None]
    pi, a = logits.double().softmax(0), raw.double().tanh()
    rv, gv, bv = 100, 140, 90
    r, values = VALUES[rv].double(), VALUES.double()
    p_r = _logistic_bins(mu[:, 0], log_s[:, 0])[:, rv]  # (M,)
    p_g = torch.stack([_logistic_bins(mu[k, 1] + a[k, 0] * r, log_s[k, 1]) for k in range(2)])  # (M, 256)
    p_b = torch.stack([_logistic_bins(mu[k, 2] + a[k, 1] * r + a[k, 2] * values, log_s[k, 2].expand(256))
                       for k in range(2)])  # (M, 256 g, 256 b)
    joint = (pi[:, None, None] * p_r[:, None, None] * p_g[:, :, None] * p_b).sum(0)  # (256 g, 256 b)
    marginal_r = joint.sum()
    pixel = VALUES[torch.tensor([[rv, gv, bv]])]
    got = [lik.value_log_probs(out, pixel, c)[0].double().exp() for c in range(3)]
    assert got[0][rv].item() == pytest.approx(marginal_r.item(), rel=1e-4)
    torch.testing.assert_close(got[1], joint.sum(1) / marginal_r, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got[2], joint[gv] / joint[gv].sum(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_incremental_sampling_equals_naive_sampling(channels, temperature):
    lik = _likelihood(channels, kernel_size=5, layers=3)
    params, _ = _inputs(lik, 3, 5, 6)
    runs = {m: lik.reconstruct(params, torch.Generator().manual_seed(7), temperature, method=m)
            for m in ("naive", "incremental")}
    assert runs["naive"].shape == (3, channels, 5, 6)
    assert torch.equal(runs["naive"], runs["incremental"])
    values = (runs["naive"] + 1) * 127.5
    torch.testing.assert_close(values, values.round(), rtol=0, atol=1e-3)  # on the grid of 8-bit values
    assert len(values.round().unique()) > 10
    other = lik.reconstruct(params, torch.Generator().manual_seed(8), temperature)
    assert not torch.equal(other, runs["naive"])


def test_sampling_follows_the_model():
    """One pixel, many draws: the empirical frequencies of R match its 256-way distribution."""
    lik = _likelihood(3)
    params, _ = _inputs(lik, 1, 1, 1)
    n = 4000
    draws = lik.reconstruct(params.expand(n, -1, -1, -1), torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = lik.value_log_probs(lik._head(params, torch.zeros(1, 3, 1, 1))[:, 0, 0], torch.zeros(1, 3), 0).exp()[0]
    counts = torch.bincount(((draws[:, 0, 0, 0] + 1) * 127.5).round().long(), minlength=256).float() / n
    assert (counts.cumsum(0) - probs.cumsum(0)).abs().max() < 0.03  # Kolmogorov-Smirnov distance


def test_each_subpixel_is_drawn_by_inverting_its_conditional():
    """A 1x1 image: the sampler's R, then G given that R, then B given both, are the inverse CDFs
    of value_log_probs's conditionals at the uniforms it draws, (n, 1, 1, C) float64 from the
    generator."""
    lik = _likelihood(3)
    n = 64
    params, _ = _inputs(lik, n, 1, 1)
    drawn = lik.reconstruct(params, torch.Generator().manual_seed(5))[:, :, 0, 0]
    u = torch.rand(n, 1, 1, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[:, 0, 0]
    with torch.no_grad():
        head = lik._head(params, torch.zeros(n, 3, 1, 1))[:, 0, 0]
        for c in range(3):
            cdf = lik.value_log_probs(head, drawn, c).double().exp().cumsum(1)
            expected = torch.searchsorted(cdf, (u[:, c] * cdf[:, -1])[:, None]).squeeze(1)
            torch.testing.assert_close(drawn[:, c], VALUES[expected], rtol=0, atol=1e-6)


def test_reconstruct_without_a_generator_is_seeded_and_leaves_the_global_rng():
    lik = _likelihood(1)
    params, _ = _inputs(lik, 2, 3, 3)
    state = torch.get_rng_state()
    a, b = lik.reconstruct(params), lik.reconstruct(params)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, lik.reconstruct(params, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="method must be one of"):
        lik.reconstruct(params, method="fast")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        lik.reconstruct(params, temperature=0)


def test_every_likelihood_has_reconstruct_and_says_whether_it_is_autoregressive():
    params = torch.randn(2, 45, 4, 4)
    kinds = [("gaussian", GaussianLikelihood, False), ("logistic_mixture", LogisticMixtureLikelihood, False),
             ("pixelcnn", PixelCNNLikelihood, True)]
    for kind, cls, ar in kinds:
        lik = make_likelihood(VQVAEConfig(likelihood=kind, **({"pixelcnn_channels": 30} if ar else {})))
        assert isinstance(lik, cls) and lik.autoregressive is ar
        p = params[:, :lik.decoder_channels]
        image = lik.reconstruct(p)
        assert image.shape == (2, 3, 4, 4)
        if not ar:
            assert torch.equal(image, lik.mean(p))


def _check_model(model: VQVAE, x: torch.Tensor, tmp_path) -> None:
    out = model(x)
    out.loss.backward()
    assert model.likelihood.stack[0].vertical.linear.weight.grad.abs().sum() > 0
    assert model.decoder.net[0].weight.grad.abs().sum() > 0
    assert model.encoders[-1].net[0].weight.grad.abs().sum() > 0
    assert out.x_hat.shape == x.shape and torch.isfinite(out.nll).all()
    model.eval()
    codes = model.encode(x)
    image = model.decode(codes)
    assert image.shape == x.shape and torch.equal(image, model.decode(codes))
    assert not torch.equal(image, model.decode(codes, torch.Generator().manual_seed(3)))
    folder = model.save_pretrained(tmp_path / "model")
    loaded = type(model).from_pretrained(folder).eval()
    assert loaded.config == model.config
    assert torch.equal(loaded.decode(codes), image)
    assert torch.equal(loaded(x).nll, model(x).nll)


def test_vqvae_with_the_pixelcnn_likelihood_trains_encodes_decodes_and_saves(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=3, downsample=1, codebook_size=16, **TINY))
    _check_model(model, torch.rand(2, 3, 8, 8) * 2 - 1, tmp_path)


@pytest.mark.parametrize("mode", ["decoders", "loss"])
def test_vqvae2_with_the_pixelcnn_likelihood_and_prefix_training(tmp_path, mode):
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(in_channels=1, strides=[1, 1], codebook_sizes=[8, 16], prefix_training=mode,
                                **TINY))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    out = model(x)
    assert set(out.prefix_losses) == {1, 2} and all(torch.isfinite(v) for v in out.prefix_losses.values())
    _check_model(model, x, tmp_path)
    codes = model.encode(x)
    assert model.decode_levels(codes[:1], 1).shape == x.shape
    assert model.decode_without(codes, 0).shape == x.shape


def test_decode_codes_draws_every_batch_from_one_seeded_generator():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=1, downsample=1, codebook_size=16, **TINY)).eval()
    codes = [torch.zeros(4, 3, 3, dtype=torch.long)]  # four images of the same codes, in two batches
    images = decode_codes(model, codes, batch_size=2)
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 6, 6)
    assert torch.equal(images, decode_codes(model, codes, batch_size=2))
    assert not torch.equal(images[:2], images[2:])


def test_an_empty_batch_decodes_to_no_images_as_with_the_other_likelihoods():
    for likelihood in ("gaussian", "pixelcnn"):
        fields = {**TINY, "likelihood": likelihood}
        if likelihood != "pixelcnn":
            fields = {k: v for k, v in fields.items() if not k.startswith("pixelcnn")}
        model = VQVAE(VQVAEConfig(in_channels=3, downsample=1, codebook_size=16, **fields)).eval()
        assert model.decode(model.encode(torch.zeros(0, 3, 8, 8))).shape == (0, 3, 8, 8)


def test_config_dicts_of_the_other_likelihoods_are_unchanged():
    for config in (VQVAEConfig(), VQVAE2Config(), VQVAEConfig(likelihood="logistic_mixture")):
        assert not {"pixelcnn_layers", "pixelcnn_channels", "pixelcnn_kernel_size"} & set(config.to_dict())
    config = VQVAEConfig(likelihood="pixelcnn", pixelcnn_layers=3, pixelcnn_kernel_size=7)
    data = config.to_dict()
    assert (data["pixelcnn_layers"], data["pixelcnn_channels"], data["pixelcnn_kernel_size"]) == (3, 32, 7)
    assert VQVAEConfig.from_dict(data) == config
    assert build_model(config).likelihood.stack.kernel_size == 7


@pytest.mark.parametrize("fields,needle", [
    (dict(pixelcnn_layers=3), "apply to likelihood='pixelcnn' only"),
    (dict(likelihood="pixelcnn", pixelcnn_kernel_size=4), "pixelcnn_kernel_size must be an odd integer >= 3"),
    (dict(likelihood="pixelcnn", pixelcnn_channels=0), "pixelcnn_channels must be positive"),
])
def test_config_errors(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        VQVAEConfig(**fields)



def test_train_eval_and_codec_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    cli_ok(capsys, ["train", "--preset", "demo", "--likelihood", "pixelcnn", "--pixelcnn-layers", "2",
                 "--pixelcnn-channels", "8", "--steps", "2", "--batch-size", "8", "--no-tensorboard",
                 "-o", run, "--data", DATA])
    model_json = ckpt.read_config(run)["model"]
    assert model_json["likelihood"] == "pixelcnn" and model_json["pixelcnn_layers"] == 2
    record = json.loads(cli_ok(capsys, ["eval", run, "--limit", "12", "--recon-limit", "5", "--batch-size", "4",
                                     "--json"]))
    assert record["images"] == 12 and record["reconstructed"] == 5
    assert 0 < record["nll_bits_per_dim"] < record["bits_per_dim"] < 9 and 0 < record["mse"] < 1
    image = tmp_path / "in.png"
    save_png((torch.rand(1, 28, 28) * 255).to(torch.uint8), image)
    vq_file, back = tmp_path / "x.vq", tmp_path / "back.png"
    cli_ok(capsys, ["compress", run, image, "--uniform", "-o", vq_file])
    cli_ok(capsys, ["decompress", run, vq_file, "-o", back])
    expected = Codec.load(run, []).reconstruct(load_image(image, None, 1), "uniform")
    assert torch.equal(load_image(back, None, 1), expected)
    code = main(["train", "--preset", "demo", "--pixelcnn-layers", "2", "--steps", "1", "-o", str(tmp_path / "bad"),
                 "--data", DATA])
    assert code != 0 and "apply to likelihood='pixelcnn' only" in capsys.readouterr().err
