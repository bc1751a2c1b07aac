"""vqkit score (vqkit.inspect.score): the table's rows and columns, score.json and score.png, the
sweep, and the checks of the classifier against the priors' data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from score_setup import TINY_CLASSIFIER, build

from vqkit.cli.main import main
from vqkit.errors import UsageError
from vqkit.inspect.score import ScoreSettings, feature_scores, per_class_accuracy, score_chain, table
from vqkit.runs import checkpoint as ckpt
from vqkit.training.classifier import ClassifierTrainConfig, train_classifier

N = 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build(tmp_path_factory.mktemp("score"))


@pytest.fixture(scope="module")
def record(runs):
    return score_chain([runs / "prior"], runs / "clf", runs / "out",
                       ScoreSettings(n=N, cas_steps=60, reject=0.0))


def _rows(record) -> dict:
    return {row["name"]: row for row in record["rows"]}


def test_real_images_against_themselves_score_best():
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)).relu()
    scores = feature_scores(features, features)
    assert scores["precision"] == scores["recall"] == 1.0
    assert scores["frechet_distance"] == pytest.approx(0.0, abs=1e-9)


def test_the_table_has_every_reference_row_and_writes_its_files(runs, record):
    rows = _rows(record)
    assert list(rows) == ["real held-out", "reconstructions", "uniform prior", "prior", "prior, rejection 0"]
    assert all(row["images"] == N for row in rows.values())
    assert record["n"] == N and record["k"] == 3 and record["reference"] == f"{N} real test images"
    saved = json.loads((runs / "out" / "score.json").read_text())
    assert saved["rows"] == record["rows"]
    assert Image.open(runs / "out" / "score.png").size[0] > 100
    assert not list((runs / "out").glob(".cas-*"))          # the CAS runs are cleaned up
    text = table(record)
    for name in rows:
        assert name in text
    assert "Fréchet distance" in text and "CAS / real" in text


def test_real_held_out_images_score_near_the_reference_and_samples_far(record):
    rows = _rows(record)
    real, uniform = rows["real held-out"], rows["uniform prior"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert real["frechet_distance"] < 0.2 * uniform["frechet_distance"]
    assert real["cas_ratio"] == 1.0 and real["class_accuracy"] > 0.25


def test_per_class_accuracy_counts_each_class_apart():
    hits = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    labels = torch.tensor([0, 0, 2, 2, 3])
    assert per_class_accuracy(hits, labels, 5) == [0.5, None, 1.0, 0.0, None]


def test_rows_with_classes_carry_their_accuracy_by_class(record):
    for row in record["rows"]:
        per = row["class_accuracies"]
        assert len(per) == 10
        if row["name"] in ("prior", "uniform prior"):     # n / 10 samples drawn for every class
            assert sum(per) / 10 == pytest.approx(row["class_accuracy"])
    text = table(record).splitlines()
    start = text.index("classifier accuracy by class:")
    assert text[start + 1].split()[0] == "class" and len(text[start + 3:start + 13]) == 10
    assert text[start + 3].startswith(record["class_names"][0])


def test_cas_of_uniform_prior_samples_is_near_chance(record):
    rows = _rows(record)
    uniform, real = rows["uniform prior"]["cas"], rows["real held-out"]["cas"]
    assert uniform < 0.2                      # ten classes: chance is 0.1
    assert real > uniform + 0.15              # the same training on real images learns something
    assert rows["uniform prior"]["cas_ratio"] == pytest.approx(uniform / real)


def test_rejection_row_at_threshold_zero_keeps_every_draw(record):
    row = _rows(record)["prior, rejection 0"]
    assert row["acceptance"] == 1.0 and "acceptance 100.0%" in row["notes"][0]


def test_unconditional_priors_skip_the_class_columns(runs, tmp_path):
    rec = score_chain([runs / "plain"], runs / "clf", tmp_path, ScoreSettings(n=40, reject=0.5, cas=False))
    rows = _rows(rec)
    assert rows["prior"]["class_accuracy"] is None and rows["prior"]["cas"] is None
    assert "no class accuracy or CAS" in " ".join(rows["prior"]["notes"])
    assert rows["prior, rejection 0.5"]["images"] == 0
    assert "class-conditional" in rows["prior, rejection 0.5"]["notes"][0]
    assert rows["real held-out"]["cas"] is None and rows["real held-out"]["class_accuracy"] is not None
    assert not any("CAS" in note for row in rows.values() for note in row["notes"] if "no class" not in note)


def test_sweep_plots_precision_against_recall(runs, tmp_path):
    rec = score_chain([runs / "prior"], runs / "clf", tmp_path, ScoreSettings(n=40, cas=False, sweep=True))
    families = {p["family"] for p in rec["sweep"]}
    assert {"temperature", "top_k"} <= families
    assert [p["value"] for p in rec["sweep"] if p["family"] == "temperature"] == [0.7, 0.85, 1.0, 1.15]
    assert [p["value"] for p in rec["sweep"] if p["family"] == "top_k"] == [4]   # K = 16
    for p in rec["sweep"]:
        assert 0 <= p["precision"] <= 1 and 0 <= p["recall"] <= 1
    assert "sweep" in table(rec)
    assert (tmp_path / "score.png").exists()


def test_a_classifier_of_other_data_is_refused(runs, tmp_path):
    images = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8)
    from vqkit.data.datasets import TensorImageSet

    other = TensorImageSet("small", images, torch.arange(64) % 10, [str(i) for i in range(10)])
    train_classifier(tmp_path / "small", TINY_CLASSIFIER, ClassifierTrainConfig(data="small", steps=2, batch_size=8),
                     dataset=other, progress=False, tensorboard=False)
    with pytest.raises(ckpt.CheckpointError, match=r"small/config.json: .*\[1, 16, 16\]"):
        score_chain([runs / "prior"], tmp_path / "small", tmp_path / "out", ScoreSettings(n=20, cas=False))
    with pytest.raises(ckpt.CheckpointError, match="expected a 'classifier' run"):
        score_chain([runs / "prior"], runs / "prior", tmp_path / "out", ScoreSettings(n=20, cas=False))
    with pytest.raises(UsageError, match="must exceed k=3"):
        ScoreSettings(n=3)


def test_score_command(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["score", str(runs / "prior"), "--classifier", str(runs / "clf"), "-n", "30", "--no-cas",
                 "--reject", "0.05", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "real held-out" in printed and "prior, rejection 0.05" in printed and "score.json" in printed
    assert json.loads((out / "score.json").read_text())["settings"]["reject"] == 0.05
    assert main(["score", str(runs / "prior"), "--classifier", str(runs / "clf"), "-n", "20", "--no-cas",
                 "--json", "-o", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 20 and printed["settings"]["cas"] is False
    assert main(["score", str(runs / "prior"), "--classifier", str(runs / "nowhere"), "-o", str(out)]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_a_hierarchical_chain_is_scored_level_by_level(runs, tmp_path, capsys):
    from conftest import DATA, TINY2

    from vqkit.training.stage1 import TrainConfig, train

    train(tmp_path / "run", TINY2, TrainConfig(data=DATA, steps=8, batch_size=8, lr=3e-3), progress=False,
          tensorboard=False)
    prior = ["--arch", "pixelcnn", "--steps", "4", "--batch-size", "8", "--channels", "8", "--layers", "1",
             "--conditional", "--no-tensorboard"]
    codes = tmp_path / "codes"
    assert main(["extract", str(tmp_path / "run"), "--limit", "40", "-o", str(codes)]) == 0
    assert main(["train-prior", str(codes / "top"), *prior, "-o", str(tmp_path / "top")]) == 0
    assert main(["train-prior", str(codes / "bottom"), "--cond", str(codes / "top"), *prior,
                 "-o", str(tmp_path / "bottom")]) == 0
    capsys.readouterr()
    rec = score_chain([tmp_path / "top", tmp_path / "bottom"], runs / "clf", tmp_path / "out",
                      ScoreSettings(n=30, cas=False, reject=0.0))
    rows = _rows(rec)
    assert rows["prior, rejection 0"]["images"] == 30 and rows["prior"]["class_accuracy"] is not None
    assert rec["priors"][1].endswith("bottom")
    with pytest.raises(ckpt.CheckpointError, match="one prior per level"):
        score_chain([tmp_path / "top"], runs / "clf", tmp_path / "out", ScoreSettings(n=30, cas=False))


def test_building_the_score_options_loads_no_matplotlib():
    import subprocess
    import sys

    code = ("import sys; from vqkit.cli.main import build_parser; build_parser(); import vqkit.inspect.score; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_the_command_runs_on_the_device_it_is_given(runs, tmp_path, capsys):
    """--device cpu scores (and score.json records it); a CUDA device that is not there is one
    clear line before any work."""
    argv = ["score", str(runs / "prior"), "--classifier", str(runs / "clf"), "-n", "20", "--no-cas", "--json"]
    assert main([*argv, "-o", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["device"] == "cpu"
    if not torch.cuda.is_available():
        assert main([*argv, "-o", str(tmp_path / "b"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vqkit: error: ") and "CUDA is not available" in err and "Traceback" not in err
        assert not (tmp_path / "b" / "score.json").exists()
