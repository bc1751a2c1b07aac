"""VQ-VAE-2 stage 2 from the command line (Algorithm 2): extract every level, a top prior and a
bottom prior conditioned on the top map, then sample the chain and decode it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, TINY2
from PIL import Image

from vqkit.cli.main import main
from vqkit.data.datasets import load_dataset, to_model
from vqkit.nn.vqvae import VQVAE2
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.checkpoint import load_prior
from vqkit.runs.codes import CodeStoreError, extract_codes, load_codes
from vqkit.runs.generate import LevelPrior, chain_codes, check_chain, decode_codes
from vqkit.training.prior import evaluate_prior
from vqkit.training.stage1 import TrainConfig, train

N = 40
PRIOR = ["--steps", "4", "--batch-size", "8", "--channels", "8", "--layers", "1", "--no-tensorboard"]


def _stage1(run, steps):
    train(run, TINY2, TrainConfig(data=DATA, steps=steps, batch_size=8, lr=3e-3), progress=False,
          tensorboard=False)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """A stage-1 run, its codes (N images), a top prior and a class-conditional bottom prior
    conditioned on the top map."""
    root = tmp_path_factory.mktemp("stage2")
    _stage1(root / "run", 8)
    assert main(["extract", str(root / "run"), "--limit", str(N), "--batch-size", "16", "--device", "cpu",
                 "-o", str(root / "codes")]) == 0
    assert main(["train-prior", str(root / "codes" / "top"), "--arch", "pixelcnn", *PRIOR,
                 "-o", str(root / "top")]) == 0
    assert main(["train-prior", str(root / "codes" / "bottom"), "--cond", str(root / "codes" / "top"),
                 "--conditional", *PRIOR, "-o", str(root / "bottom")]) == 0
    return root


def test_extract_writes_one_aligned_code_set_per_level(stage2, capsys):
    model, checkpoint = ckpt.load_model(stage2 / "run")
    images = load_dataset(DATA, "train").images[:N]
    expected = model.encode(to_model(images))
    top, bottom = load_codes(stage2 / "codes" / "top"), load_codes(stage2 / "codes" / "bottom")
    assert (len(top), top.shape, top.codebook_size) == (N, (7, 7), 8)
    assert (len(bottom), bottom.shape, bottom.codebook_size) == (N, (14, 14), 16)
    for level, (codes, maps) in enumerate(zip([top, bottom], expected)):
        assert torch.equal(codes.batch(torch.arange(N))[0], maps)
        source = codes.manifest["source"]
        assert (source["level"], source["level_index"]) == (["top", "bottom"][level], level)
        assert source["fingerprint"] == checkpoint.state["fingerprint"]
    assert np.array_equal(top.labels, bottom.labels)
    manifest = json.loads((stage2 / "codes" / "manifest.json").read_text())
    assert manifest["kind"] == "vqkit-code-levels" and manifest["levels"] == ["top", "bottom"]
    assert not [p for p in stage2.iterdir() if p.name.startswith(".")]
    with pytest.raises(CodeStoreError, match="one code set per level.*bottom"):
        load_codes(stage2 / "codes")


def test_flipped_levels_stay_aligned_and_cannot_condition_unflipped_ones(stage2, tmp_path, capsys):
    assert main(["extract", str(stage2 / "run"), "--limit", str(N), "--flip", "-o", str(tmp_path / "f")]) == 0
    assert f"{N} images and their mirror images" in capsys.readouterr().out
    model, _ = ckpt.load_model(stage2 / "run")
    mirrored = model.encode(to_model(load_dataset(DATA, "train").images[:N].flip(-1)))
    for name, maps in zip(["top", "bottom"], mirrored):
        codes = load_codes(tmp_path / "f" / name)
        assert (len(codes), codes.images) == (2 * N, N)
        assert torch.equal(codes.batch(torch.arange(N, 2 * N))[0], maps)
    assert main(["train-prior", str(tmp_path / "f" / "bottom"), "--cond", str(tmp_path / "f" / "top"), *PRIOR,
                 "-o", str(tmp_path / "bottom")]) == 0
    # The maps of a mirrored set are not those of a plain one: refused by name.
    assert main(["train-prior", str(tmp_path / "f" / "bottom"), "--cond", str(stage2 / "codes" / "top"), *PRIOR,
                 "-o", str(tmp_path / "mixed")]) == 2
    assert f"holds {N} code maps of {N} images" in capsys.readouterr().err


def test_a_crash_mid_extraction_leaves_no_level_behind(stage2, tmp_path, monkeypatch):
    model, _ = ckpt.load_model(stage2 / "run")
    data = load_dataset(DATA, "train")
    batch = data.batch
    calls = []

    def crashing(indices):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return batch(indices)

    monkeypatch.setattr(data, "batch", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        extract_codes(model, data, tmp_path / "codes", batch_size=8, limit=N, progress=False,
                       source={"run": "r"})
    assert list(tmp_path.iterdir()) == []


def test_priors_record_their_levels_and_the_bottom_nll_uses_the_top_maps(stage2):
    top_prior, top_config = load_prior(stage2 / "top")
    prior, config = load_prior(stage2 / "bottom")
    assert top_prior.config.cond_codes == [] and top_config["source"]["level"] == "top"
    assert prior.config.cond_codes == [[8, 7, 7]] and prior.config.num_classes == 10
    assert config["train"]["cond_codes"] == [str(stage2 / "codes" / "top")]
    assert config["source"]["cond_levels"] == ["top"] and config["source"]["cond_level_indices"] == [0]

    top, bottom = load_codes(stage2 / "codes" / "top"), load_codes(stage2 / "codes" / "bottom")
    idx = torch.arange(8)
    maps, labels = bottom.batch(idx)
    top_maps = top.batch(idx)[0]
    with torch.no_grad():
        nll = prior.nll(maps, labels, cond_codes=[top_maps])
        assert not torch.allclose(nll, prior.nll(maps, labels, cond_codes=[(top_maps + 1) % 8]))
    result = evaluate_prior(prior, bottom, idx, cond=[top])
    assert result.bits_per_code == pytest.approx(float(nll.mean()) / np.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="conditioned on 1 code map"):
        evaluate_prior(prior, bottom, idx)


def test_sample_the_chain_top_first_and_decode_it(stage2, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["sample", str(stage2 / "top"), str(stage2 / "bottom"), "-n", "4", "--nrow", "2",
                 "-o", str(grid)]) == 0
    assert Image.open(grid).size == (2 * 30 + 2, 2 * 30 + 2)
    assert main(["sample", str(stage2 / "top"), str(stage2 / "bottom"), "-n", "4", "--nrow", "2",
                 "--compare-uniform", "-o", str(grid)]) == 0
    assert Image.open(grid).size[0] == 2 * 62 + 8
    # Only the bottom prior is class-conditional: the labels go to it.
    assert main(["sample", str(stage2 / "top"), str(stage2 / "bottom"), "-n", "1", "--class", "all",
                 "-o", str(grid)]) == 0
    assert "10 samples" in capsys.readouterr().out

    chain = [LevelPrior(run, *load_prior(run)) for run in (stage2 / "top", stage2 / "bottom")]
    model = check_chain(chain)
    assert isinstance(model, VQVAE2)
    labels = torch.tensor([0, 1, 2, 3])
    top, bottom = chain_codes(chain, 4, labels, seed=3)
    assert top.shape == (4, 7, 7) and bottom.shape == (4, 14, 14) and int(bottom.max()) < 16
    assert all(torch.equal(a, b) for a, b in zip(chain_codes(chain, 4, labels, seed=3), [top, bottom]))
    images = decode_codes(model, [top, bottom])
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images, decode_codes(model, [top, bottom], batch_size=3))


def test_eval_of_the_conditioned_prior(stage2, capsys):
    assert main(["eval", str(stage2 / "bottom"), "--limit", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["uniform_bits_per_code"] == pytest.approx(4.0)
    # The bottom prior replaces the 4 bits of each of the 196 bottom latents; the top keeps its 3.
    assert report["bits_per_dim_with_prior"] == pytest.approx(
        report["stage1"]["bits_per_dim"] - 196 * report["saving_bits_per_code"] / 784)
    codes = stage2 / "codes"
    assert main(["eval", str(stage2 / "bottom"), "--codes", str(codes / "bottom"), "--cond",
                 str(codes / "top"), "--limit", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["maps"] == 8
    assert main(["eval", str(stage2 / "bottom"), "--codes", str(codes / "bottom"), "--limit", "8"]) == 2
    assert "--cond" in capsys.readouterr().err


def test_mismatched_priors_and_conditioning_sets_are_refused(stage2, tmp_path, capsys):
    codes, out = stage2 / "codes", str(tmp_path / "p")
    grid = str(tmp_path / "grid.png")
    assert main(["sample", str(stage2 / "bottom"), str(stage2 / "top"), "-o", grid]) == 2
    assert "top-first" in capsys.readouterr().err
    assert main(["sample", str(stage2 / "top"), "-o", grid]) == 2
    assert "one prior per level" in capsys.readouterr().err

    assert main(["train-prior", str(codes / "top"), "--cond", str(codes / "bottom"), *PRIOR, "-o", out]) == 2
    assert "levels above" in capsys.readouterr().err

    assert main(["extract", str(stage2 / "run"), "--limit", "16", "-o", str(tmp_path / "short")]) == 0
    assert main(["train-prior", str(codes / "bottom"), "--cond", str(tmp_path / "short" / "top"),
                 *PRIOR, "-o", out]) == 2
    err = capsys.readouterr().err
    assert "holds 16 code maps" in err and str(tmp_path / "short" / "top") in err

    _stage1(tmp_path / "other", 1)
    assert main(["extract", str(tmp_path / "other"), "--limit", str(N), "-o", str(tmp_path / "other-codes")]) == 0
    capsys.readouterr()
    assert main(["train-prior", str(codes / "bottom"), "--cond", str(tmp_path / "other-codes" / "top"),
                 *PRIOR, "-o", out]) == 2
    assert "another stage-1 model" in capsys.readouterr().err
    assert not (tmp_path / "p" / "latest").exists() and not Path(grid).exists()
