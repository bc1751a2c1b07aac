"""Stage 2: fit an autoregressive prior to extracted code maps (VQ-VAE section 3.2;
VQ-VAE-2 Algorithm 2) and measure it on held-out codes.

The prior is trained by cross-entropy over the K codes. Its held-out NLL in bits per code is
reported beside log2 K, the cost of the uniform prior that stage 1 assumes; replacing the
uniform log K term of the ELBO by the prior's NLL gives the model's total bits/dim.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import JsonConfig
from .codes import CodeSet, load_codes
from .loop import StepOutput, TensorBoard, TrainingError, TrainResult, run_loop
from .prior import Prior, PriorConfig, build_prior
from .train import batch_indices

log = logging.getLogger("vqkit")


@dataclass
class PriorTrainConfig(JsonConfig):
    """How to train a prior; saved in the prior run's config.json."""

    codes: str
    val_codes: str | None = None
    val_fraction: float = 0.05
    steps: int = 5000
    batch_size: int = 32
    lr: float = 3e-4
    seed: int = 0
    time_budget: float | None = None
    checkpoint_every: int = 1000
    log_every: int = 50
    eval_every: int = 500

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclass
class PriorEvalResult:
    maps: int
    bits_per_code: float
    uniform_bits_per_code: float

    @property
    def saving(self) -> float:
        """Bits per code saved over the uniform prior."""
        return self.uniform_bits_per_code - self.bits_per_code

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "saving_bits_per_code": self.saving}

    def summary(self) -> str:
        return (f"{self.maps} held-out maps: {self.bits_per_code:.3f} bits per code against "
                f"{self.uniform_bits_per_code:.3f} for the uniform prior "
                f"({self.saving:.3f} bits saved, {100 * self.saving / self.uniform_bits_per_code:.1f}%)")


def split_indices(codes: CodeSet, config: PriorTrainConfig) -> tuple[torch.Tensor, CodeSet, torch.Tensor]:
    """Training indices into ``codes``, and the held-out set with its indices: a separate
    store when ``val_codes`` is given, else the last ``val_fraction`` of the maps."""
    n = len(codes)
    if config.val_codes:
        val = load_codes(config.val_codes)
        if val.codebook_size != codes.codebook_size or tuple(val.shape) != tuple(codes.shape):
            raise TrainingError(f"{config.val_codes}: held-out codes do not match {config.codes} "
                                "(codebook size or map shape differ)")
        return torch.arange(n), val, torch.arange(len(val))
    n_val = max(1, int(n * config.val_fraction))
    if n - n_val < 1:
        raise TrainingError(f"{config.codes}: {n} maps are too few to hold out {n_val} for validation")
    return torch.arange(n - n_val), codes, torch.arange(n - n_val, n)


def _labels_for(prior: Prior, labels: torch.Tensor) -> torch.Tensor | None:
    return labels if prior.config.num_classes else None


@torch.no_grad()
def evaluate_prior(prior: Prior, codes: CodeSet, indices: torch.Tensor | None = None,
                   batch_size: int = 128) -> PriorEvalResult:
    """Mean NLL of the maps ``indices`` of ``codes`` in bits per code."""
    was_training = prior.training
    prior.eval()
    indices = torch.arange(len(codes)) if indices is None else indices
    if len(indices) == 0:
        raise ValueError(f"{codes.path}: no code maps to evaluate")
    total = 0.0
    for start in range(0, len(indices), batch_size):
        batch, labels = codes.batch(indices[start:start + batch_size])
        total += float(prior.nll(batch, _labels_for(prior, labels)).sum())
    prior.train(was_training)
    return PriorEvalResult(maps=len(indices), bits_per_code=total / len(indices) / math.log(2),
                           uniform_bits_per_code=math.log2(codes.codebook_size))


def prior_config_for(codes: CodeSet, arch: str, conditional: bool, **sizes) -> PriorConfig:
    """A prior configuration that fits ``codes``: K, the map shape, and the classes."""
    if conditional and not codes.num_classes:
        raise TrainingError(f"{codes.path}: these codes carry no class labels; "
                            "a class-conditional prior needs a labelled dataset")
    h, w = codes.shape
    return PriorConfig(arch=arch, codebook_size=codes.codebook_size, height=h, width=w,
                       num_classes=codes.num_classes if conditional else None, **sizes)


def train_prior(run_dir: str | Path, prior_config: PriorConfig, config: PriorTrainConfig,
                resume: bool = False, progress: bool = True, tensorboard: bool = True) -> TrainResult:
    """Train (or with ``resume`` continue) the prior in ``run_dir`` up to ``config.steps``."""
    run_dir = Path(run_dir)
    codes = load_codes(config.codes)
    if (prior_config.codebook_size, prior_config.height, prior_config.width) != \
            (codes.codebook_size, *codes.shape):
        raise TrainingError(f"{config.codes}: codes are {codes.shape[0]}x{codes.shape[1]} with "
                            f"K={codes.codebook_size}, the prior expects {prior_config.height}x"
                            f"{prior_config.width} with K={prior_config.codebook_size}")
    train_idx, val_codes, val_idx = split_indices(codes, config)
    source = {**codes.manifest.get("source", {}), "codes": str(Path(config.codes).resolve()),
              "class_names": codes.manifest.get("class_names")}

    torch.manual_seed(config.seed)
    prior = build_prior(prior_config)
    optimizer = torch.optim.Adam(prior.parameters(), lr=config.lr)
    step = 0
    if resume and (run_dir / "latest").exists():
        saved = ckpt.read_config(run_dir, kind="prior")
        if saved["model"] != prior_config.to_dict():
            raise TrainingError(f"{run_dir / 'config.json'}: the prior was trained with another "
                                "configuration; resume with the same settings")
        step = ckpt.load_training_state(run_dir, prior, optimizer).step
    elif (run_dir / "latest").exists():
        raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it "
                            "or choose another folder")
    ckpt.write_run_config(run_dir, "prior", prior_config.to_dict(), config.to_dict(), source=source)

    board = TensorBoard(run_dir / "tensorboard", tensorboard)
    eval_idx = val_idx[:1024]

    def step_fn(step: int) -> StepOutput:
        picks = train_idx[batch_indices(step, len(train_idx), config.batch_size, config.seed)]
        batch, labels = codes.batch(picks)
        nll = prior.nll(batch, _labels_for(prior, labels)).mean()
        return StepOutput(nll, {"bits_per_code": nll / math.log(2)})

    def after_step(step: int, _: StepOutput) -> None:
        if step % config.eval_every == 0 or step == config.steps:
            result = evaluate_prior(prior, val_codes, eval_idx)
            board.scalars({"val/bits_per_code": result.bits_per_code}, step)

    return run_loop(run_dir, prior, optimizer, step, steps=config.steps, time_budget=config.time_budget,
                    checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                    step_fn=step_fn, after_step=after_step, board=board, progress=progress,
                    desc="train-prior")


def load_prior(run_dir: str | Path) -> tuple[Prior, dict]:
    """The latest prior of a prior run, in eval mode, and its config.json."""
    config = ckpt.read_config(run_dir, kind="prior")
    try:
        prior_config = PriorConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{Path(run_dir) / 'config.json'}: invalid prior configuration ({e})") from None
    prior = build_prior(prior_config)
    ckpt.load_latest_weights(run_dir, prior)
    return prior.eval(), config
