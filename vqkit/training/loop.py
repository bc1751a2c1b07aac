"""The training loop shared by stage 1 (``train``) and the priors (``train_prior``).

It owns what every run needs and nothing model-specific: the step counter, the time budget,
the learning-rate schedule, the non-finite-loss stop, atomic checkpoints, the progress bar and
TensorBoard scalars; and, for a run that measures itself on held-out data (``Validation``),
the history of that measure (``validation.json``), the best checkpoint (``best``) and early
stopping.

In data-parallel training (``vqkit.distributed``) every process runs the loop; the loss it
checks and logs is the mean over the processes (so all stop together on a non-finite loss),
and rank 0 alone shows progress and writes checkpoints.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from vqkit import distributed
from vqkit.errors import VqkitError
from vqkit.runs import checkpoint as ckpt
from vqkit.training.averaging import WeightAverage

# The seconds a time budget can count (``RunConfig.clock``): wall time, or this process's CPU
# seconds (all its threads), which other jobs on a shared machine slow less.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.monotonic, "cpu": time.process_time}

# The learning rate over a run (``RunConfig.schedule``): constant; a cosine from lr down to 0
# at the run's end (whichever of its steps and its time budget comes first); or constant with
# a cooldown to 0 over the run's last COOLDOWN_SHARE, shaped 1 - sqrt (warmup-stable-decay, as
# Hägele et al. 2024, who found a 20% cooldown of that shape to match or beat a cosine).
SCHEDULES = ("constant", "cosine", "cooldown")
COOLDOWN_SHARE = 0.2


def lr_factor(schedule: str, progress: float) -> float:
    """The multiple of the base learning rate that ``schedule`` gives at ``progress`` (the
    share of the run done: 0 at its start, 1 at its end; clamped to [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cooldown":
        into = (progress - (1.0 - COOLDOWN_SHARE)) / COOLDOWN_SHARE
        return 1.0 if into <= 0.0 else 1.0 - math.sqrt(into)
    raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def run_progress(step: int, steps: int, elapsed: float, time_budget: float | None) -> float:
    """The share of a run done after ``step`` of ``steps`` and ``elapsed`` of ``time_budget``
    seconds: the larger of the two, since the run ends at whichever comes first."""
    done = step / max(steps, 1)
    return done if time_budget is None else max(done, elapsed / time_budget)


class TrainingError(VqkitError, RuntimeError):
    """Training cannot go on (a non-finite loss, a mismatched resume, unusable data)."""


@dataclass
class StepOutput:
    """What one training step computed: the loss to minimise and scalars to log."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """How a run ended: at ``step`` after ``seconds``; ``stopped_by_time`` (the budget) or
    ``stopped_early`` (no held-out improvement for ``patience`` evaluations); ``best_step`` and
    ``best_value`` of the held-out measure, when the run has one."""

    step: int
    seconds: float
    stopped_by_time: bool
    last_loss: float
    stopped_early: bool = False
    best_step: int | None = None
    best_value: float | None = None


@dataclass
class Validation:
    """A held-out measure of the model, lower is better (a prior's NLL in bits per code).

    ``measure()`` runs every ``every`` steps and at the end of training, on every process (the
    value of rank 0 decides for all). Each value is appended to ``validation.json`` with its step;
    a new minimum is saved as a checkpoint and named in ``best``; after ``patience`` evaluations
    in a row without a new minimum (0: never) training stops.

    Args:
        name: the measure's name in validation.json, the progress bar and TensorBoard (``val/NAME``).
        measure: computes the measure of the model as it is now.
        every: steps between two measurements.
        patience: evaluations without improvement before training stops early (0: never).
    """

    name: str
    measure: Callable[[], float]
    every: int
    patience: int = 0


class _Tracker:
    """The held-out history of a run, resumed from its validation.json up to the resumed step."""

    def __init__(self, run_dir: Path, validation: Validation, step: int):
        self.run_dir, self.validation = run_dir, validation
        saved = ckpt.read_validation(run_dir) if step > 0 else None
        self.history = [(s, v) for s, v in (saved or {}).get("history", []) if s <= step]

    @property
    def best(self) -> tuple[int, float] | None:
        return min(self.history, key=lambda h: h[1]) if self.history else None

    @property
    def since_best(self) -> int:
        """Evaluations after the best one."""
        best = self.best
        return 0 if best is None else sum(1 for s, _ in self.history if s > best[0])

    def record(self, step: int) -> tuple[float, bool]:
        """Measure at ``step``; returns the value and whether it is a new best."""
        value = float(distributed.broadcast(torch.tensor([self.validation.measure()], dtype=torch.float64))[0])
        improved = self.best is None or value < self.best[1]
        self.history.append((step, value))
        if distributed.is_main():
            ckpt.write_validation(self.run_dir, self.validation.name, self.history)
        return value, improved

    @property
    def exhausted(self) -> bool:
        return 0 < self.validation.patience <= self.since_best


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


def step_indices(n: int, batch_size: int, seed: int) -> functools.partial:
    """Step -> this process's ``batch_indices`` of that step's batch, as a picklable callable
    for the data workers (``vqkit.data.loader.StepBatches``)."""
    return functools.partial(batch_indices, n=n, batch_size=batch_size, seed=seed,
                             rank=distributed.rank(), world_size=distributed.world_size())


class TensorBoard:
    """TensorBoard scalars and image grids, created lazily so that runs without it never
    import it."""

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


def run_loop(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, *,
             steps: int, time_budget: float | None, checkpoint_every: int, log_every: int,
             step_fn: Callable[[int, float], StepOutput], board: TensorBoard, progress: bool = True,
             after_step: Callable[[int, StepOutput], None] | None = None,
             validation: Validation | None = None, desc: str = "train", clock: str = "wall",
             average: WeightAverage | None = None, lr: float | None = None,
             schedule: str = "constant") -> TrainResult:
    """Run ``step_fn(step, progress)`` from ``step`` up to ``steps`` (or until ``time_budget``
    seconds), where ``progress`` is the share of the run done (``run_progress``), with a
    checkpoint every ``checkpoint_every`` steps and at the end. ``after_step`` runs on every
    process (it may all-reduce); ``board`` should be enabled on rank 0 only. With
    ``validation``, the model is measured on held-out data as it says, the best checkpoint is
    kept as ``best`` and training stops early when it stops improving. ``clock`` (one of
    ``CLOCKS``) is what ``time_budget`` counts. With ``average`` (of ``model``'s weights), the
    average is updated after every step and checkpoints save it as the run's weights, beside
    the trained ones (the validation's ``measure`` should measure ``average.module``).
    ``schedule`` (one of ``SCHEDULES``) sets every parameter group's rate from ``lr`` before
    each step; the run's end is its ``steps`` or its ``time_budget``, so a resumed run with a
    budget schedules its new budget afresh (a warm restart)."""
    if schedule != "constant" and lr is None:
        raise ValueError(f"the {schedule} schedule needs the base lr")
    budget_clock = CLOCKS[clock]
    start_time = budget_clock()
    stopped_by_time = stopped_early = False
    last_saved = step
    loss_value = math.nan
    model.train()
    main = distributed.is_main()
    tracker = _Tracker(run_dir, validation, step) if validation is not None else None
    bar = tqdm(total=steps, initial=step, desc=desc, disable=not (progress and main), dynamic_ncols=True)
    start_step = step
    postfix: dict[str, str] = {}
    saved, trained = (model, None) if average is None else (average.module, model)

    def save(best: bool = False) -> None:
        ckpt.save_checkpoint(run_dir, saved, optimizer, step, {"loss": loss_value}, best=best, trained=trained)

    def validate() -> None:
        nonlocal last_saved
        value, improved = tracker.record(step)
        model.train()  # whatever mode the measure left it in, training goes on in train mode
        postfix[f"val_{validation.name}"] = f"{value:.4g}"
        bar.set_postfix(postfix)
        board.scalars({f"val/{validation.name}": value}, step)
        if improved and main:
            if step == last_saved and (run_dir / ckpt.LATEST).exists():
                ckpt.mark_best(run_dir, step)
            else:
                save(best=True)
        if improved:
            last_saved = step

    try:
        while step < steps:
            elapsed = _elapsed(budget_clock, start_time, time_budget)
            if time_budget is not None and elapsed > time_budget:
                stopped_by_time = True
                break
            if tracker is not None and tracker.exhausted:
                stopped_early = True
                break
            progress_now = run_progress(step, steps, elapsed, time_budget)
            if schedule != "constant":
                rate = lr * lr_factor(schedule, progress_now)
                for group in optimizer.param_groups:
                    group["lr"] = rate
            out = step_fn(step, progress_now)
            loss_value = distributed.mean_over_ranks({"loss": float(out.loss.detach())})["loss"]
            if not math.isfinite(loss_value):
                kept = (f"the last good checkpoint (step {last_saved}) is kept in {run_dir}"
                        if (run_dir / "latest").exists() else f"no checkpoint was saved in {run_dir} yet")
                raise TrainingError(f"loss became {loss_value} at step {step}; stopped without saving, "
                                    f"{kept}")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            if average is not None:
                average.update()
            step += 1
            if time_budget is not None:
                _fit_bar_to_budget(bar, step, steps, start_step, budget_clock() - start_time, time_budget)
            bar.update(1)
            if after_step is not None:
                after_step(step, out)
            if step % log_every == 0 or step == steps:
                stats = {"loss": loss_value, **distributed.mean_over_ranks(
                    {k: float(v.detach()) for k, v in out.stats.items()})}
                postfix.update({k: f"{v:.4g}" for k, v in list(stats.items())[:3]})
                bar.set_postfix(postfix)
                board.scalars({f"train/{k}": v for k, v in stats.items()}, step)
                if schedule != "constant":
                    board.scalars({"train/lr": optimizer.param_groups[0]["lr"]}, step)
            if tracker is not None and step % validation.every == 0:
                validate()
            if step % checkpoint_every == 0 and step != last_saved:
                if main:
                    save()
                last_saved = step
        # The weights training ends with are measured too, unless they just were.
        if tracker is not None and step > start_step and (not tracker.history or tracker.history[-1][0] != step):
            validate()
    finally:
        bar.close()
        board.close()
    if main and (step != last_saved or not (run_dir / ckpt.LATEST).exists()):
        save()
    distributed.barrier()  # the final checkpoint exists when ``run_loop`` returns on any rank
    best = tracker.best if tracker is not None else None
    return TrainResult(step=step, seconds=budget_clock() - start_time, stopped_by_time=stopped_by_time,
                       last_loss=loss_value, stopped_early=stopped_early,
                       best_step=best[0] if best else None, best_value=best[1] if best else None)


def _fit_bar_to_budget(bar: tqdm, step: int, steps: int, start_step: int, elapsed: float,
                       time_budget: float) -> None:
    """Let the bar's total be the step the time budget will reach at the pace so far (or
    ``steps``, if sooner), so that its estimate of the time left is the budget's, not what
    ``steps`` would take."""
    pace = elapsed / max(step - start_step, 1)
    reachable = step + int(max(time_budget - elapsed, 0.0) / pace) if pace > 0 else steps
    bar.total = min(steps, max(reachable, step))


def _elapsed(budget_clock: Callable[[], float], start_time: float, time_budget: float | None) -> float:
    """The seconds spent so far; in data-parallel training under a time budget, rank 0's,
    so that every process stops at the same step and schedules the same rate."""
    elapsed = budget_clock() - start_time
    if time_budget is not None and distributed.active():
        elapsed = float(distributed.broadcast(torch.tensor([elapsed], dtype=torch.float64))[0])
    return elapsed
