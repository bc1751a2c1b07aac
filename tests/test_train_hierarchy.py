"""VQ-VAE-2 runs end to end through the stage-1 tools: train, resume, eval, levels."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from conftest import DATA, TINY2
from PIL import Image

from vqkit.cli.main import main
from vqkit.data.datasets import from_model, load_dataset
from vqkit.nn.vqvae import VQVAE2
from vqkit.runs import checkpoint as ckpt
from vqkit.training.evaluate import evaluate
from vqkit.training.stage1 import TrainConfig, train


def _train(run, steps, resume=False):
    # On the CPU also where CUDA is present: resuming is bit-identical there (CUDA's atomic adds
    # are not deterministic), and the round trips below compare with references made here.
    return train(run, TINY2, TrainConfig(data=DATA, steps=steps, batch_size=8, lr=3e-3, device="cpu"),
                 resume=resume, progress=False, tensorboard=False)


def test_hierarchy_trains_resumes_and_reloads(tmp_path):
    _train(tmp_path / "straight", 8)
    _train(tmp_path / "resumed", 4)
    _train(tmp_path / "resumed", 8, resume=True)
    a, _ = ckpt.load_model(tmp_path / "straight")
    b, _ = ckpt.load_model(tmp_path / "resumed")
    assert isinstance(a, VQVAE2) and ckpt.run_kind(tmp_path / "straight") == "vqvae2"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_eval_reports_every_level(tmp_path):
    _train(tmp_path / "run", 6)
    model, _ = ckpt.load_model(tmp_path / "run")
    result = evaluate(model, load_dataset(DATA, "test"), limit=40)
    top, bottom = result.levels
    assert (top.name, top.shape, top.codebook_size) == ("top", [7, 7], 8)
    assert (bottom.name, bottom.shape, bottom.codebook_size) == ("bottom", [14, 14], 16)
    assert top.reduction == 784 / 49 and bottom.reduction == 784 / 196
    assert bottom.psnr_upto == result.psnr
    assert result.codes_used == top.codes_used + bottom.codes_used and result.codebook_size == 24
    # The KL term counts log K_l nats for every latent of every level.
    extra = (49 * math.log(8) + 196 * math.log(16)) / (784 * math.log(2))
    assert abs(result.bits_per_dim - result.nll_bits_per_dim - extra) < 1e-9


def test_cli_levels_and_eval(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, 3)
    out = tmp_path / "levels.png"
    assert main(["levels", str(run), "-n", "3", "--side", "56", "-o", str(out)]) == 0
    width, height = Image.open(out).size
    # top alone, top + bottom, original; three images of 56 pixels, 4 apart, titles and captions
    assert (width, height) == (4 + 3 * 60, 16 + 3 * (56 + 14 + 4) + 4)
    printed = capsys.readouterr().out
    assert "decoded from the top level alone, then adding bottom, then the original; mean PSNR" in printed
    assert main(["eval", str(run), "--limit", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [lv["name"] for lv in report["levels"]] == ["top", "bottom"]


def test_cli_encode_decode_round_trip_every_level(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, 3)
    codes = tmp_path / "codes"
    assert main(["encode", str(run), "--data", DATA, "--limit", "3", "--device", "cpu", "-o", str(codes)]) == 0
    assert sorted(p.name for p in codes.iterdir()) == ["bottom.npy", "top.npy"]
    model, _ = ckpt.load_model(run)
    images = load_dataset(DATA, "test").batch(torch.arange(3))[0]
    expected = model.encode(images.float() / 127.5 - 1)
    for name, level in zip(("top", "bottom"), expected):
        assert np.array_equal(np.load(codes / f"{name}.npy"), level.numpy())
    assert main(["encode", str(run), "--data", DATA, "--limit", "2", "-o", str(codes)]) == 0  # replaces its own output
    assert np.load(codes / "top.npy").shape[0] == 2
    grid = tmp_path / "decoded.png"
    assert main(["decode", str(run), str(codes), "--device", "cpu", "-o", str(grid)]) == 0
    want = from_model(model.decode([c[:2] for c in expected]))
    got = torch.from_numpy(np.array(Image.open(grid))).unsqueeze(0)
    assert torch.equal(got[:, 2:30, 2:30], want[0])
    capsys.readouterr()


def test_cli_decode_refuses_mismatched_level_maps(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, 3)
    codes = tmp_path / "codes"
    assert main(["encode", str(run), "--data", DATA, "--limit", "2", "-o", str(codes)]) == 0
    np.save(codes / "top.npy", np.zeros((2, 5, 5), dtype=np.uint16))  # not half the bottom's 14x14
    assert main(["decode", str(run), str(codes), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "top.npy" in err and "(7, 7)" in err
    assert main(["decode", str(run), str(tmp_path / "codes" / "bottom.npy"), "-o", str(tmp_path / "x.png")]) == 2
    assert "folder of top.npy, bottom.npy" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    assert main(["encode", str(run), "--data", DATA, "--limit", "2", "-o", str(tmp_path / "other")]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_decode_without_a_level_measures_what_it_adds(tmp_path):
    _train(tmp_path / "run", 6)
    model, _ = ckpt.load_model(tmp_path / "run")
    images = load_dataset(DATA, "test").batch(torch.arange(4))[0]
    codes = model.encode(images.float() / 127.5 - 1)
    full = model.decode(codes)
    for level in range(2):
        assert not torch.equal(model.decode_without(codes, level), full)
    # Zeroing a level is the same as replacing its quantized map by zeros before decoding.
    z_qs = [model.quantizers[i].lookup(c) for i, c in enumerate(codes)]
    z_qs[0] = torch.zeros_like(z_qs[0])
    expected = model.likelihood.mean(model._decode_z_q(z_qs)).clamp(-1, 1)
    assert torch.equal(model.decode_without(codes, 0), expected)
    result = evaluate(model, load_dataset(DATA, "test"), limit=16)
    assert all(lv.psnr_without is not None for lv in result.levels)
