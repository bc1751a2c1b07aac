"""The classifier that scores samples (vqkit.nn.classifier): its shape contract, its checks and
its saved folders."""

from __future__ import annotations

import pytest
import torch

from vqkit.errors import ConfigError, UsageError
from vqkit.nn.classifier import Classifier, ClassifierConfig
from vqkit.nn.pretrained import PretrainedMixin

SMALL = dict(widths=[4, 8], features=6, dropout=0.0)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 17)])
def test_features_and_logits_have_the_contracted_shapes(channels, size):
    model = Classifier(ClassifierConfig(in_channels=channels, num_classes=5, **SMALL)).eval()
    x = torch.rand(3, channels, size, size) * 2 - 1
    features = model.features(x)
    assert features.shape == (3, 6)
    assert (features >= 0).all()                       # after the ReLU
    logits = model(x)
    assert logits.shape == (3, 5)
    assert torch.allclose(logits, model.head(features))  # the logits are a linear map of the features


def test_depth_adds_convolutions_per_stage():
    one = Classifier(ClassifierConfig(depth=1, **SMALL))
    two = Classifier(ClassifierConfig(depth=2, **SMALL))
    count = lambda m: sum(isinstance(layer, torch.nn.Conv2d) for layer in m.body)
    assert (count(one), count(two)) == (2, 4)


def test_bad_inputs_and_configs_are_refused():
    model = Classifier(ClassifierConfig(in_channels=1, **SMALL))
    with pytest.raises(UsageError, match=r"\(B, 1, H, W\)"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(UsageError, match="too small"):
        Classifier(ClassifierConfig(widths=[4, 4, 4, 4], features=4))(torch.zeros(1, 1, 4, 4))
    for bad in (dict(num_classes=1), dict(widths=[]), dict(widths=[4, 0]), dict(depth=0), dict(dropout=1.0)):
        with pytest.raises(ConfigError):
            ClassifierConfig(**bad)
    with pytest.raises(ConfigError, match="unknown classifier config keys: colour"):
        ClassifierConfig.from_dict({"colour": 1})


def test_save_and_load_a_classifier_folder(tmp_path):
    model = Classifier(ClassifierConfig(in_channels=3, num_classes=4, **SMALL)).eval()
    model.save_pretrained(tmp_path / "clf")
    loaded = PretrainedMixin.from_pretrained(tmp_path / "clf")   # dispatched on model_type
    assert isinstance(loaded, Classifier) and loaded.config == model.config
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded(x), model(x))
