"""One run setup for every kind of training run (stage 1, priors): what happens between "train
this model into that folder" and the first step.

``start_run`` places the model (device, number format, memory layout), seeds it, builds Adam,
refuses a folder that already holds a run unless resuming, and on resume checks that the run
is continued as it was started: the same model configuration (so the weights fit), the same
seed and the same global batch (which, with the step, fix the data order of
``loop.batch_indices``); it then restores weights, optimizer and RNG state. Rank 0 writes
``config.json``; every process wraps the model for data-parallel training and, if asked,
compiles it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vqkit import distributed, precision
from vqkit.config import JsonConfig
from vqkit.errors import ConfigError
from vqkit.runs import checkpoint as ckpt
from vqkit.training.averaging import WeightAverage
from vqkit.training.loop import CLOCKS, SCHEDULES, TensorBoard, TrainingError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunConfig(precision.PlacementConfig):
    """What every training run is told, whatever it trains (keyword-only fields, as the
    placement's, so that configurations with required fields can inherit them; a subclass may
    redeclare a default). ``intervals`` names the fields that count steps between two events.

    Args:
        steps: train until this many steps in all (a resumed run continues up to it).
        batch_size: examples per step (per process, when data-parallel).
        lr: Adam's learning rate (its peak, under a schedule).
        schedule: the learning rate over the run: "constant"; "cosine", from lr down to 0 at
            the run's end (its steps or its time budget, whichever comes first; a resumed run
            with a time budget schedules that budget afresh); or "cooldown", constant and then
            down to 0 over the run's last 20%.
        seed: seeds the initialisation and, with the step, the data order.
        time_budget: stop after this many seconds (and save).
        clock: what time_budget counts: "wall" seconds, or "cpu", this process's CPU seconds
            (all its threads), which other jobs on a shared machine slow less: fair budgets for
            runs compared there.
        checkpoint_every: save a checkpoint every this many steps.
        log_every: log the training scalars every this many steps.
    """

    intervals: ClassVar[tuple[str, ...]] = ("checkpoint_every", "log_every")

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    schedule: str = "constant"
    seed: int = 0
    time_budget: float | None = None
    clock: str = "wall"
    checkpoint_every: int = 1000
    log_every: int = 50

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("steps must be >= 0, batch_size >= 1 and lr > 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.clock not in CLOCKS:
            raise ConfigError(f"clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ConfigError(f"time_budget must be positive seconds, got {self.time_budget}")
        small = [name for name in self.intervals if getattr(self, name) < 1]
        if small:
            got = ", ".join(f"{name}={getattr(self, name)}" for name in small)
            raise ConfigError(f"{', '.join(self.intervals)} must be >= 1; got {got}")


@dataclass
class Run:
    """A run ready to train.

    ``model`` is the placed module that the optimizer steps; ``forward`` is what the training
    step calls (``model.<method>`` wrapped for data-parallel training and compiled when asked);
    ``step`` is where training starts (0, or the checkpoint resumed from); ``average``, for a
    run that averages its weights, their running average, which checkpoints save as the run's
    weights (``result``).
    """

    folder: Path
    model: nn.Module
    forward: Callable
    optimizer: torch.optim.Optimizer
    step: int
    placement: precision.Placement
    board: TensorBoard
    average: WeightAverage | None = None

    @property
    def result(self) -> nn.Module:
        """The module whose weights are the run's: the average where there is one."""
        return self.model if self.average is None else self.average.module


def start_run(folder: str | Path, kind: str, model_config: JsonConfig, build: Callable[[], nn.Module],
              config, *, resume: bool = False, tensorboard: bool = True, data_field: str = "data",
              method: str = "forward", unused_parameters: bool = False, extra: dict | None = None,
              average_decay: float = 0.0) -> Run:
    """Set up the run of ``kind`` in ``folder`` for a model that ``build()`` makes from
    ``model_config``, trained as ``config`` says (a training configuration: ``seed``, ``lr``,
    ``batch_size``, ``compile`` and the placement fields; ``data_field`` names its data field,
    whose change on resume is only a warning).

    Args:
        folder: the run folder.
        kind: the run kind written into (and, on resume, expected in) config.json.
        model_config: the model's configuration, saved as ``config.json``'s ``model``.
        build: makes the freshly initialised model (called after seeding).
        config: the training configuration, saved as ``config.json``'s ``train``.
        resume: continue from the folder's latest checkpoint, if it has one.
        tensorboard: log to ``folder/tensorboard`` (rank 0 only).
        data_field: the field of ``config`` that names the training data.
        method: the model's method the training step calls (``"forward"``, or ``"nll"`` for priors).
        unused_parameters: the model may hold parameters outside the loss (tells DDP to look).
        extra: further top-level entries of config.json (e.g. a prior's ``source``).
        average_decay: > 0 averages the weights with this decay per step (``WeightAverage``).
    """
    folder = Path(folder)
    placement = config.placement()
    log.info("training on %s", placement.describe())
    torch.manual_seed(config.seed)
    model = precision.prepare_model(build(), placement)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    average = WeightAverage(model, average_decay) if average_decay else None
    step = 0
    where = folder / "config.json"
    if resume and (folder / "latest").exists():
        saved = ckpt.read_config(folder, kind=kind)
        if saved["model"] != model_config.to_dict():
            raise TrainingError(f"{where}: the run was trained with another model configuration; "
                                "resume with the same preset, config or settings")
        # Together with the step, the seed and the global batch fix the data order.
        if saved["train"].get("seed") != config.seed:
            raise TrainingError(f"{where}: the run used seed={saved['train'].get('seed')}; "
                                "resume with the same value")
        distributed.check_resume_batch(saved["train"], saved.get("processes"), config.batch_size, where)
        if saved["train"].get(data_field) != getattr(config, data_field):
            log.warning("resuming %s on %s (it was trained on %s)", folder, getattr(config, data_field),
                        saved["train"].get(data_field))
        resumed = ckpt.load_training_state(folder, model, optimizer,
                                           averaged=average.module if average is not None else None)
        step = resumed.step
        if average is not None and resumed.state.get("averaged"):
            average.resumed(step)
        distributed.check_same(step, f"the step of {folder / 'latest'}",
                               "; every process must see the same run folder")
        log.info("resuming %s from step %d", folder, step)
    elif (folder / "latest").exists():
        raise TrainingError(f"{folder} already holds a run; pass --resume to continue it "
                            "or choose another folder")
    if distributed.is_main():
        ckpt.write_run_config(folder, kind, model_config.to_dict(), config.to_dict(),
                              processes=distributed.world_size(), **(extra or {}))
    net = distributed.wrap(model, method, unused_parameters=unused_parameters)
    forward = torch.compile(net) if config.compile else net
    board = TensorBoard(folder / "tensorboard", tensorboard and distributed.is_main())
    return Run(folder=folder, model=model, forward=forward, optimizer=optimizer, step=step,
               placement=placement, board=board, average=average)
