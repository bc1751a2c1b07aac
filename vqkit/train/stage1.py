"""Stage-1 training: fit encoder, codebook and decoder on images (eq. 3).

Determinism: the model is initialised from ``seed``; batch ``s`` is a slice of a permutation
seeded by ``(seed, epoch)``, so the data order is a function of the step alone; the global
RNG (k-means seeding, dead-code restarts) is saved with every checkpoint. Training N steps,
stopping and resuming for N more therefore gives the same weights as 2N steps straight.

Under ``torchrun`` the model trains data-parallel (``vqkit.distributed``): ``batch_size`` is
per process, batch ``s`` is the global batch of ``batch_size`` x processes images sharded
between them, and a run resumes with any split of the same global batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vqkit.runs import checkpoint as ckpt
from vqkit import distributed, precision
from vqkit.config import JsonConfig
from vqkit.data.datasets import ImageSet, from_model, in_memory, load_dataset, to_model
from vqkit.data.images import make_grid
from vqkit.train.loop import StepOutput, TensorBoard, TrainingError, TrainResult, run_loop
from vqkit.nn.vqvae2 import VQVAE2, VQVAE2Config, level_names
from vqkit.nn.vqvae import VQVAE, VQVAEConfig
from vqkit.nn.quantize import CodebookUsage, enable_sync

log = logging.getLogger("vqkit")


@dataclass
class TrainConfig(JsonConfig, precision.PlacementConfig):
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
        super().__post_init__()
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.image_every < 1:
            raise ValueError("checkpoint_every, log_every and image_every must be >= 1")


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """Indices of batch ``step``: epochs are fresh permutations; the last partial batch of
    an epoch is dropped, so every batch has ``min(batch_size, n)`` images.

    With ``world_size`` processes, batch ``step`` is the global batch of ``batch_size *
    world_size`` images and process ``rank`` takes its ``rank``-th slice of ``batch_size``."""
    global_size = batch_size * world_size
    per_epoch = max(n // global_size, 1)
    epoch, offset = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    start = offset * global_size + rank * batch_size
    return perm[start:start + batch_size]


def train(run_dir: str | Path, model_config: VQVAEConfig | VQVAE2Config, config: TrainConfig, resume: bool = False,
          dataset: ImageSet | None = None, progress: bool = True, tensorboard: bool = True) -> TrainResult:
    """Train (or with ``resume`` continue) the model in ``run_dir`` up to ``config.steps``;
    a ``VQVAE2Config`` trains a hierarchy, with per-level statistics in the logs."""
    run_dir = Path(run_dir)
    distributed.setup()
    if dataset is None:
        dataset = load_dataset(config.data, "train", image_size=config.image_size, skip_bad=config.skip_bad)
    dataset = in_memory(dataset, progress=progress and distributed.is_main())
    if dataset.channels != model_config.in_channels:
        raise TrainingError(f"{config.data}: images have {dataset.channels} channels but the model "
                            f"expects {model_config.in_channels}")
    model_config.latent_shapes(dataset.height, dataset.width)
    if len(dataset) < 1:
        raise TrainingError(f"{config.data}: the training set is empty")
    distributed.check_global_batch(len(dataset), config.batch_size, config.data)

    placement = config.placement()
    log.info("training on %s", placement.describe())
    torch.manual_seed(config.seed)
    model = precision.prepare_model(ckpt.build_model(model_config), placement)
    if distributed.active():
        enable_sync(model)  # every process's codebook follows the global batch
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = 0
    if resume and (run_dir / "latest").exists():
        saved = ckpt.read_config(run_dir)
        if saved["model"] != model_config.to_dict() or saved["kind"] != ckpt.config_kind(model_config):
            raise TrainingError(f"{run_dir / 'config.json'}: the run was trained with another model "
                                "configuration; resume with the same preset/config")
        # Together with the step, the seed and the global batch fix the data order.
        if saved["train"].get("seed") != config.seed:
            raise TrainingError(f"{run_dir / 'config.json'}: the run used seed="
                                f"{saved['train'].get('seed')}; resume with the same value")
        distributed.check_resume_batch(saved["train"], saved.get("processes"), config.batch_size,
                                       run_dir / "config.json")
        if saved["train"].get("data") != config.data:
            log.warning("resuming %s on %s (it was trained on %s)", run_dir, config.data,
                        saved["train"].get("data"))
        step = ckpt.load_training_state(run_dir, model, optimizer).step
        distributed.check_same(step, f"the step of {run_dir / 'latest'}",
                               "; every process must see the same run folder")
        log.info("resuming %s from step %d", run_dir, step)
    elif (run_dir / "latest").exists():
        raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it "
                            "or choose another folder")
    if distributed.is_main():
        ckpt.write_config(run_dir, model_config, config.to_dict(), processes=distributed.world_size())
    net = distributed.wrap(model)
    forward = torch.compile(net) if config.compile else net

    board = TensorBoard(run_dir / "tensorboard", tensorboard and distributed.is_main())
    fixed_images, _ = dataset.batch(torch.arange(min(8, len(dataset))))
    per_epoch = max(len(dataset) // (config.batch_size * distributed.world_size()), 1)
    names = level_names(model_config.num_levels)
    suffixes = [""] if len(names) == 1 else [f"_{name}" for name in names]
    epoch_usage = [CodebookUsage(k) for k in model_config.codebook_sizes]

    def step_fn(step: int) -> StepOutput:
        images, _ = dataset.batch(batch_indices(step, len(dataset), config.batch_size, config.seed,
                                                distributed.rank(), distributed.world_size()))
        with precision.autocast(placement):
            out = forward(precision.prepare_input(to_model(images), placement))
        stats = {"recon_loss": out.recon_loss, "commitment_loss": out.commitment_loss}
        for suffix, codes, ppl, usage, counter in zip(suffixes, _levels(out.codes), _levels(out.perplexity),
                                                      _levels(out.usage), epoch_usage):
            counter.update(codes)
            stats.update({f"perplexity{suffix}": ppl, f"usage{suffix}": usage})
        return StepOutput(out.loss, stats)

    def after_step(step: int, _: StepOutput) -> None:
        nonlocal epoch_usage
        if step % per_epoch == 0:
            for suffix, counter in zip(suffixes, epoch_usage):
                distributed.all_reduce_sum(counter.counts)
                board.scalars({f"train/epoch_codes_used{suffix}": counter.used,
                               f"train/epoch_perplexity{suffix}": counter.perplexity}, step)
            epoch_usage = [CodebookUsage(k) for k in model_config.codebook_sizes]
        if step % config.image_every == 0 and board.enabled:
            board.image("reconstructions", _comparison_grid(model, fixed_images, placement), step)

    return run_loop(run_dir, model, optimizer, step, steps=config.steps, time_budget=config.time_budget,
                    checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                    step_fn=step_fn, after_step=after_step, board=board, progress=progress)


def _levels(value) -> list:
    """A per-level list (VQ-VAE-2 outputs) or a single value (VQ-VAE) as a list."""
    return value if isinstance(value, list) else [value]


@torch.no_grad()
def _comparison_grid(model: VQVAE | VQVAE2, images: torch.Tensor,
                     placement: precision.Placement) -> torch.Tensor:
    """Originals above their reconstructions, uint8 (C, H, W)."""
    was_training = model.training
    model.eval()
    x = precision.prepare_input(to_model(images), placement)
    recon = from_model(model.decode(model.encode(x)).cpu())
    model.train(was_training)
    return make_grid(torch.cat([images, recon]), nrow=len(images))
