"""Training the classifier (vqkit.training.classifier) on the embedded sample and on images in
memory, through the shared run setup and loop; and vqkit train-classifier."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA
from score_setup import TINY_CLASSIFIER

from vqkit.cli.main import main
from vqkit.data.datasets import load_dataset
from vqkit.errors import ConfigError
from vqkit.runs import checkpoint as ckpt
from vqkit.training.classifier import (
    ClassifierTrainConfig,
    accuracy,
    augment,
    classify,
    fit_classifier,
    train_classifier,
)
from vqkit.training.loop import TrainingError


def _config(**kw) -> ClassifierTrainConfig:
    return ClassifierTrainConfig(**{"data": DATA, "steps": 20, "batch_size": 16, "lr": 5e-3, **kw})


@pytest.fixture(scope="module")
def test_set():
    return load_dataset(DATA, "test").batch(torch.arange(500))


def test_a_trained_classifier_beats_chance_and_records_its_data(tmp_path, test_set):
    train_classifier(tmp_path / "clf", TINY_CLASSIFIER, _config(steps=120, batch_size=32), progress=False,
                     tensorboard=False)
    model, saved = ckpt.load_classifier(tmp_path / "clf")
    assert saved["kind"] == "classifier" and not model.training
    assert saved["data_shape"] == [1, 28, 28]
    assert saved["class_names"][:2] == ["T-shirt/top", "Trouser"]
    images, labels = test_set
    assert accuracy(model, images, labels) > 0.3          # chance: 0.1
    probs, feats = classify(model, images[:7], batch_size=3)
    assert probs.shape == (7, 10) and feats.shape == (7, 16)
    assert torch.allclose(probs.sum(1), torch.ones(7))


def test_resuming_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    # A constant rate, so that stopping at 6 steps is the first half of 12 (cosine follows --steps).
    kw = dict(schedule="constant")
    train_classifier(tmp_path / "straight", TINY_CLASSIFIER, _config(steps=12, **kw), progress=False,
                     tensorboard=False)
    train_classifier(tmp_path / "split", TINY_CLASSIFIER, _config(steps=6, **kw), progress=False, tensorboard=False)
    train_classifier(tmp_path / "split", TINY_CLASSIFIER, _config(steps=12, **kw), resume=True, progress=False,
                     tensorboard=False)
    a, _ = ckpt.load_classifier(tmp_path / "straight")
    b, _ = ckpt.load_classifier(tmp_path / "split")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_cas_path_trains_on_images_in_memory(tmp_path, test_set):
    images, labels = test_set
    real = fit_classifier(tmp_path / "real", images[:300], labels[:300], TINY_CLASSIFIER,
                          _config(data="300 test images", steps=100, batch_size=32))
    shuffled = labels[:300][torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    noise = fit_classifier(tmp_path / "noise", images[:300], shuffled, TINY_CLASSIFIER,
                           _config(data="shuffled labels", steps=100, batch_size=32))
    assert ckpt.read_config(tmp_path / "real", kind="classifier")["train"]["data"] == "300 test images"
    real_acc, noise_acc = accuracy(real, images[300:], labels[300:]), accuracy(noise, images[300:], labels[300:])
    assert noise_acc < 0.25 < real_acc


def test_augment_shifts_and_flips_only_as_asked():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).reshape(2, 1, 5, 5)
    assert torch.equal(augment(x, 0, False, g), x)
    flipped = augment(x, 0, True, torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    shifted = augment(x, 2, False, g)
    assert shifted.shape == x.shape and shifted.dtype == torch.uint8
    # Every shifted image is a window of the replicate-padded original.
    padded = torch.nn.functional.pad(x.float(), (2,) * 4, mode="replicate")
    for i in range(2):
        windows = [padded[i, :, a:a + 5, b:b + 5] for a in range(5) for b in range(5)]
        assert any(torch.equal(shifted[i].float(), w) for w in windows)


def test_a_classifier_s_schedule_is_cosine_by_default_and_config_checks():
    assert _config().schedule == "cosine"
    for bad in (dict(shift=-1), dict(schedule="step"), dict(label_smoothing=1.0)):
        with pytest.raises(ConfigError):
            _config(**bad)


def test_a_classifier_that_does_not_fit_the_data_is_refused(tmp_path):
    import dataclasses

    with pytest.raises(TrainingError, match="1 channels but the classifier expects 3"):
        train_classifier(tmp_path / "c", dataclasses.replace(TINY_CLASSIFIER, in_channels=3), _config(),
                         progress=False, tensorboard=False)
    with pytest.raises(TrainingError, match="10 classes"):
        train_classifier(tmp_path / "c", dataclasses.replace(TINY_CLASSIFIER, num_classes=4), _config(),
                         progress=False, tensorboard=False)


def test_train_classifier_command_reports_and_keeps_the_test_accuracy(tmp_path, capsys):
    out = tmp_path / "clf"
    assert main(["train-classifier", "--data", DATA, "--steps", "8", "--batch-size", "16", "--widths", "4", "8",
                 "--features", "8", "--shift", "2", "--no-tensorboard", "-o", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    record = json.loads((out / "eval.json").read_text())
    assert record["step"] == 8 and record["images"] == 500 and 0 <= record["accuracy"] <= 1
    model, saved = ckpt.load_classifier(out)
    assert model.config.widths == [4, 8] and saved["model"]["num_classes"] == 10
    assert saved["train"]["shift"] == 2 and saved["train"]["schedule"] == "cosine"
    # --resume takes the run's own model; another --data is only a warning, a second run an error.
    assert main(["train-classifier", "--data", DATA, "--steps", "10", "--batch-size", "16", "--no-tensorboard",
                 "--resume", "-o", str(out)]) == 0
    assert ckpt.latest_checkpoint(out).step == 10
    assert main(["train-classifier", "--data", DATA, "--steps", "10", "--no-tensorboard", "-o", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
