"""Prefix training (VQVAE2Config.prefix_training): every prefix of the levels decodes to an
image. Exact per-prefix losses through the shared decoder with learned absent inputs, the
running variance left to the full model, decode_levels using the absent inputs, and configs
and weights of runs made before the field existed loading unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import DATA

from vqkit.nn.presets import preset
from vqkit.nn.vqvae import VQVAE2, VQVAE2Config
from vqkit.runs import checkpoint as ckpt
from vqkit.training import stage1
from vqkit.training.evaluate import evaluate
from vqkit.training.stage1 import TrainConfig, train


def _model(mode: str, levels: int = 3, **fields) -> VQVAE2:
    torch.manual_seed(0)
    fixed = dict(ema=False, kmeans_init=False, restart_after=0)  # a forward pass leaves the codebooks as they are
    return VQVAE2(VQVAE2Config(in_channels=3, hidden=8, res_hidden=4, num_res_blocks=1, code_dim=4,
                               strides=[1] * levels, codebook_sizes=[8] * levels, prefix_training=mode,
                               **{**fixed, **fields}))


def _upsampled(model: VQVAE2, codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """The top two levels' z_q from their codes, each upsampled to the bottom map's size."""
    return [model.upsamplers[level](model.quantizers[level].lookup(codes[level])) for level in range(2)]


def _images(n: int = 4, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=side, mode="bilinear",
                         align_corners=False)


def test_config_field_is_left_out_of_the_dict_at_its_old_default():
    old = dataclasses.replace(preset("cifar10-2level"), prefix_training="off").to_dict()
    assert "prefix_training" not in old  # config.json and codec fingerprints of earlier runs are unchanged
    assert VQVAE2Config.from_dict(old).prefix_training == "off"
    on = preset("cifar10-2level")  # the hierarchical presets train every prefix
    assert on.to_dict()["prefix_training"] == "decoders" and VQVAE2Config.from_dict(on.to_dict()) == on
    with pytest.raises(ValueError, match="prefix_training must be one of 'off', 'decoders', 'loss'"):
        VQVAE2Config(prefix_training="sometimes")


def test_a_model_without_prefix_training_keeps_its_weights_and_zero_views():
    model = _model("off").eval()
    assert not any(k.startswith("absent") for k in model.state_dict())
    x = _images()
    codes = model.encode(x)
    with torch.no_grad():  # the view of earlier vqkit: zeros for the missing maps, through the upsamplers
        z_top = model.quantizers[0].lookup(codes[0])
        maps = [model.upsamplers[0](z_top), model.upsamplers[1](torch.zeros(4, 4, 4, 4)), torch.zeros(4, 4, 8, 8)]
        expected = model.likelihood.mean(model.decoder(torch.cat(maps, 1))).clamp(-1, 1)
    torch.testing.assert_close(model.decode_levels(codes, 1), expected)


def test_per_prefix_loss_is_each_prefixs_mse_with_learned_absent_inputs():
    model = _model("loss")
    assert [tuple(a.shape) for a in model.absent] == [(1, 4, 1, 1)] * 2
    with torch.no_grad():
        for i, a in enumerate(model.absent):
            a.fill_(0.3 * (i + 1))
    x = _images()
    out = model(x)
    assert sorted(out.prefix_losses) == [1, 2, 3]
    with torch.no_grad():
        z = [q.lookup(c) for q, c in zip(model.quantizers, out.codes)]
        for upto in (1, 2):  # the missing maps: each level's absent vector at the bottom's resolution
            maps = [model.upsamplers[level](z[level]) for level in range(upto)]
            maps += [model.absent[level - 1].expand(4, 4, 8, 8) for level in range(upto, 3)]
            params = model.decoder(torch.cat(maps, 1))
            torch.testing.assert_close(out.prefix_losses[upto], (params - x).square().mean())
        full = model.decoder(torch.cat([model.upsamplers[0](z[0]), model.upsamplers[1](z[1]), z[2]], 1))
    torch.testing.assert_close(out.prefix_losses[3], (full - x).square().mean())
    torch.testing.assert_close(out.recon_loss, sum(out.prefix_losses.values()))
    torch.testing.assert_close(out.x_hat, full)
    # The likelihood's variance follows the full model's reconstruction, not the prefixes'.
    torch.testing.assert_close(model.likelihood.variance, (full - x).square().mean(dim=(0, 2, 3)))
    out.loss.backward()
    assert all(a.grad.abs().sum() > 0 for a in model.absent)
    # decode_levels decodes a prefix as it was trained: with the absent inputs.
    model.eval()
    codes = model.encode(x)
    with torch.no_grad():
        z_top = model.quantizers[0].lookup(codes[0])
        maps = [model.upsamplers[0](z_top), *(a.expand(4, 4, 8, 8) for a in model.absent)]
        expected = model.decoder(torch.cat(maps, 1)).clamp(-1, 1)
    torch.testing.assert_close(model.decode_levels(codes, 1), expected)


def test_prefix_decoders_loss_is_each_prefixs_mse_through_its_own_decoder():
    """"decoders": prefix p's loss is the MSE of its light decoder on the top p levels'
    upsampled maps; the shared decoder sees whole hierarchies only; decode_levels decodes a
    proper prefix with its decoder, every level with the shared one."""
    model = _model("decoders", prefix_share=0.5)  # the prefixes of the first 2 of 4 images
    assert len(model.absent) == 0 and len(model.prefix_decoders) == 2
    assert model.prefix_decoders[0].net[0].in_channels == 4 and model.prefix_decoders[1].net[0].in_channels == 8
    x = _images()
    out = model(x)
    with torch.no_grad():
        z = [q.lookup(c) for q, c in zip(model.quantizers, out.codes)]
        up = _upsampled(model, out.codes)
        for upto in (1, 2):
            params = model.prefix_decoders[upto - 1](torch.cat(up[:upto], 1)[:2])
            torch.testing.assert_close(out.prefix_losses[upto], (params - x[:2]).square().mean())
        full = model.decoder(torch.cat([*up, z[2]], 1))
    torch.testing.assert_close(out.prefix_losses[3], (full - x).square().mean())
    torch.testing.assert_close(out.recon_loss, sum(out.prefix_losses.values()))
    out.loss.backward()
    assert all(p.grad.abs().sum() > 0 for d in model.prefix_decoders for p in d.parameters())
    model.eval()
    codes = model.encode(x)
    with torch.no_grad():
        up = _upsampled(model, codes)
        for upto in (1, 2):
            expected = model.prefix_decoders[upto - 1](torch.cat(up[:upto], 1)).clamp(-1, 1)
            torch.testing.assert_close(model.decode_levels(codes, upto), expected)
    torch.testing.assert_close(model.decode_levels(codes, 3), model.decode(codes))


@pytest.mark.parametrize("mode", ["decoders", "loss"])
def test_prefix_weight_scales_the_proper_prefixes_losses_only(mode):
    """recon_loss = the full model's loss + w * the proper prefixes' (the losses themselves
    unchanged); with their own decoders, the prefix decoders' gradients scale by w exactly."""
    x = _images()
    whole, weighted = _model(mode), _model(mode)
    out, low = whole(x), weighted(x, prefix_weight=0.25)
    for upto in (1, 2, 3):
        torch.testing.assert_close(low.prefix_losses[upto], out.prefix_losses[upto])
    proper = out.prefix_losses[1] + out.prefix_losses[2]
    torch.testing.assert_close(low.recon_loss, out.prefix_losses[3] + 0.25 * proper)
    torch.testing.assert_close(low.loss - low.recon_loss, out.loss - out.recon_loss)  # the VQ losses as they were
    out.loss.backward()
    low.loss.backward()
    if mode == "decoders":
        for a, b in zip(whole.prefix_decoders.parameters(), weighted.prefix_decoders.parameters()):
            torch.testing.assert_close(b.grad, 0.25 * a.grad)
    # The shared decoder: only the full model's loss reaches it with "decoders", every prefix's with "loss".
    same = [torch.equal(a.grad, b.grad) for a, b in zip(whole.decoder.parameters(), weighted.decoder.parameters())
            if a.grad.any()]  # (a residual block's zero-initialised output holds the layers before it still)
    assert all(same) if mode == "decoders" else not any(same), same


def test_the_prefix_cooldown_is_flat_then_linear_down_to_the_floor():
    prefix_weight = stage1.prefix_weight
    assert stage1.PREFIX_FLOOR == 0.1
    assert [prefix_weight(p, 0.3) for p in (-1.0, 0.0, 0.5, 0.7)] == [1.0, 1.0, 1.0, 1.0]
    assert prefix_weight(0.85, 0.3) == pytest.approx(0.55)
    assert prefix_weight(1.0, 0.3) == pytest.approx(0.1) == prefix_weight(2.0, 0.3)
    assert prefix_weight(0.5, 1.0) == pytest.approx(0.55)  # the whole run ramps
    assert prefix_weight(1.0, 0.0) == 1.0  # no cooldown


def test_a_run_with_a_prefix_cooldown_weights_each_step_by_its_progress(tmp_path, tiny2, monkeypatch):
    """4 steps with a cooldown over the last half: steps 0 to 2 at weight 1, step 3 (progress
    3/4) at 0.55; each step's recon_loss is the bottom's plus the weight times the top's."""
    seen = []
    real_loop = stage1.run_loop

    def recording_loop(*args, step_fn, **kwargs):
        def recorded(step, progress):
            out = step_fn(step, progress)
            seen.append({k: float(v.detach()) for k, v in out.stats.items()})
            return out
        return real_loop(*args, step_fn=recorded, **kwargs)

    monkeypatch.setattr(stage1, "run_loop", recording_loop)
    config = dataclasses.replace(tiny2, prefix_training="decoders")
    train(tmp_path / "run", config, TrainConfig(data=DATA, steps=4, batch_size=8, prefix_cooldown=0.5),
          progress=False, tensorboard=False)
    assert [s["prefix_weight"] for s in seen] == pytest.approx([1.0, 1.0, 1.0, 0.55])
    for s in seen:
        expected = s["recon_loss_upto_bottom"] + s["prefix_weight"] * s["recon_loss_upto_top"]
        assert s["recon_loss"] == pytest.approx(expected)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["prefix_cooldown"] == 0.5


def test_a_prefix_cooldown_needs_a_model_that_trains_its_prefixes(tmp_path, tiny2):
    with pytest.raises(ValueError, match="prefix_cooldown must be a share of the run from 0 to 1"):
        TrainConfig(data=DATA, prefix_cooldown=1.5)
    off = dataclasses.replace(tiny2, prefix_training="off")
    with pytest.raises(ValueError, match="prefix_cooldown=0.3 needs a hierarchy that trains its prefixes"):
        train(tmp_path / "run", off, TrainConfig(data=DATA, steps=1, prefix_cooldown=0.3), progress=False,
              tensorboard=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_prefix_scale_decodes_the_prefixes_smaller_and_upsamples_them_bilinearly():
    model = _model("decoders", prefix_scale=2)  # the bottom map is 8x8 of 16x16 images: decoders stop at 8x8
    assert all(len([m for m in dec.net if isinstance(m, torch.nn.ConvTranspose2d)]) == 0
               for dec in model.prefix_decoders)
    x = _images()
    out = model(x)
    with torch.no_grad():
        up = _upsampled(model, out.codes)
        for upto in (1, 2):
            small = model.prefix_decoders[upto - 1](torch.cat(up[:upto], 1))
            assert small.shape == (4, 3, 8, 8)
            params = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
            torch.testing.assert_close(out.prefix_losses[upto], (params - x).square().mean())
    model.eval()
    codes = model.encode(x)
    with torch.no_grad():
        up = _upsampled(model, codes)
        small = model.prefix_decoders[0](up[0])
        expected = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(model.decode_levels(codes, 1), expected)


def test_prefix_scale_is_saved_unless_one_and_checked():
    config = preset("faces-3level")
    assert config.to_dict()["prefix_scale"] == 2 and VQVAE2Config.from_dict(config.to_dict()) == config
    old = dataclasses.replace(config, prefix_scale=1).to_dict()
    assert "prefix_scale" not in old  # earlier runs' fingerprints are unchanged
    assert VQVAE2Config.from_dict(old).prefix_scale == 1
    for bad in (0, 3, 8, 2.0, True):  # the faces' bottom map is 4x smaller than the image
        with pytest.raises(ValueError, match="prefix_scale must be a power of two from 1 to 4"):
            dataclasses.replace(config, prefix_scale=bad)


@pytest.mark.parametrize("mode", ["decoders", "loss"])
def test_the_top_prefix_does_not_see_the_lower_codes(mode):
    model = _model(mode, levels=2)
    x = _images()
    before = model(x).prefix_losses
    with torch.no_grad():
        model.quantizers[1].codebook.mul_(-3)
    after = model(x).prefix_losses
    torch.testing.assert_close(after[1], before[1])
    assert not torch.allclose(after[2], before[2])


def _train_batch(mode: str, steps: int = 120) -> tuple[float, float]:
    """MSE of the top alone and of every level after fitting one batch of smooth images."""
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(in_channels=3, hidden=16, res_hidden=8, num_res_blocks=1, strides=[1, 1],
                                code_dim=8, codebook_sizes=[32, 32], restart_after=20, prefix_training=mode))
    x = _images(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    codes = model.encode(x)
    return tuple(float((model.decode_levels(codes, upto) - x).square().mean()) for upto in (1, 2))


@pytest.mark.parametrize("mode", ["decoders", "loss"])
def test_with_prefix_training_the_top_alone_reconstructs_the_image(mode):
    off_top, off_all = _train_batch("off")
    top, full = _train_batch(mode)
    assert top < off_top / 2.5, (top, off_top)  # 4 dB or more (loss: 5.7 dB, its light decoder: 4.3 dB)
    assert full < top and full < 2 * off_all, (full, top, off_all)


@pytest.mark.parametrize("mode", ["decoders", "loss"])
def test_a_run_trained_with_prefixes_saves_the_field_and_reloads(tmp_path, tiny2, mode):
    config = dataclasses.replace(tiny2, prefix_training=mode)
    train(tmp_path / "run", config, TrainConfig(data=DATA, steps=3, batch_size=8), progress=False,
          tensorboard=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["prefix_training"] == mode
    assert saved["train"]["prefix_cooldown"] == stage1.PREFIX_COOLDOWN == 0.3  # unset: the default, recorded
    model, _ = ckpt.load_model(tmp_path / "run")  # strict: the prefix decoders' or absent inputs' weights
    assert model.prefix_training == mode
    assert (len(model.absent), len(model.prefix_decoders)) == ((1, 0) if mode == "loss" else (0, 1))
    from vqkit.data.datasets import load_dataset
    assert evaluate(model, load_dataset(DATA, "test"), limit=16).levels[0].psnr_upto > 0
    train(tmp_path / "old", tiny2, TrainConfig(data=DATA, steps=1, batch_size=8), progress=False, tensorboard=False)
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "prefix_training" not in saved["model"] and saved["train"]["prefix_cooldown"] == 0.0


def test_cli_train_takes_prefix_training_for_a_hierarchy_only(tmp_path, tiny2, tiny, capsys):
    from vqkit.cli.main import main
    (tmp_path / "two.json").write_text(json.dumps(dataclasses.replace(tiny2, prefix_training="loss").to_dict()))
    (tmp_path / "one.json").write_text(json.dumps(tiny.to_dict()))
    common = ["--data", DATA, "--steps", "2", "--batch-size", "8", "--no-tensorboard"]
    assert main(["train", "--config", str(tmp_path / "two.json"), "--prefix-training", "off", *common,
                 "-o", str(tmp_path / "run")]) == 0
    assert ckpt.model_config_of(tmp_path / "run").prefix_training == "off"
    assert main(["train", "--config", str(tmp_path / "one.json"), "--prefix-training", "loss", *common,
                 "-o", str(tmp_path / "one")]) == 2
    assert "--prefix-training and --prefix-share apply to a hierarchy" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "two.json"), "--prefix-share", "0.25", *common,
                 "-o", str(tmp_path / "share")]) == 0
    assert ckpt.model_config_of(tmp_path / "share").prefix_share == 0.25


def test_prefix_share_trains_the_prefixes_of_the_first_images_only():
    """With share s the proper prefixes' losses are those of the first ceil(s * B) images;
    the full model's loss still covers the whole batch."""
    x = _images(4)
    whole = _model("loss")(x)
    model = _model("loss", prefix_share=0.4)  # ceil(0.4 * 4) = 2 images
    out = model(x)
    torch.testing.assert_close(out.prefix_losses[3], whole.prefix_losses[3])
    with torch.no_grad():
        z = [q.lookup(c[:2]) for q, c in zip(model.quantizers, out.codes)]
        for upto in (1, 2):
            maps = [model.upsamplers[level](z[level]) for level in range(upto)]
            maps += [model.absent[level - 1].expand(2, 4, 8, 8) for level in range(upto, 3)]
            expected = (model.decoder(torch.cat(maps, 1)) - x[:2]).square().mean()
            torch.testing.assert_close(out.prefix_losses[upto], expected)
    out.loss.backward()
    assert all(a.grad.abs().sum() > 0 for a in model.absent)


def test_prefix_share_is_saved_unless_whole_and_checked():
    config = dataclasses.replace(preset("cifar10-2level"), prefix_share=1.0)
    assert "prefix_share" not in config.to_dict()  # earlier runs' fingerprints are unchanged
    half = dataclasses.replace(config, prefix_share=0.5)
    assert half.to_dict()["prefix_share"] == 0.5 and VQVAE2Config.from_dict(half.to_dict()) == half
    for bad in (0, 1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match="prefix_share must be a number in"):
            VQVAE2Config(prefix_share=bad)


def test_levels_view_is_figure_3_from_decode_levels():
    from vqkit.data.datasets import from_model, to_model
    from vqkit.inspect.levels import levels_image, levels_view
    model = _model("loss").eval()
    images = ((_images(5) + 1) * 127.5).round().to(torch.uint8)
    view = levels_view(model, images, batch_size=2)
    codes = model.encode(to_model(images))
    for upto in (1, 2, 3):
        expected = from_model(model.decode_levels(codes, upto))
        assert torch.equal(view.views[upto - 1], expected)
        mse = (expected.double() - images.double()).square().flatten(1).mean(1)
        torch.testing.assert_close(view.psnr[upto - 1], 10 * torch.log10(255 ** 2 / mse))
    assert view.column_titles() == ["top alone", "+ middle", "+ bottom", "original"]
    assert levels_image(view, side=32).size == (4 + 4 * 36, 16 + 5 * (32 + 14 + 4) + 4)
