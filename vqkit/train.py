"""Stage-1 training: fit encoder, codebook and decoder on images (eq. 3).

Determinism: the model is initialised from ``seed``; batch ``s`` is a slice of a permutation
seeded by ``(seed, epoch)``, so the data order is a function of the step alone; the global
RNG (k-means seeding, dead-code restarts) is saved with every checkpoint. Training N steps,
stopping and resuming for N more therefore gives the same weights as 2N steps straight.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .data import ImageSet, from_model, load_dataset, to_model
from .images import make_grid
from .model import VQVAE, VQVAEConfig
from .quantize import CodebookUsage

log = logging.getLogger("vqkit")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a mismatched resume)."""


@dataclass
class TrainConfig:
    """How to train; saved in the run's config.json beside the model configuration."""

    data: str
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    seed: int = 0
    time_budget: float | None = None
    checkpoint_every: int = 1000
    log_every: int = 50
    image_every: int = 1000
    image_size: int | None = None
    skip_bad: bool = False

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.image_every < 1:
            raise ValueError("checkpoint_every, log_every and image_every must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    step: int
    seconds: float
    stopped_by_time: bool
    last_loss: float


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of batch ``step``: epochs are fresh permutations; the last partial batch of
    an epoch is dropped so every batch has ``batch_size`` images."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[offset * batch_size:(offset + 1) * batch_size]


class _TensorBoard:
    """TensorBoard scalars and image grids, created lazily so tests can skip the import."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled, self.writer = folder, enabled, None

    def _get(self):
        if self.writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.folder))
        return self.writer

    def scalars(self, values: dict, step: int) -> None:
        if (w := self._get()) is not None:
            for k, v in values.items():
                w.add_scalar(k, v, step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if (w := self._get()) is not None:
            w.add_image(tag, grid, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(run_dir: str | Path, model_config: VQVAEConfig, config: TrainConfig, resume: bool = False,
          dataset: ImageSet | None = None, progress: bool = True, tensorboard: bool = True) -> TrainResult:
    """Train (or with ``resume`` continue) the model in ``run_dir`` up to ``config.steps``."""
    run_dir = Path(run_dir)
    if dataset is None:
        dataset = load_dataset(config.data, "train", image_size=config.image_size, skip_bad=config.skip_bad)
    if dataset.channels != model_config.in_channels:
        raise TrainingError(f"{config.data}: images have {dataset.channels} channels but the model "
                            f"expects {model_config.in_channels}")
    model_config.latent_shape(dataset.height, dataset.width)
    if len(dataset) < 1:
        raise TrainingError(f"{config.data}: the training set is empty")

    torch.manual_seed(config.seed)
    model = VQVAE(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = 0
    if resume and (run_dir / "latest").exists():
        saved = ckpt.read_config(run_dir)
        if saved["model"] != model_config.to_dict():
            raise TrainingError(f"{run_dir / 'config.json'}: the run was trained with another model "
                                "configuration; resume with the same preset/config")
        for key in ("seed", "batch_size"):  # together with the step they fix the data order
            if saved["train"].get(key) != getattr(config, key):
                raise TrainingError(f"{run_dir / 'config.json'}: the run used {key}="
                                    f"{saved['train'].get(key)}; resume with the same value")
        if saved["train"].get("data") != config.data:
            log.warning("resuming %s on %s (it was trained on %s)", run_dir, config.data,
                        saved["train"].get("data"))
        step = ckpt.load_training_state(run_dir, model, optimizer).step
        ckpt.write_config(run_dir, model_config, config.to_dict())
        log.info("resuming %s from step %d", run_dir, step)
    else:
        if (run_dir / "latest").exists():
            raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it "
                                "or choose another folder")
        ckpt.write_config(run_dir, model_config, config.to_dict())

    board = _TensorBoard(run_dir / "tensorboard", tensorboard)
    fixed_images, _ = dataset.batch(torch.arange(min(8, len(dataset))))
    per_epoch = max(len(dataset) // config.batch_size, 1)
    epoch_usage = CodebookUsage(model_config.codebook_size)
    start_time = time.monotonic()
    stopped_by_time = False
    last_saved = step
    loss_value = math.nan
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    try:
        while step < config.steps:
            if config.time_budget is not None and time.monotonic() - start_time > config.time_budget:
                stopped_by_time = True
                break
            images, _ = dataset.batch(batch_indices(step, len(dataset), config.batch_size, config.seed))
            out = model(to_model(images))
            loss_value = float(out.loss.detach())
            if not math.isfinite(loss_value):
                kept = (f"the last good checkpoint (step {last_saved}) is kept in {run_dir}"
                        if (run_dir / "latest").exists() else f"no checkpoint was saved in {run_dir} yet")
                raise TrainingError(f"loss became {loss_value} at step {step}; stopped without saving, "
                                    f"{kept}")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            step += 1
            epoch_usage.update(out.codes)
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                stats = {"loss": loss_value, "recon_loss": float(out.recon_loss.detach()),
                         "commitment_loss": float(out.commitment_loss.detach()),
                         "perplexity": float(out.perplexity), "usage": float(out.usage)}
                bar.set_postfix(loss=f"{loss_value:.4f}", ppl=f"{stats['perplexity']:.0f}")
                board.scalars({f"train/{k}": v for k, v in stats.items()}, step)
            if step % per_epoch == 0:
                board.scalars({"train/epoch_codes_used": epoch_usage.used,
                               "train/epoch_perplexity": epoch_usage.perplexity}, step)
                epoch_usage = CodebookUsage(model_config.codebook_size)
            if step % config.image_every == 0:
                board.image("reconstructions", _comparison_grid(model, fixed_images), step)
            if step % config.checkpoint_every == 0:
                ckpt.save_checkpoint(run_dir, model, optimizer, step, {"loss": loss_value})
                last_saved = step
    finally:
        bar.close()
        board.close()
    if step != last_saved or not (run_dir / "latest").exists():
        ckpt.save_checkpoint(run_dir, model, optimizer, step, {"loss": loss_value})
    return TrainResult(step=step, seconds=time.monotonic() - start_time,
                       stopped_by_time=stopped_by_time, last_loss=loss_value)


@torch.no_grad()
def _comparison_grid(model: VQVAE, images: torch.Tensor) -> torch.Tensor:
    """Originals above their reconstructions, uint8 (C, H, W)."""
    was_training = model.training
    model.eval()
    x = to_model(images)
    recon = from_model(model.decode(model.encode(x)))
    model.train(was_training)
    return make_grid(torch.cat([images, recon]), nrow=len(images))
