"""vqkit.inspect.atlas against counts, distances and crops computed independently on fixed data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import DATA
from PIL import Image

from vqkit.cli.main import main
from vqkit.data.datasets import from_model, load_dataset, to_model
from vqkit.inspect.atlas import load_complete, write_inspection
from vqkit.inspect.figures import atlas_image, usage_figure
from vqkit.inspect.stats import ExemplarBank, crops_at, inspect_model, pca
from vqkit.nn.vqvae import VQVAE2, VQVAE2Config, VQVAEConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.training.stage1 import TrainConfig, train

STAGE1 = VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2,
                     code_dim=4, codebook_size=16, restart_after=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas") / "run"
    train(folder, STAGE1, TrainConfig(data=DATA, steps=20, batch_size=16, lr=3e-3), progress=False,
          tensorboard=False)
    return folder


@pytest.fixture(scope="module")
def test_images():
    return load_dataset(DATA, "test")


def test_usage_equals_a_bincount_of_vqkit_encode(run, tmp_path, capsys):
    codes_path, out = tmp_path / "codes.npy", tmp_path / "inspect"
    assert main(["encode", str(run), "--data", DATA, "--limit", "150", "--device", "cpu", "-o", str(codes_path)]) == 0
    assert main(["inspect", str(run), "--data", DATA, "--limit", "150", "--batch-size", "40",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    codes = np.load(codes_path)
    counts = np.bincount(codes.ravel().astype(np.int64), minlength=16)
    summary = json.loads((out / "inspect.json").read_text())
    level = summary["levels"][0]
    assert summary["images"] == 150 and summary["step"] == 20
    assert level["counts"] == counts.tolist()
    assert level["positions"] == codes.size
    assert level["used"] == int((counts > 0).sum()) and level["dead"] == int((counts == 0).sum())
    p = counts[counts > 0] / counts.sum()
    assert level["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert level["most_used"][0] == int(np.argmax(counts))
    assert f"{level['used']}/16 codes used" in printed
    for name in ("atlas_codes.png", "usage.png", "code_maps.png", "pca.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 50


def test_usage_figure_plots_the_sorted_counts(run, test_images):
    model, _ = ckpt.load_model(run)
    ins = inspect_model(model, test_images, limit=64)
    [codes] = model.encode(to_model(test_images.batch(torch.arange(64))[0]))
    counts = torch.bincount(codes.flatten(), minlength=16)
    fig = usage_figure(ins)
    ax = fig.axes[0]
    assert np.array_equal(ax.lines[0].get_ydata(), np.sort(counts.numpy())[::-1])
    used = int((counts > 0).sum())
    assert ax.get_title().startswith(f"codes: {used}/16 codes used, {16 - used} dead")
    assert np.array_equal(ins.levels[0].maps, codes[:8])


def test_exemplars_are_the_nearest_positions_to_each_code(run, test_images):
    model, _ = ckpt.load_model(run)
    n, m = 60, 3
    # Batches of 7 make the bank merge candidates across many batches.
    ins = inspect_model(model, test_images, limit=n, batch_size=7, exemplars=m)
    lv = ins.levels[0]
    images = test_images.batch(torch.arange(n))[0]
    z_e = model.encoders[0](to_model(images))
    codebook = model.quantizers[0].codebook
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
    codes = torch.cdist(flat.double(), codebook.double()).argmin(1)
    dist = (flat - codebook[codes]).square().sum(1)
    h, w = z_e.shape[2:]
    for k in range(16):
        mine = dist[codes == k].sort().values[:m]
        assert torch.allclose(lv.exemplar_dist[k, :len(mine)], mine, rtol=1e-4, atol=1e-6), k
        assert torch.isinf(lv.exemplar_dist[k, len(mine):]).all()
        where = torch.nonzero(codes == k).flatten()
        if len(mine) and (len(mine) == 1 or mine[1] > mine[0] * (1 + 1e-4) + 1e-6):
            best = int(where[dist[where].argmin()])
            b, i, j = best // (h * w), (best // w) % h, best % w
            expected = crops_at(images, torch.tensor([b]), torch.tensor([i]), torch.tensor([j]), 4, 12)[0]
            assert torch.equal(lv.exemplars[k, 0], expected), k


def test_crops_are_the_footprint_with_a_stride_of_context():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    crops = crops_at(images, torch.tensor([1, 0]), torch.tensor([0, 3]), torch.tensor([2, 1]), 2, 6)
    assert crops.shape == (2, 3, 6, 6)
    # Code (0, 2) of image 1: rows -2..3 (two grey rows above the image), columns 2..7.
    assert (crops[0, :, :2] == 128).all()
    assert torch.equal(crops[0, :, 2:], images[1, :, 0:4, 2:8])
    # Code (3, 1) of image 0: rows 4..9 (two grey rows below), columns 0..5.
    assert torch.equal(crops[1, :, :4], images[0, :, 4:8, 0:6])
    assert (crops[1, :, 4:] == 128).all()


def test_bank_keeps_the_nearest_across_batches():
    bank = ExemplarBank(codebook_size=2, per_code=2, channels=1, crop=3)
    images = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
    bank.update(torch.tensor([[[0, 0], [1, 0]]]), torch.tensor([[[5.0, 3.0], [1.0, 4.0]]]), images, 2)
    bank.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[3.5, 0.5], [2.0, 9.0]]]), images, 2)
    assert bank.dist.tolist() == [[3.0, 3.5], [0.5, 1.0]]


def test_each_code_decodes_from_a_filled_map(run, test_images):
    model, _ = ckpt.load_model(run)
    ins = inspect_model(model, test_images, limit=16)
    for k in (0, 7, 15):
        expected = from_model(model.decode([torch.full((1, 7, 7), k)]))[0]
        assert torch.equal(ins.levels[0].decoded[k], expected)
    atlas = atlas_image(ins.levels[0])
    assert atlas.width > 100 and atlas.height > 100


def test_vqvae2_gives_one_atlas_and_usage_per_level(tmp_path, test_images):
    torch.manual_seed(0)
    config = VQVAE2Config(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, strides=[1, 1],
                          code_dim=4, codebook_sizes=[8, 16], kmeans_init=False)
    model = VQVAE2(config).eval()
    ins = inspect_model(model, test_images, limit=20, batch_size=6, exemplars=2, maps=3)
    codes = model.encode(to_model(test_images.batch(torch.arange(20))[0]))
    assert [lv.name for lv in ins.levels] == ["top", "bottom"]
    assert [lv.stride for lv in ins.levels] == [4, 2] and [lv.crop for lv in ins.levels] == [12, 6]
    for lv, c, k in zip(ins.levels, codes, (8, 16)):
        assert torch.equal(lv.counts, torch.bincount(c.flatten(), minlength=k))
        assert torch.equal(lv.maps, c[:3])
    # The top code k decodes with the bottom filled with its most used code (a neutral context).
    neutral = int(ins.levels[1].counts.argmax())
    expected = from_model(model.decode([torch.full((1, 7, 7), 3), torch.full((1, 14, 14), neutral)]))[0]
    assert torch.equal(ins.levels[0].decoded[3], expected)
    written = write_inspection(ins, tmp_path)
    assert [p.name for p in written.atlases] == ["atlas_top.png", "atlas_bottom.png"]
    assert len(json.loads(written.summary.read_text())["levels"]) == 2


def test_pca_of_a_planar_codebook():
    g = torch.Generator().manual_seed(0)
    plane = torch.randn(2, 6, generator=g, dtype=torch.float64)
    coeffs = torch.randn(40, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    proj = pca(coeffs @ plane + 5.0)
    assert proj.points.shape == (40, 2)
    assert sum(proj.explained) == pytest.approx(1.0, abs=1e-9) and proj.explained[0] >= proj.explained[1]
    # A projection onto the plane keeps every pairwise distance.
    codebook = (coeffs @ plane).numpy()
    assert np.allclose(np.linalg.norm(codebook[:, None] - codebook[None], axis=-1),
                       np.linalg.norm(proj.points[:, None] - proj.points[None], axis=-1), atol=1e-8)


def test_reads_only_complete_checkpoints(run, tmp_path):
    # A checkpoint being written (a temporary folder) and one not yet named in `latest`.
    (run / "checkpoints" / ".tmp-step-00000030").mkdir()
    (run / "checkpoints" / "step-00000040").mkdir()
    (run / "checkpoints" / "step-00000040" / "model.safetensors").write_bytes(b"half")
    try:
        _, checkpoint = load_complete(run)
        assert checkpoint.step == 20
    finally:
        (run / "checkpoints" / "step-00000040" / "model.safetensors").unlink()
        (run / "checkpoints" / "step-00000040").rmdir()
        (run / "checkpoints" / ".tmp-step-00000030").rmdir()


def test_bad_input_is_one_clear_error(run, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["inspect", str(run), "--data", f"cifar10:{tmp_path}", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqkit: error:") and "Traceback" not in err
    assert not (tmp_path / "o").exists()
