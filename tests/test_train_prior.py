"""Stage 2 end to end on the embedded sample: extract, train a prior, resume, sample."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DATA
from PIL import Image

from vqkit.cli.main import main
from vqkit.data.datasets import load_dataset
from vqkit.nn.vqvae import VQVAEConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.checkpoint import load_prior
from vqkit.runs.codes import CodeStoreError, extract_codes, load_codes
from vqkit.runs.generate import prior_codes, uniform_codes
from vqkit.training.loop import TrainingError
from vqkit.training.prior import (
    _SIZES_BY_MAPS,
    SIZED_BY_MAPS,
    PriorTrainConfig,
    evaluate_prior,
    prior_config_for,
    prior_sizes,
    split_indices,
    train_prior,
)
from vqkit.training.stage1 import TrainConfig, train

STAGE1 = VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2,
                     code_dim=4, codebook_size=16, restart_after=0)
SIZES = dict(channels=8, layers=1)


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    run = root / "run"
    train(run, STAGE1, TrainConfig(data=DATA, steps=30, batch_size=16, lr=3e-3), progress=False,
          tensorboard=False)
    model, checkpoint = ckpt.load_model(run)
    source = {"run": str(run.resolve()), "fingerprint": checkpoint.state["fingerprint"],
              "data": DATA, "split": "train"}
    extract_codes(model, load_dataset(DATA, "train"), root / "codes", limit=200, progress=False,
                  source=source)
    return root / "codes"


def _train(run, codes_dir, steps, arch="pixelsnail", conditional=False, resume=False, **kw):
    codes = load_codes(codes_dir)
    config = prior_config_for(codes, arch, conditional, **SIZES)
    # On the CPU also where CUDA is present: resuming is bit-identical there (the embedding's
    # backward on CUDA adds atomically, in no fixed order).
    train_config = PriorTrainConfig(codes=str(codes_dir), steps=steps, **{"batch_size": 16, "lr": 3e-3,
                                                                           "eval_every": 10, "device": "cpu", **kw})
    return train_prior(run, config, train_config, resume=resume, progress=False, tensorboard=False), train_config


def test_prior_learns_the_codes_and_records_its_source(tmp_path, codes_dir):
    codes = load_codes(codes_dir)
    _, config = _train(tmp_path / "prior", codes_dir, steps=80)
    prior, saved = load_prior(tmp_path / "prior")
    assert saved["kind"] == "prior"
    assert saved["source"]["fingerprint"] == codes.manifest["source"]["fingerprint"]
    _, val, val_idx = split_indices(codes, config)
    result = evaluate_prior(prior, val, val_idx)
    assert result.uniform_bits_per_code == pytest.approx(math.log2(16))
    assert result.bits_per_code < 0.9 * result.uniform_bits_per_code
    assert result.maps == 10  # the last 5% of the 200 maps are held out


def test_held_out_split_and_mismatched_validation_codes(tmp_path, codes_dir):
    codes = load_codes(codes_dir)
    train_idx, val, val_idx = split_indices(codes, PriorTrainConfig(codes=str(codes_dir), val_fraction=0.1))
    assert val is codes and train_idx.tolist() == list(range(180)) and val_idx.tolist() == list(range(180, 200))
    with pytest.raises(CodeStoreError, match=str(tmp_path)):  # not a code set
        split_indices(codes, PriorTrainConfig(codes=str(codes_dir), val_codes=str(tmp_path)))


def test_held_out_images_of_a_flipped_set_are_originals_whose_mirrors_are_not_trained_on(tmp_path, codes_dir):
    codes = load_codes(codes_dir)
    model, _ = ckpt.load_model(codes.manifest["source"]["run"])
    [flipped] = extract_codes(model, load_dataset(DATA, "train"), tmp_path / "f", limit=200, flip=True,
                              progress=False, source=codes.manifest["source"])
    train_idx, val, val_idx = split_indices(flipped, PriorTrainConfig(codes=str(tmp_path / "f"), val_fraction=0.1))
    assert val_idx.tolist() == list(range(180, 200))
    assert sorted(train_idx.tolist()) == list(range(180)) + list(range(200, 380))
    # A separate held-out set is measured on its originals only.
    _, _, separate = split_indices(codes, PriorTrainConfig(codes=str(codes_dir), val_codes=str(tmp_path / "f")))
    assert separate.tolist() == list(range(200))


def test_the_best_checkpoint_holds_the_lowest_logged_held_out_nll(tmp_path, codes_dir):
    result, config = _train(tmp_path / "p", codes_dir, steps=40, patience=0, lr=3e-2)
    history = ckpt.read_validation(tmp_path / "p")["history"]
    assert [s for s, _ in history] == [10, 20, 30, 40]
    best_step, best_value = min(history, key=lambda h: h[1])
    assert (result.best_step, result.best_value) == (best_step, best_value)
    _, val, val_idx = split_indices(load_codes(codes_dir), config)
    best, _ = load_prior(tmp_path / "p")
    assert ckpt.chosen_checkpoint(tmp_path / "p").step == best_step
    assert evaluate_prior(best, val, val_idx).bits_per_code == pytest.approx(best_value, rel=1e-6)
    latest, _ = load_prior(tmp_path / "p", "latest")
    assert evaluate_prior(latest, val, val_idx).bits_per_code == pytest.approx(history[-1][1], rel=1e-6)


def test_sizes_follow_the_number_of_maps_unless_given(codes_dir):
    codes = load_codes(codes_dir)  # 200 maps: a small set
    small, large = prior_sizes(len(codes)), prior_sizes(10**6)
    assert small != large and small["dropout"] > large["dropout"]
    assert set(small) == set(large) == set(SIZED_BY_MAPS)
    config = prior_config_for(codes, "pixelsnail", False)
    assert {name: getattr(config, name) for name in SIZED_BY_MAPS} == small
    assert prior_config_for(codes, "pixelsnail", False, dropout=0.0, channels=8).dropout == 0.0
    bounds = [bound for bound, _ in _SIZES_BY_MAPS]
    assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
    assert prior_sizes(bounds[0]) == _SIZES_BY_MAPS[0][1] and prior_sizes(bounds[0] + 1) == _SIZES_BY_MAPS[1][1]


def test_resume_gives_the_same_prior_as_training_straight(tmp_path, codes_dir):
    _train(tmp_path / "straight", codes_dir, steps=12)
    _train(tmp_path / "resumed", codes_dir, steps=6)
    codes = load_codes(codes_dir)
    config = prior_config_for(codes, "pixelsnail", False, **SIZES)
    train_prior(tmp_path / "resumed", config,
                PriorTrainConfig(codes=str(codes_dir), steps=12, batch_size=16, lr=3e-3, eval_every=10, device="cpu"),
                resume=True, progress=False, tensorboard=False)
    a, _ = load_prior(tmp_path / "straight")
    b, _ = load_prior(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_prior_run_refuses_another_configuration_and_wrong_codes(tmp_path, codes_dir):
    _train(tmp_path / "p", codes_dir, steps=2)
    with pytest.raises(TrainingError, match="already holds a run"):
        _train(tmp_path / "p", codes_dir, steps=4)
    codes = load_codes(codes_dir)
    other = prior_config_for(codes, "pixelcnn", False, **SIZES)
    with pytest.raises(TrainingError, match="another model configuration"):
        train_prior(tmp_path / "p", other, PriorTrainConfig(codes=str(codes_dir), steps=4),
                    resume=True, progress=False, tensorboard=False)
    # The seed fixes the data order with the step, as in stage 1 (they share one run setup).
    with pytest.raises(TrainingError, match="the run used seed=0"):
        _train(tmp_path / "p", codes_dir, steps=4, seed=1, resume=True)
    wrong = prior_config_for(codes, "pixelcnn", False, **SIZES)
    wrong.height = 5
    with pytest.raises(TrainingError, match="7x7 with K=16"):
        train_prior(tmp_path / "q", wrong, PriorTrainConfig(codes=str(codes_dir), steps=1),
                    progress=False, tensorboard=False)


def test_sampling_helpers_are_seeded(tmp_path, codes_dir):
    _train(tmp_path / "p", codes_dir, steps=2, arch="pixelcnn", conditional=True)
    prior, _ = load_prior(tmp_path / "p")
    labels = torch.tensor([0, 1, 2])
    first = prior_codes(prior, 3, labels, seed=5)
    assert torch.equal(first, prior_codes(prior, 3, labels, seed=5))
    assert first.shape == (3, 7, 7) and 0 <= int(first.min()) and int(first.max()) < 16
    uniform = uniform_codes(64, 7, 7, 16, seed=1)
    assert torch.equal(uniform, uniform_codes(64, 7, 7, 16, seed=1))
    assert set(uniform.unique().tolist()) == set(range(16))


def test_cli_train_prior_and_sample(tmp_path, codes_dir, capsys):
    prior_dir = tmp_path / "prior"
    assert main(["train-prior", str(codes_dir), "-o", str(prior_dir), "--steps", "3", "--channels", "8",
                 "--layers", "1", "--conditional", "--no-tensorboard", "--eval-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "bits per code against 4.000 for the uniform prior" in out
    # The one size not given is the one for this many maps, and the command says so.
    dropout = prior_sizes(200)["dropout"]
    assert f"dropout {dropout}: the sizes for a code set of 200 maps" in out
    assert ckpt.read_config(prior_dir, kind="prior")["model"]["dropout"] == dropout
    assert "best checkpoint: step" in out

    grid = tmp_path / "grid.png"
    assert main(["sample", str(prior_dir), "-n", "4", "--nrow", "2", "-o", str(grid)]) == 0
    single_width = Image.open(grid).size[0]
    assert main(["sample", str(prior_dir), "-n", "4", "--nrow", "2", "--checkpoint", "latest", "-o", str(grid)]) == 0
    assert "(latest checkpoint: prior at step 3)" in capsys.readouterr().out
    assert main(["sample", str(prior_dir), "-n", "4", "--nrow", "2", "--compare-uniform", "-o", str(grid)]) == 0
    assert Image.open(grid).size[0] == 2 * single_width + 8
    assert main(["sample", str(prior_dir), "-n", "2", "--class", "all", "-o", str(grid)]) == 0
    assert "20 samples" in capsys.readouterr().out  # ten classes, two each
    assert main(["sample", str(prior_dir), "--class", "Sneaker", "-n", "2", "-o", str(grid)]) == 0

    assert main(["sample", str(prior_dir), "--class", "unicorn", "-o", str(grid)]) == 2
    assert "--class 'unicorn'" in capsys.readouterr().err


def test_sample_refuses_a_stage1_run_that_changed(tmp_path, codes_dir, capsys):
    prior_dir = tmp_path / "prior"
    _train(prior_dir, codes_dir, steps=1)
    config = json.loads((prior_dir / "config.json").read_text())
    config["source"]["fingerprint"] = "0" * 64
    (prior_dir / "config.json").write_text(json.dumps(config))
    assert main(["sample", str(prior_dir), "-n", "2", "-o", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "not the model the prior's codes came from" in err and not (tmp_path / "s.png").exists()


def test_cli_eval_of_a_prior_run_reports_bits_with_the_prior(tmp_path, codes_dir, capsys):
    prior_dir = tmp_path / "prior"
    _train(prior_dir, codes_dir, steps=40)
    assert main(["eval", str(prior_dir), "--limit", "50", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["uniform_bits_per_code"] == pytest.approx(4.0)
    assert report["saving_bits_per_code"] == pytest.approx(4.0 - report["bits_per_code"])
    stage1 = report["stage1"]
    # 49 latents per 784 subpixels: the prior replaces 4 bits per latent by its own figure.
    assert stage1["bits_per_dim"] == pytest.approx(stage1["nll_bits_per_dim"] + 49 * 4.0 / 784)
    assert report["bits_per_dim_with_prior"] == pytest.approx(
        stage1["nll_bits_per_dim"] + 49 * report["bits_per_code"] / 784)
    assert report["bits_per_dim_with_prior"] < stage1["bits_per_dim"]
    # The best checkpoint by default, the latest on request; eval.json names the one measured.
    older = sorted(p.name for p in (prior_dir / "checkpoints").iterdir())[0]
    assert older != "step-00000040"
    (prior_dir / "best").write_text(older + "\n")  # as if that step had scored best
    assert main(["eval", str(prior_dir), "--limit", "50", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["checkpoint"] == older and ckpt.read_eval(prior_dir)["step"] == int(older[5:])
    assert best["bits_per_code"] != report["bits_per_code"]
    assert main(["eval", str(prior_dir), "--limit", "50", "--json", "--checkpoint", "latest"]) == 0
    latest = json.loads(capsys.readouterr().out)
    assert latest["checkpoint"] == "step-00000040" and latest["bits_per_code"] == report["bits_per_code"]
