import pytest
import torch
import torch.nn.functional as F

from vqkit.nn.presets import PRESET_IMAGE_SIZE, PRESETS, preset
from vqkit.nn.vqvae import VQVAE2, VQVAE2Config

TINY = {"hidden": 8, "res_hidden": 4, "num_res_blocks": 1, "code_dim": 4}


def tiny(strides, in_channels=3, **kw):
    kw = {"ema": False, "kmeans_init": False, "restart_after": 0, **kw}
    return VQVAE2(VQVAE2Config(in_channels=in_channels, strides=strides,
                               codebook_sizes=[16] * len(strides), **TINY, **kw))


@pytest.mark.parametrize("strides", [[1, 1], [1, 2], [1, 1, 1], [2, 1, 1]])
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (48, 64)])
def test_every_level_has_its_shape(strides, size):
    torch.manual_seed(0)
    model = tiny(strides)
    x = torch.rand(2, 3, *size) * 2 - 1
    shapes = model.config.latent_shapes(*size)
    # Top-first; strides[l] is level l's downsampling relative to the level below it.
    assert shapes == [(size[0] // 2 ** sum(strides[level:]), size[1] // 2 ** sum(strides[level:]))
                      for level in range(len(strides))]
    out = model(x)
    assert [tuple(c.shape) for c in out.codes] == [(2, *s) for s in shapes]
    assert out.x_hat.shape == x.shape and out.nll.shape == (2,)
    assert len(out.perplexity) == len(out.usage) == len(strides)
    z_e = model.encode_levels(x)
    assert [tuple(z.shape) for z in z_e] == [(2, 4, *s) for s in shapes]
    model.eval()
    codes = model.encode(x)
    assert [tuple(c.shape) for c in codes] == [(2, *s) for s in shapes]
    assert model.decode(codes).shape == x.shape


def test_latent_shapes_are_top_first():
    assert VQVAE2Config(strides=[1, 2], codebook_sizes=[8, 8]).latent_shapes(48, 64) == [(6, 8), (12, 16)]
    assert VQVAE2Config(strides=[2, 1, 1], codebook_sizes=[8, 8, 8]).latent_shapes(64, 64) == \
        [(4, 4), (16, 16), (32, 32)]


def test_size_the_strides_cannot_divide_is_a_clear_error():
    model = tiny([1, 2])
    with pytest.raises(ValueError, match=r"48x36 is not divisible by the model's total stride 8 "
                                         r"\(strides \[1, 2\], top-first\)"):
        model(torch.zeros(1, 3, 48, 36))
    with pytest.raises(ValueError, match="total stride 8"):
        model.config.latent_shapes(20, 32)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 32, 32))


def test_eval_forward_matches_encode_then_decode():
    torch.manual_seed(0)
    model = tiny([1, 1, 1]).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    codes = model.encode(x)
    for a, b in zip(out.codes, codes):
        assert torch.equal(a, b)
    torch.testing.assert_close(model.decode(codes), out.x_hat.clamp(-1, 1))


@pytest.mark.parametrize("strides", [[1, 1], [1, 1, 1]])
def test_lower_levels_z_e_depends_on_the_codes_above(strides):
    torch.manual_seed(0)
    model = tiny(strides).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z_e = model.encode_levels(x)
    codes = model.encode(x)
    # Forcing the codes the model would pick changes nothing.
    for a, b in zip(model.encode_levels(x, codes[:-1]), z_e):
        torch.testing.assert_close(a, b)
    # Other top codes: the top's own z_e is untouched, every level below moves.
    other_top = (codes[0] + 1) % 16
    moved = model.encode_levels(x, [other_top])
    torch.testing.assert_close(moved[0], z_e[0])
    for level in range(1, len(strides)):
        assert (moved[level] - z_e[level]).abs().max() > 1e-4
    # Other top codebook entries (same codes): the bottom's z_e moves too.
    with torch.no_grad():
        model.quantizers[0].codebook.add_(torch.randn_like(model.quantizers[0].codebook))
    moved = model.encode_levels(x, [codes[0]])
    torch.testing.assert_close(moved[0], z_e[0])
    assert (moved[-1] - z_e[-1]).abs().max() > 1e-4
    if len(strides) == 3:
        # The bottom is conditioned on the middle too, not only on the top.
        fixed_top = model.encode(x)[0]
        base = model.encode_levels(x, [fixed_top])
        other_middle = model.encode_levels(x, [fixed_top, (model.encode(x)[1] + 1) % 16])
        torch.testing.assert_close(other_middle[1], base[1])
        assert (other_middle[2] - base[2]).abs().max() > 1e-4


@pytest.mark.parametrize("strides", [[1, 2], [1, 1, 1]])
def test_straight_through_gradient_reaches_every_encoder_level(strides):
    torch.manual_seed(0)
    model = tiny(strides)
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    # The reconstruction loss alone: no commitment term helps the encoders here.
    out.recon_loss.backward(retain_graph=True)
    for level, encoder in enumerate(model.encoders):
        assert encoder.net[0].weight.grad.abs().sum() > 0, f"no gradient at level {level}"
    for quantizer in model.quantizers:
        assert quantizer.codebook.grad is None or torch.count_nonzero(quantizer.codebook.grad) == 0
    out.vq_loss.backward()
    for quantizer in model.quantizers:
        assert quantizer.codebook.grad.abs().sum() > 0


def test_logistic_mixture_likelihood():
    torch.manual_seed(0)
    model = tiny([1, 1], likelihood="logistic_mixture", mixtures=3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    out.loss.backward()
    assert out.x_hat.shape == x.shape and torch.isfinite(out.nll).all()
    assert all(encoder.net[0].weight.grad.abs().sum() > 0 for encoder in model.encoders)


def test_decode_levels_adds_levels_in_order():
    torch.manual_seed(0)
    model = tiny([1, 1, 1]).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(x)
    views = [model.decode_levels(codes, upto) for upto in (1, 2, 3)]
    assert all(v.shape == x.shape for v in views)
    torch.testing.assert_close(views[2], model.decode(codes))
    assert (views[0] - views[1]).abs().max() > 1e-4 and (views[1] - views[2]).abs().max() > 1e-4
    # Lower levels beyond `upto` may be left out; they do not change the view.
    torch.testing.assert_close(model.decode_levels(codes[:1], 1), views[0])
    torch.testing.assert_close(model.decode_levels([codes[0], None, None], 1), views[0])
    with pytest.raises(ValueError, match="adding levels can only be decoded in order"):
        model.decode_levels([codes[0], None, codes[2]], 3)
    with pytest.raises(ValueError, match="level 0 is missing: adding levels can only be decoded in order"):
        model.decode_levels([None, codes[1]], 2)
    with pytest.raises(ValueError, match="level 1 is missing"):
        model.decode_levels(codes[:1], 2)
    with pytest.raises(ValueError, match="adding levels can only be decoded in order"):
        model.decode_levels(codes[::-1], 3)  # bottom-first
    with pytest.raises(ValueError, match=r"upto must be in 1\.\.3"):
        model.decode_levels(codes, 0)
    with pytest.raises(ValueError, match="expected 3 code maps"):
        model.decode(codes[:2])


def test_tiny_two_level_model_overfits_a_batch():
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(in_channels=3, hidden=16, res_hidden=8, num_res_blocks=1,
                                strides=[1, 1], code_dim=8, codebook_sizes=[32, 32],
                                restart_after=20))
    # Smooth images, as photographs are: random 4x4 colours upsampled to 16x16.
    x = F.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=16, mode="bilinear", align_corners=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.recon_loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_config_round_trip_and_validation():
    config = preset("faces-3level")
    assert VQVAE2Config.from_dict(config.to_dict()) == config
    assert VQVAE2Config(strides=(1, 2), codebook_sizes=(8, 8)) == \
        VQVAE2Config.from_dict(VQVAE2Config(strides=(1, 2), codebook_sizes=(8, 8)).to_dict())
    config.strides.append(5)
    assert PRESETS["faces-3level"].strides == [1, 1, 2]  # presets are copied, not shared
    with pytest.raises(ValueError, match="unknown VQ-VAE-2 config keys: bogus"):
        VQVAE2Config.from_dict({**preset("cifar10-2level").to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="at least two levels"):
        VQVAE2Config(strides=[2], codebook_sizes=[8])
    with pytest.raises(ValueError, match="codebook_sizes has 2 entries but strides has 3"):
        VQVAE2Config(strides=[1, 1, 1], codebook_sizes=[8, 8])
    with pytest.raises(ValueError, match="each level is coarser"):
        VQVAE2Config(strides=[0, 2], codebook_sizes=[8, 8])
    with pytest.raises(ValueError, match="codebook_sizes must be positive"):
        VQVAE2Config(codebook_sizes=[8, 0])
    with pytest.raises(ValueError, match="likelihood"):
        VQVAE2Config(likelihood="laplace")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("imagenet")


@pytest.mark.parametrize("name,shapes", [
    ("vqvae2-256", [(32, 32), (64, 64)]),
    ("vqvae2-3level", [(32, 32), (64, 64), (128, 128)]),
    ("cifar10-2level", [(8, 8), (16, 16)]),
    ("mnist-2level", [(7, 7), (14, 14)]),
    ("faces-3level", [(8, 8), (16, 16), (32, 32)]),
])
def test_preset_code_map_shapes(name, shapes):
    size = PRESET_IMAGE_SIZE[name]
    assert preset(name).latent_shapes(size, size) == shapes


def test_vqvae2_256_preset_is_the_papers_two_level_model():
    c = PRESETS["vqvae2-256"]
    assert (c.hidden, c.res_hidden, c.num_res_blocks, c.code_dim, c.codebook_sizes) == \
        (128, 32, 2, 64, [512, 512])
    assert c.ema and c.beta == 0.25


@pytest.mark.parametrize("name", ["cifar10-2level", "mnist-2level", "faces-3level", "vqvae2-256"])
def test_presets_run_at_their_native_size(name):
    torch.manual_seed(0)
    size = PRESET_IMAGE_SIZE[name]
    model = VQVAE2(preset(name))
    x = torch.rand(1, model.config.in_channels, size, size) * 2 - 1
    out = model(x)
    assert out.x_hat.shape == x.shape
    assert [tuple(c.shape[1:]) for c in out.codes] == model.config.latent_shapes(size, size)
