"""What the scoring and rejection tests share: a tiny stage 1 on the embedded sample, its codes,
a class-conditional and an unconditional prior, and a tiny classifier (seconds to build)."""

from __future__ import annotations

from pathlib import Path

from conftest import DATA, TINY

from vqkit.data.datasets import load_dataset
from vqkit.nn.classifier import ClassifierConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import extract_codes, load_codes
from vqkit.training.classifier import ClassifierTrainConfig, train_classifier
from vqkit.training.prior import PriorTrainConfig, prior_config_for, train_prior
from vqkit.training.stage1 import TrainConfig, train

# A classifier of a few thousand weights: 28x28 -> 14x14 -> 7x7, 16 features.
TINY_CLASSIFIER = ClassifierConfig(in_channels=1, num_classes=10, widths=[8, 16], depth=1, features=16, dropout=0.0)
CLASSIFIER_STEPS = 150


def build(root: Path) -> Path:
    """Write ``root/run`` (stage 1), ``root/codes``, ``root/prior`` (class-conditional),
    ``root/plain`` (no classes) and ``root/clf`` (the classifier); return ``root``."""
    train(root / "run", TINY, TrainConfig(data=DATA, steps=30, batch_size=16, lr=3e-3), progress=False,
          tensorboard=False)
    model, checkpoint = ckpt.load_model(root / "run")
    source = {"run": str((root / "run").resolve()), "fingerprint": checkpoint.state["fingerprint"],
              "data": DATA, "split": "train"}
    extract_codes(model, load_dataset(DATA, "train"), root / "codes", limit=300, progress=False, source=source)
    codes = load_codes(root / "codes")
    for name, conditional in (("prior", True), ("plain", False)):
        train_prior(root / name, prior_config_for(codes, "pixelcnn", conditional, channels=8, layers=1),
                    PriorTrainConfig(codes=str(root / "codes"), steps=20, batch_size=16, lr=3e-3),
                    progress=False, tensorboard=False)
    train_classifier(root / "clf", TINY_CLASSIFIER,
                     ClassifierTrainConfig(data=DATA, steps=CLASSIFIER_STEPS, batch_size=32, lr=5e-3),
                     progress=False, tensorboard=False)
    return root
