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

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from vqkit import distributed, precision
from vqkit.config import JsonConfig
from vqkit.data.datasets import ImageSet, from_model, in_memory, load_dataset, to_model
from vqkit.data.images import make_grid
from vqkit.data.loader import ReadConfig, StepBatches
from vqkit.errors import ConfigError
from vqkit.nn.quantize import CodebookUsage, enable_sync
from vqkit.nn.vae import GaussianVAE, VAEConfig
from vqkit.nn.vqvae import VQVAE, StageOneConfig, build_model, level_names
from vqkit.training.loop import StepOutput, TrainingError, TrainResult, run_loop, step_indices
from vqkit.training.setup import RunConfig, start_run

log = logging.getLogger(__name__)

# The weight of the proper prefixes' reconstruction losses at the end of a prefix cooldown
# (``TrainConfig.prefix_cooldown``): not 0, so that the prefix decoders keep following the
# encoders as they move (Adam's step hardly depends on the scale of a loss, so a tenth of it
# still trains those decoders while the shared encoders now serve mostly the full model). Measured
# against 0 on the faces at 600 CPU s: 0 lost 0.40 dB on all levels and left 7% of the top
# codebook unused (README, "the faces' recipe").
PREFIX_FLOOR = 0.1

# The prefix cooldown of a run that trains its prefixes and sets none: measured against none
# and 0.5 at equal CPU budget (+0.72 dB on the faces' full model over three seeds, +0.38 dB on
# CIFAR-10's over two, each prefix ahead too; README, "Every prefix decodes").
PREFIX_COOLDOWN = 0.3


def prefix_weight(progress: float, cooldown: float) -> float:
    """The weight of the proper prefixes' losses at ``progress`` (the share of the run done)
    under a cooldown over the run's last ``cooldown`` share: 1, then linearly down to
    ``PREFIX_FLOOR`` at the run's end (1 throughout when ``cooldown`` is 0)."""
    if cooldown <= 0.0:
        return 1.0
    into = (min(max(progress, 0.0), 1.0) - (1.0 - cooldown)) / cooldown
    return 1.0 if into <= 0.0 else 1.0 - (1.0 - PREFIX_FLOOR) * into


@dataclass
class TrainConfig(JsonConfig, ReadConfig, RunConfig):
    """How to train a stage-1 model; saved in the run's config.json beside the model configuration.

    The schedule and placement fields are those of every run (``RunConfig``), the reading
    settings those of every command that reads images (``ReadConfig``).

    Args:
        data: the training images, as KIND:DIR (mnist, fashion-mnist, cifar10, folder).
        batch_size: images per step (per process, when data-parallel).
        image_every: log a reconstruction grid every this many steps.
        image_size: centre-crop and resize folder images to this side.
        skip_bad: skip unreadable image files (counted in the log).
        prefix_cooldown: for a hierarchy that trains its prefixes (``prefix_training``), the
            share of the run at its end over which the weight of the proper prefixes' losses
            goes linearly from 1 down to 0.1, so that the shared encoders finish serving the
            full model; 0 keeps full weight throughout. Unset, 0.3 for such a model and 0 for
            any other (config.json records the value used).
    """

    intervals: ClassVar[tuple[str, ...]] = (*RunConfig.intervals, "image_every")

    data: str
    image_every: int = 1000
    image_size: int | None = None
    skip_bad: bool = False
    prefix_cooldown: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.prefix_cooldown is not None and not 0.0 <= self.prefix_cooldown <= 1.0:
            raise ConfigError(f"prefix_cooldown must be a share of the run from 0 to 1, got {self.prefix_cooldown}")


def train(run_dir: str | Path, model_config: StageOneConfig | VAEConfig, config: TrainConfig, resume: bool = False,
          dataset: ImageSet | None = None, progress: bool = True, tensorboard: bool = True) -> TrainResult:
    """Train (or with ``resume`` continue) the model in ``run_dir`` up to ``config.steps``;
    a ``VQVAE2Config`` trains a hierarchy, with per-level statistics in the logs, a
    ``VAEConfig`` a Gaussian VAE, with its KL per latent in the logs."""
    run_dir = Path(run_dir)
    per_prefix = getattr(model_config, "prefix_training", "off") != "off"
    if config.prefix_cooldown is None:
        config = dataclasses.replace(config, prefix_cooldown=PREFIX_COOLDOWN if per_prefix else 0.0)
    elif config.prefix_cooldown and not per_prefix:
        raise ConfigError(f"prefix_cooldown={config.prefix_cooldown} needs a hierarchy that trains its prefixes "
                          "(prefix_training 'decoders' or 'loss'); this model does not")
    distributed.setup()
    if dataset is None:
        dataset = load_dataset(config.data, "train", image_size=config.image_size, skip_bad=config.skip_bad)
    dataset = in_memory(dataset, config.in_memory_bytes, config.workers,
                        progress=progress and distributed.is_main())
    if dataset.channels != model_config.in_channels:
        raise TrainingError(f"{config.data}: images have {dataset.channels} channels but the model "
                            f"expects {model_config.in_channels}")
    model_config.latent_shapes(dataset.height, dataset.width)
    if len(dataset) < 1:
        raise TrainingError(f"{config.data}: the training set is empty")
    distributed.check_global_batch(len(dataset), config.batch_size, config.data)

    run = start_run(run_dir, model_config.kind, model_config, lambda: _build(model_config), config,
                    resume=resume, tensorboard=tensorboard,
                    extra={"image_shape": [dataset.channels, dataset.height, dataset.width]})
    model, forward, placement, board = run.model, run.forward, run.placement, run.board
    fixed_images, _ = dataset.batch(torch.arange(min(8, len(dataset))))
    per_epoch = max(len(dataset) // (config.batch_size * distributed.world_size()), 1)
    vae = isinstance(model_config, VAEConfig)
    names = level_names(model_config.num_levels)
    code_maps = [] if vae else model_config.code_maps()
    suffixes = [""] if len(code_maps) <= 1 else [f"_{m.name}" for m in code_maps]
    epoch_usage = [CodebookUsage(m.codebook_size) for m in code_maps]

    batches = StepBatches(dataset, step_indices(len(dataset), config.batch_size, config.seed), config.steps,
                          config.workers, placement.device)

    def step_fn(step: int, progress: float) -> StepOutput:
        images, _ = batches.get(step)
        x = precision.prepare_input(to_model(images), placement)
        weight = prefix_weight(progress, config.prefix_cooldown)
        with precision.autocast(placement):
            out = forward(x, prefix_weight=weight) if per_prefix else forward(x)
        if vae:  # the KL per latent over training is what shows a posterior collapsing
            return StepOutput(out.loss, {"recon_loss": out.recon_loss, "kl_per_latent": out.kl_per_latent})
        stats = {"recon_loss": out.recon_loss, "commitment_loss": out.commitment_loss}
        if per_prefix:
            stats.update({f"recon_loss_upto_{names[upto - 1]}": loss for upto, loss in out.prefix_losses.items()})
        if config.prefix_cooldown:
            stats["prefix_weight"] = torch.tensor(weight)
        for suffix, codes, ppl, usage, counter in zip(suffixes, out.codes, out.perplexity, out.usage,
                                                      epoch_usage):
            counter.update(codes)
            stats.update({f"perplexity{suffix}": ppl, f"usage{suffix}": usage})
        return StepOutput(out.loss, stats)

    def after_step(step: int, _: StepOutput) -> None:
        nonlocal epoch_usage
        if step % per_epoch == 0 and not vae:
            for suffix, counter in zip(suffixes, epoch_usage):
                distributed.all_reduce_sum(counter.counts)
                board.scalars({f"train/epoch_codes_used{suffix}": counter.used,
                               f"train/epoch_perplexity{suffix}": counter.perplexity}, step)
            epoch_usage = [CodebookUsage(m.codebook_size) for m in code_maps]
        if step % config.image_every == 0 and board.enabled:
            board.image("reconstructions", _comparison_grid(model, fixed_images, placement), step)

    with batches:
        return run_loop(run_dir, model, run.optimizer, run.step, steps=config.steps,
                        time_budget=config.time_budget, clock=config.clock, checkpoint_every=config.checkpoint_every,
                        log_every=config.log_every, step_fn=step_fn, after_step=after_step, board=board,
                        progress=progress, lr=config.lr, schedule=config.schedule)


def _build(model_config: StageOneConfig | VAEConfig) -> VQVAE | GaussianVAE:
    model = build_model(model_config)
    if distributed.active():
        enable_sync(model)  # every process's codebooks follow the global batch
    return model


@torch.no_grad()
def _comparison_grid(model: VQVAE, images: torch.Tensor,
                     placement: precision.Placement) -> torch.Tensor:
    """Originals above their reconstructions, uint8 (C, H, W)."""
    was_training = model.training
    model.eval()
    x = precision.prepare_input(to_model(images), placement)
    recon = from_model(model.decode(model.encode(x)).cpu())
    model.train(was_training)
    return make_grid(torch.cat([images, recon]), nrow=len(images))
