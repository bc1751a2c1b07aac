"""Stage 2: fit an autoregressive prior to extracted code maps (VQ-VAE section 3.2;
VQ-VAE-2 Algorithm 2) and measure it on held-out codes.

The prior is trained by cross-entropy over the K codes. Its held-out NLL in bits per code is
reported beside log2 K, the cost of the uniform prior that stage 1 assumes; replacing the
uniform log K term of the ELBO by the prior's NLL gives the model's total bits/dim.

VQ-VAE-2 (Algorithm 2) fits one prior per level: the top prior as above, and each lower level's
prior conditioned on the code maps of the levels above it (``cond_codes``: code sets that
``vqkit extract`` wrote for the same images, given **top-first**, e.g. ``[CODES/top]`` for the
bottom prior of two levels, ``[CODES/top, CODES/middle]`` for that of three). Batch ``i`` of
the conditioning sets is taken at the same indices as the prior's own maps. A residual level's
stages are code maps of their own (``VQVAEConfig.code_maps``), each with a prior conditioned on
the maps above it, e.g. ``[CODES/codes.0]`` for stage 1 of a one-level residual model.

Under ``torchrun`` the prior trains data-parallel as stage 1 does (``vqkit.distributed``,
``train.batch_indices``): ``batch_size`` per process, the global batch sharded between them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from vqkit import distributed, precision
from vqkit.config import JsonConfig
from vqkit.data.datasets import load_dataset
from vqkit.errors import ConfigError, UsageError
from vqkit.prior import Prior, PriorConfig, build_prior
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import CodeSet, load_codes
from vqkit.runs.generate import stage1_of
from vqkit.training.evaluate import evaluate
from vqkit.training.loop import StepOutput, TrainingError, TrainResult, Validation, batch_indices, run_loop
from vqkit.training.setup import RunConfig, start_run

log = logging.getLogger(__name__)


@dataclass
class PriorTrainConfig(JsonConfig, RunConfig):
    """How to train a prior; saved in the prior run's config.json.

    The schedule and placement fields are those of every run (``RunConfig``), with a prior's
    defaults for steps, batch size and lr.

    Args:
        codes: the code set to fit (written by vqkit extract; for a VQ-VAE-2, one level's).
        val_codes: a held-out code set (default: the last val_fraction of codes).
        cond_codes: the code sets of the levels above codes that the prior is conditioned on,
            from the same extraction, top-first (the top prior takes none).
        val_cond_codes: the held-out code set of each cond_codes level, in the same order.
        val_fraction: the share of codes held out when no val_codes are given.
        eval_every: measure the held-out NLL every this many steps (the run keeps the best
            checkpoint by it as "best", which eval, sample and compress use by default).
        patience: stop after this many held-out measurements in a row without a new best
            (0: train on to the last step).
        average_decay: the decay per step of the running average of the weights that the run
            is measured and saved by (Polyak averaging, ``vqkit.training.averaging``; 0: the
            trained weights themselves).
        batch_size: code maps per step (per process, when data-parallel).
    """

    intervals: ClassVar[tuple[str, ...]] = (*RunConfig.intervals, "eval_every")

    codes: str
    val_codes: str | None = None
    cond_codes: list[str] = field(default_factory=list)
    val_cond_codes: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    eval_every: int = 250
    patience: int = 8
    average_decay: float = 0.999
    steps: int = field(default=5000, kw_only=True)
    # Measured side by side on full Fashion-MNIST codes (7x7, K = 256), 300 s each: batch 64 at
    # lr 1e-3 reached 3.966 held-out bits per code in 3,156 steps, batch 32 at 3e-4 4.249 in 5,344.
    batch_size: int = field(default=64, kw_only=True)
    lr: float = field(default=1e-3, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not isinstance(self.average_decay, (int, float)) or not 0 <= self.average_decay < 1:
            raise ConfigError(f"average_decay must lie in [0, 1), got {self.average_decay!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        self.cond_codes = [str(p) for p in self.cond_codes]
        self.val_cond_codes = [str(p) for p in self.val_cond_codes]
        # Held-out maps of a conditioned prior need held-out maps of the levels above, too.
        if self.val_codes and len(self.val_cond_codes) != len(self.cond_codes):
            raise ConfigError(f"{self.val_codes}: the prior is conditioned on {len(self.cond_codes)} "
                             f"code set(s) but {len(self.val_cond_codes)} held-out conditioning set(s) "
                             "were given; give one --val-cond per --cond, in the same order")
        if self.val_cond_codes and not self.val_codes:
            raise ConfigError("held-out conditioning codes (--val-cond) need held-out codes (--val-codes)")


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
    store when ``val_codes`` is given, else the last ``val_fraction`` of the images.

    In a set extracted with ``flip`` the training maps are both orientations of the training
    images and the held-out maps the held-out images as they are: no mirror of a held-out image
    is trained on, and the held-out NLL is that of real images."""
    n = codes.images
    if config.val_codes:
        val = load_codes(config.val_codes)
        if val.codebook_size != codes.codebook_size or tuple(val.shape) != tuple(codes.shape):
            raise TrainingError(f"{config.val_codes}: held-out codes do not match {config.codes} "
                                "(codebook size or map shape differ)")
        return torch.arange(len(codes)), val, torch.arange(val.images)
    n_val = max(1, int(n * config.val_fraction))
    if n - n_val < 1:
        raise TrainingError(f"{config.codes}: {n} maps are too few to hold out {n_val} for validation")
    return codes.with_flips(torch.arange(n - n_val)), codes, torch.arange(n - n_val, n)


def check_cond_sets(codes: CodeSet, cond: Sequence[CodeSet]) -> None:
    """Check that ``cond`` can condition a prior of ``codes``: levels above ``codes``' level,
    top-first, extracted from the same stage-1 model (fingerprint), data and split, with as many
    maps, so that map ``i`` of every set is the same image. Raises TrainingError naming the set."""
    source = codes.manifest.get("source") or {}
    above = -1
    for c in cond:
        s = c.manifest.get("source") or {}
        if not s.get("fingerprint") or s.get("fingerprint") != source.get("fingerprint"):
            raise TrainingError(
                f"{c.path}: extracted from another stage-1 model than {codes.path} (fingerprint "
                f"{str(s.get('fingerprint'))[:12]} vs {str(source.get('fingerprint'))[:12]}); "
                "extract all levels from the same run with one vqkit extract")
        if (s.get("data"), s.get("split")) != (source.get("data"), source.get("split")):
            raise TrainingError(f"{c.path}: extracted from {s.get('data')} ({s.get('split')}) but "
                                f"{codes.path} from {source.get('data')} ({source.get('split')})")
        if len(c) != len(codes) or c.images != codes.images:
            raise TrainingError(f"{c.path}: holds {len(c)} code maps of {c.images} images but {codes.path} "
                                f"holds {len(codes)} of {codes.images}; "
                                "conditioning maps must be of the same images, in the same order")
        level, target = s.get("level_index"), source.get("level_index")
        if level is None or target is None:
            raise TrainingError(f"{c.path if level is None else codes.path}: not one level of a VQ-VAE-2 "
                                "(its manifest names no source.level_index); condition on the code sets "
                                "vqkit extract writes for a VQ-VAE-2 run")
        if not above < level < target:
            raise TrainingError(
                f"{c.path}: level {s.get('level')!r} cannot condition level {source.get('level')!r} "
                "in this position: conditioning sets are levels above the prior's own, given top-first "
                "(e.g. --cond CODES/top --cond CODES/middle)")
        above = level


def load_cond(config: PriorTrainConfig, codes: CodeSet, val: CodeSet) -> tuple[list[CodeSet], list[CodeSet]]:
    """The checked conditioning sets of the training maps ``codes`` and of the held-out maps
    ``val`` (the same sets unless ``val_codes`` is a separate store)."""
    cond = [load_codes(path) for path in config.cond_codes]
    check_cond_sets(codes, cond)
    if not config.val_codes:
        return cond, cond
    val_cond = [load_codes(path) for path in config.val_cond_codes]
    check_cond_sets(val, val_cond)
    for c, v in zip(cond, val_cond):
        if (v.codebook_size, v.shape) != (c.codebook_size, c.shape):
            raise TrainingError(f"{v.path}: held-out conditioning codes do not match {c.path} "
                                "(codebook size or map shape differ)")
    return cond, val_cond


def _cond_batch(cond: Sequence[CodeSet], indices: torch.Tensor,
                device: torch.device | str = "cpu") -> list[torch.Tensor]:
    return [c.batch(indices)[0].to(device) for c in cond]


def _labels_for(prior: Prior, labels: torch.Tensor) -> torch.Tensor | None:
    return labels if prior.config.num_classes else None


@torch.no_grad()
def evaluate_prior(prior: Prior, codes: CodeSet, indices: torch.Tensor | None = None,
                   batch_size: int = 128, cond: Sequence[CodeSet] = ()) -> PriorEvalResult:
    """Mean NLL of the maps ``indices`` of ``codes`` in bits per code, given the same maps of
    the conditioning sets ``cond`` (top-first) when the prior takes them."""
    if len(cond) != len(prior.config.cond_codes):
        raise UsageError(f"{codes.path}: the prior is conditioned on {len(prior.config.cond_codes)} "
                         f"code map(s) of the levels above, but {len(cond)} conditioning code set(s) "
                         "were given (--cond, top-first)")
    indices = torch.arange(len(codes)) if indices is None else indices
    if len(indices) == 0:
        raise UsageError(f"{codes.path}: no code maps to evaluate")
    was_training = prior.training
    prior.eval()
    total = 0.0
    try:
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            batch, labels = codes.batch(idx)
            total += float(prior.nll(batch.to(prior.device), _labels_for(prior, labels.to(prior.device)),
                                     cond_codes=_cond_batch(cond, idx, prior.device)).sum())
    finally:
        prior.train(was_training)
    return PriorEvalResult(maps=len(indices), bits_per_code=total / len(indices) / math.log(2),
                           uniform_bits_per_code=math.log2(codes.codebook_size))


# The prior's sizes that follow the number of maps it is fitted to (mirrors included), smallest
# set first: up to the first bound, the first sizes, and so on. Measured with
# benchmarks/bench_prior_fit.py on the demo's 7x7 Fashion-MNIST codes (K = 128, class-conditional
# PixelSNAIL, batch 64, lr 1e-3; README, "prior sizes by the number of maps"), best held-out bits
# per code: 3,000 maps: 32 channels x 4 layers with dropout 0.5 3.360, 0.25 3.383; 64 x 6 with
# 0.5 3.412, 64 x 4 without dropout 3.579. 10,000 maps: 64 x 6 with 0.25 3.399, without 3.529.
# 60,000 maps: 64 x 6 without dropout 3.185, with 0.25 3.27 after the same 3,000 steps.
SIZED_BY_MAPS = ("channels", "layers", "dropout")
_SIZES_BY_MAPS: tuple[tuple[int | None, dict], ...] = (
    (5_000, {"channels": 32, "layers": 4, "dropout": 0.5}),
    (30_000, {"channels": 64, "layers": 6, "dropout": 0.25}),
    (None, {"channels": 64, "layers": 6, "dropout": 0.0}),
)


def prior_sizes(maps: int) -> dict:
    """The sizes (``SIZED_BY_MAPS``) of a prior for a code set of ``maps`` maps."""
    return next(dict(sizes) for bound, sizes in _SIZES_BY_MAPS if bound is None or maps <= bound)


def prior_config_for(codes: CodeSet, arch: str, conditional: bool, cond: Sequence[CodeSet] = (),
                     **sizes) -> PriorConfig:
    """A prior configuration that fits ``codes``: K, the map shape, the classes, the
    conditioning maps of the sets ``cond`` (top-first), and the sizes that ``prior_sizes`` gives
    for its number of maps unless ``sizes`` sets them."""
    if conditional and not codes.num_classes:
        raise TrainingError(f"{codes.path}: these codes carry no class labels; "
                            "a class-conditional prior needs a labelled dataset")
    h, w = codes.shape
    return PriorConfig(arch=arch, codebook_size=codes.codebook_size, height=h, width=w,
                       num_classes=codes.num_classes if conditional else None,
                       cond_codes=[[c.codebook_size, *c.shape] for c in cond],
                       **{**prior_sizes(len(codes)), **sizes})


def train_prior(run_dir: str | Path, prior_config: PriorConfig, config: PriorTrainConfig,
                resume: bool = False, progress: bool = True, tensorboard: bool = True) -> TrainResult:
    """Train (or with ``resume`` continue) the prior in ``run_dir`` up to ``config.steps``."""
    run_dir = Path(run_dir)
    distributed.setup()
    codes = load_codes(config.codes)
    if (prior_config.codebook_size, prior_config.height, prior_config.width) != \
            (codes.codebook_size, *codes.shape):
        raise TrainingError(f"{config.codes}: codes are {codes.shape[0]}x{codes.shape[1]} with "
                            f"K={codes.codebook_size}, the prior expects {prior_config.height}x"
                            f"{prior_config.width} with K={prior_config.codebook_size}")
    train_idx, val_codes, val_idx = split_indices(codes, config)
    distributed.check_global_batch(len(train_idx), config.batch_size, config.codes)
    cond, val_cond = load_cond(config, codes, val_codes)
    given = [[c.codebook_size, *c.shape] for c in cond]
    if prior_config.cond_codes != given:
        raise TrainingError(f"{config.codes}: the prior is conditioned on code maps [K, h, w] "
                            f"{prior_config.cond_codes}, but the conditioning sets given (--cond: "
                            f"{', '.join(config.cond_codes) or 'none'}) hold {given}; pass the sets of "
                            "the levels it is conditioned on, top-first")
    # The levels the prior is conditioned on, so that a sampler can feed it the right maps.
    source = {**codes.manifest.get("source", {}), "codes": str(Path(config.codes).resolve()),
              "class_names": codes.manifest.get("class_names"),
              "cond_codes": [str(c.path.resolve()) for c in cond],
              "cond_levels": [c.manifest["source"]["level"] for c in cond],
              "cond_level_indices": [c.manifest["source"]["level_index"] for c in cond]}

    run = start_run(run_dir, "prior", prior_config, lambda: build_prior(prior_config), config, resume=resume,
                    tensorboard=tensorboard, data_field="codes", method="nll", unused_parameters=True,
                    extra={"source": source}, average_decay=config.average_decay)
    prior, forward, placement, board = run.model, run.forward, run.placement, run.board
    eval_idx = val_idx[:1024]

    def step_fn(step: int, _progress: float) -> StepOutput:
        picks = train_idx[batch_indices(step, len(train_idx), config.batch_size, config.seed,
                                        distributed.rank(), distributed.world_size())]
        batch, labels = codes.batch(picks)
        with precision.autocast(placement):
            nll = forward(batch.to(placement.device), _labels_for(prior, labels.to(placement.device)),
                          cond_codes=_cond_batch(cond, picks, placement.device)).mean()
        return StepOutput(nll, {"bits_per_code": nll / math.log(2)})

    validation = Validation(
        "bits_per_code", lambda: evaluate_prior(run.result, val_codes, eval_idx, cond=val_cond).bits_per_code,
        every=config.eval_every, patience=config.patience)
    return run_loop(run_dir, prior, run.optimizer, run.step, steps=config.steps, time_budget=config.time_budget,
                    clock=config.clock, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                    step_fn=step_fn, board=board, progress=progress, validation=validation,
                    desc="train-prior", average=run.average, lr=config.lr, schedule=config.schedule)


def evaluate_prior_run(run: str | Path, *, data: str | None = None, split: str = "test",
                       codes: str | Path | None = None, cond: Sequence[str | Path] = (),
                       limit: int | None = None, batch_size: int = 256, progress: bool = False,
                       which: str = ckpt.BEST, device: str | torch.device = "cpu") -> dict:
    """What ``vqkit eval PRIOR_RUN`` reports: the prior's held-out NLL in bits per code, and the
    stage-1 model's bits/dim on ``data`` (default: its training data), ``split``, with the
    prior's NLL in place of the uniform log K term of its own level.

    The held-out maps are ``codes`` (a code set, with the sets ``cond`` of the levels the prior
    is conditioned on, top-first) or else those the prior held out in training; ``limit`` caps
    both the maps and the images; ``which`` picks the prior's checkpoint (``best`` or ``latest``);
    both models run on ``device``. Returns a JSON-ready record (also kept as ``RUN/eval.json`` by
    the command line).
    """
    prior, config, checkpoint = ckpt.load_prior_checkpoint(run, which, device)
    train_config = PriorTrainConfig(**config["train"])
    if codes is not None:
        val = load_codes(codes)
        val_idx = torch.arange(val.images)
        val_cond = [load_codes(path) for path in cond]
        check_cond_sets(val, val_cond)
    else:
        train_codes = load_codes(train_config.codes)
        _, val, val_idx = split_indices(train_codes, train_config)
        _, val_cond = load_cond(train_config, train_codes, val)
    if limit is not None:
        val_idx = val_idx[:limit]
    result = evaluate_prior(prior, val, val_idx, cond=val_cond)
    model = stage1_of(config, Path(run), device)
    stage1_run = Path(config["source"]["run"])
    stage1_train = ckpt.read_config(stage1_run)["train"]
    dataset = load_dataset(data or stage1_train["data"], split, image_size=stage1_train.get("image_size"))
    stage1 = evaluate(model, dataset, batch_size=batch_size, limit=limit, progress=progress)
    latents = prior.config.height * prior.config.width
    subpixels = dataset.channels * dataset.height * dataset.width
    # The prior replaces the uniform log2 K bits of its own level's latents only (a VQ-VAE-2's
    # other levels keep theirs).
    total = stage1.bits_per_dim - latents * result.saving / subpixels
    return {"data": dataset.spec, "split": split, "level": config["source"].get("level"),
            "checkpoint": checkpoint.path.name, **result.to_dict(),
            "stage1": stage1.to_dict(), "bits_per_dim_with_prior": total}
