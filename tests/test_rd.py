"""Rate-distortion measurement: PSNR and MS-SSIM against their definitions, Pillow round trips,
interpolation at matched rates, and the whole measurement with a codec, from the CLI."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.cli.main import main
from vqkit.codec.codec import Codec
from vqkit.codec.rd import Point, RDResult, measure, ms_ssim, pillow_roundtrip, psnr
from vqkit.data.datasets import sample_dir, to_model
from vqkit.nn.vqvae import VQVAE, VQVAEConfig
from vqkit.training.stage1 import TrainConfig, train


def _photo(h, w, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, channels, h // 8, w // 8, generator=g)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return (big[0].clamp(0, 1) * 255).round().to(torch.uint8)


def test_psnr_is_the_formula():
    x = torch.zeros(3, 4, 4, dtype=torch.uint8)
    y = x.clone()
    assert psnr(x, y) == math.inf
    y[0, 0, 0] = 10  # MSE = 100 / 48
    assert psnr(x, y) == pytest.approx(10 * math.log10(255 ** 2 * 48 / 100))


def test_ms_ssim_properties():
    x = _photo(176, 192)
    noisy = (x.float() + torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 8)
    noisy = noisy.clamp(0, 255).round().to(torch.uint8)
    noisier = (x.float() + torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 30)
    noisier = noisier.clamp(0, 255).round().to(torch.uint8)
    assert ms_ssim(x, x) == pytest.approx(1.0)
    assert ms_ssim(x, noisy) == pytest.approx(ms_ssim(noisy, x), abs=1e-6)
    assert 0 < ms_ssim(x, noisier) < ms_ssim(x, noisy) < 1
    assert math.isnan(ms_ssim(x[:, :100], x[:, :100]))


def test_pillow_roundtrip_sizes_and_quality():
    x = _photo(64, 80)
    for fmt in ("JPEG", "WEBP"):
        small, low = pillow_roundtrip(x, fmt, 10)
        big, high = pillow_roundtrip(x, fmt, 90)
        assert low.shape == high.shape == x.shape and low.dtype == torch.uint8
        assert small < big and psnr(x, low) < psnr(x, high)
    grey = x[:1]
    size, back = pillow_roundtrip(grey, "JPEG", 75)
    assert back.shape == grey.shape and size > 0


def test_jpeg_gets_optimised_huffman_tables():
    # A fair baseline: the same pixels as libjpeg's default tables, in a smaller file.
    x = _photo(64, 80)
    size, back = pillow_roundtrip(x, "JPEG", 2)
    buffer = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=2)
    with Image.open(io.BytesIO(buffer.getvalue())) as plain:
        assert torch.equal(back, torch.from_numpy(np.array(plain)).permute(2, 0, 1))
    assert size < buffer.tell()


def test_matched_interpolates_at_the_codecs_rate():
    points = [Point("jpeg", "10", 0.2, 25.0, 0.8), Point("jpeg", "50", 0.6, 33.0, 0.96),
              Point("webp", "10", 0.1, 27.0, 0.85), Point("webp", "50", 0.3, 31.0, 0.95),
              Point("m prior", "prior", 0.4, 30.0, 0.9), Point("m uniform", "uniform", 0.05, 20.0, 0.7)]
    result = RDResult(["a.png"], 100, points)
    matched = {m.point.method: m for m in result.matched()}
    assert matched["m prior"].jpeg_psnr == pytest.approx(29.0)
    assert matched["m prior"].jpeg_ms_ssim == pytest.approx(0.88)
    assert matched["m prior"].webp_psnr is None  # beyond WebP's measured rates
    assert matched["m uniform"].jpeg_psnr is None
    assert "m prior" in result.table() and json.dumps(result.to_dict())


def test_beside_pairs_each_jpeg_setting_with_the_best_vq_point_of_no_more_bits():
    points = [Point("jpeg", "1", 0.08, 21.0, 0.75), Point("jpeg", "5", 0.13, 24.0, 0.84),
              Point("jpeg", "20", 0.4, 30.0, 0.95), Point("webp", "1", 0.16, 28.0, 0.92),
              Point("a prior", "prior", 0.07, 24.5, 0.90), Point("a uniform", "uniform", 0.14, 24.5, 0.90),
              Point("b prior", "prior", 0.10, 25.5, 0.91), Point("c prior", "prior", 0.35, 25.0, 0.94)]
    beside = {(b.point.method, b.point.setting): b.vq for b in RDResult(["a.png"], 100, points).beside()}
    # Below JPEG's lowest rate interpolation has nothing to say; this still does.
    assert beside[("jpeg", "1")].method == "a prior"
    assert beside[("jpeg", "5")].method == "b prior"
    assert beside[("jpeg", "20")].method == "b prior"  # c costs less but reconstructs worse
    assert beside[("webp", "1")].method == "b prior"
    assert RDResult(["a.png"], 100, points[:4] + points[-1:]).beside()[0].vq is None
    table = RDResult(["a.png"], 100, points).table()
    assert "+3.50" in table and "+1.50" in table and "-4.50" in table  # JPEG 20: the first loss after a win
    assert "-2.50" not in table and "webp   beats every .vq point" in table


@pytest.fixture(scope="module")
def one_level(tmp_path_factory):
    root = tmp_path_factory.mktemp("rd")
    config = VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2, code_dim=4,
                         codebook_size=16, restart_after=2)
    train(root / "run", config, TrainConfig(data=f"fashion-mnist:{sample_dir()}", steps=4, batch_size=8),
          progress=False, tensorboard=False)
    return root


def test_measure_and_cli(one_level, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, (h, w) in enumerate([(40, 52), (36, 36)]):
        Image.fromarray(_photo(h, w, seed, 1)[0].numpy()).save(folder / f"{seed}.png")
    (folder / "notes.txt").write_text("not an image")
    codec = Codec.load(one_level / "run")
    result = measure({"run": codec}, sorted(folder.glob("*.png")), qualities=[10, 50], progress=False)
    methods = {(p.method, p.setting) for p in result.points}
    assert methods == {("jpeg", "10"), ("jpeg", "50"), ("webp", "10"), ("webp", "50"), ("run uniform", "uniform")}
    vq = next(p for p in result.points if p.method == "run uniform")
    image = torch.from_numpy(np.array(Image.open(folder / "0.png")))[None]
    size = len(codec.compress(image, "uniform").data)
    other = len(codec.compress(torch.from_numpy(np.array(Image.open(folder / "1.png")))[None], "uniform").data)
    assert vq.bpp == pytest.approx((8 * size / (40 * 52) + 8 * other / (36 * 36)) / 2)
    assert vq.saving == 1.0 and vq.encode_s_per_mp > 0 and vq.decode_s_per_mp > 0
    assert result.pixels == 40 * 52 + 36 * 36

    assert main(["rd", str(one_level / "run"), "--data", str(folder), "--qualities", "10,50",
                 "-o", str(tmp_path / "rd.png"), "--json", str(tmp_path / "rd.json")]) == 0
    out = capsys.readouterr().out
    assert "run uniform" in out and "at the same bits per pixel" in out
    assert Image.open(tmp_path / "rd.png").size[0] > 500
    assert len(json.loads((tmp_path / "rd.json").read_text())["points"]) == 5
    assert main(["rd", str(one_level / "run"), "--data", str(tmp_path / "none"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["rd", str(one_level / "run"), "--data", str(folder), "--qualities", "10,0", "-o", "x.png"])
    assert exit.value.code == 2 and "qualities run from 1 to 100" in capsys.readouterr().err


def test_measured_psnr_is_of_the_clamped_reconstruction(tmp_path):
    """A decoder whose mean overshoots [-1, 1] (a fresh model, last layer scaled up): the PSNR
    ``measure`` reports is that of the reconstruction clamped to the pixel range, computed here
    from the forward pass's raw mean, not of pixels wrapped around by the uint8 conversion."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2,
                              code_dim=4, codebook_size=16))
    image = _photo(48, 64, seed=2, channels=1)
    model.train()
    model(to_model(image[None]))  # k-means initialisation: more than one code
    model.eval()
    last = [m for m in model.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.weight.mul_(30)
        if last.bias is not None:
            last.bias.mul_(30)
        x_hat = model(to_model(image[None])).x_hat[0]
    assert float((x_hat.abs() > 1).float().mean()) > 0.3  # the test needs outputs out of range
    rec = ((x_hat.clamp(-1, 1) + 1) * 127.5).round().double()
    expected = 10 * math.log10(255 ** 2 / float(((rec - image.double()) ** 2).mean()))
    codec = Codec(model, "overshoot")
    assert psnr(image, codec.decompress(codec.compress(image, "uniform").data)) == pytest.approx(expected, rel=1e-4)
    Image.fromarray(image[0].numpy()).save(tmp_path / "a.png")
    result = measure({"m": codec}, [tmp_path / "a.png"], qualities=[50], progress=False)
    vq = next(p for p in result.points if p.method == "m uniform")
    assert vq.psnr == pytest.approx(expected, rel=1e-4), f"measured PSNR {vq.psnr:.3f} dB, clamped {expected:.3f} dB"
