"""Classifier-based rejection sampling (VQ-VAE-2 section 3.3; vqkit.runs.generate.reject_codes)
and vqkit sample --reject."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from score_setup import build

from vqkit.cli.main import main
from vqkit.errors import UsageError
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import (
    LevelPrior,
    check_chain,
    check_classifier,
    decode_codes,
    label_probability,
    load_checked_classifier,
    reject_codes,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build(tmp_path_factory.mktemp("reject"))


@pytest.fixture(scope="module")
def chain(runs):
    chain = [LevelPrior.load(runs / "prior")]
    return chain, check_chain(chain), ckpt.load_classifier(runs / "clf")[0]


def _threshold(chain) -> float:
    """A threshold that about half the plain samples of the class that the classifier finds least
    in them reach, and more of the other classes' (the tiny models' samples are poor)."""
    links, model, classifier = chain
    probe = reject_codes(links, model, classifier, torch.arange(200) % 10, 0.0, seed=99)
    probs = label_probability(classifier, decode_codes(model, probe.codes), probe.labels)
    return min(float(probs[probe.labels == c].median()) for c in range(10))


def test_rejection_keeps_only_samples_above_the_threshold(chain):
    links, model, classifier = chain
    labels = torch.arange(30) % 10
    threshold = _threshold(chain)
    kept = reject_codes(links, model, classifier, labels, threshold, seed=1, batch_size=16)
    assert kept.complete and kept.kept == 30
    assert torch.equal(kept.labels, labels)                 # one sample for every label asked for
    assert kept.drawn > 30 and kept.acceptance == pytest.approx(30 / kept.drawn)
    # Recomputed from the codes, independently of what reject_codes recorded.
    probs = label_probability(classifier, decode_codes(model, kept.codes), kept.labels)
    assert (probs >= threshold).all()
    assert torch.allclose(probs, kept.probs)
    assert kept.codes[0].shape == (30, 7, 7)


def test_threshold_zero_keeps_every_draw(chain):
    links, model, classifier = chain
    kept = reject_codes(links, model, classifier, torch.arange(12) % 10, 0.0, seed=3)
    assert (kept.kept, kept.drawn, kept.acceptance) == (12, 12, 1.0)


def test_the_cap_on_draws_stops_and_says_so(chain):
    links, model, classifier = chain
    labels = torch.arange(40) % 10
    threshold = _threshold(chain)
    kept = reject_codes(links, model, classifier, labels, threshold, seed=1, max_draws=30, batch_size=16)
    assert kept.drawn == 30 and not kept.complete and 0 < kept.kept < 40
    assert "acceptance" in kept.summary(threshold)
    with pytest.raises(UsageError, match="none of the 20 samples drawn reached class probability 1"):
        reject_codes(links, model, classifier, labels, 1.0, max_draws=20)


def test_rejection_needs_a_class_conditional_prior_and_a_probability(runs, chain):
    _, model, classifier = chain
    plain = [LevelPrior.load(runs / "plain")]
    with pytest.raises(UsageError, match="class-conditional prior"):
        reject_codes(plain, model, classifier, torch.zeros(4, dtype=torch.int64), 0.5)
    with pytest.raises(UsageError, match="probability in"):
        reject_codes(chain[0], model, classifier, torch.zeros(4, dtype=torch.int64), 1.5)


def test_a_classifier_of_other_images_or_classes_is_refused(runs, chain):
    links, model, classifier = chain
    config = ckpt.read_config(runs / "clf", kind="classifier")
    load_checked_classifier(runs / "clf", model, links)      # fits
    with pytest.raises(ckpt.CheckpointError, match=r"clf/config.json: .*images of shape \[1, 28, 28\].*\[3, 32, 32\]"):
        check_classifier(classifier, config, runs / "clf", (3, 32, 32))
    with pytest.raises(ckpt.CheckpointError, match="tells 10 classes apart .* the priors 4"):
        check_classifier(classifier, config, runs / "clf", (1, 28, 28), num_classes=4)
    with pytest.raises(ckpt.CheckpointError, match="are not the priors'"):
        check_classifier(classifier, config, runs / "clf", (1, 28, 28), class_names=[str(i) for i in range(10)])


def test_sample_command_with_rejection(runs, tmp_path, capsys):
    out = tmp_path / "kept.png"
    assert main(["sample", str(runs / "prior"), "-n", "10", "--reject", "0", "--classifier", str(runs / "clf"),
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept 10 of 10 samples" in printed and "acceptance 100.0%" in printed
    assert Image.open(out).size[0] > 28
    assert main(["sample", str(runs / "prior"), "-n", "10", "--reject", "0.5", "-o", str(out)]) == 2
    assert "--classifier RUN" in capsys.readouterr().err
    assert main(["sample", str(runs / "plain"), "-n", "4", "--reject", "0.5", "--classifier", str(runs / "clf"),
                 "-o", str(out)]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert main(["sample", str(runs / "prior"), "-n", "10", "--reject", "0.99", "--max-draws", "10",
                 "--classifier", str(runs / "clf"), "-o", str(out)]) in (0, 2)
    err = capsys.readouterr().err
    assert "lower --reject or raise --max-draws" in err or "lower the threshold" in err
