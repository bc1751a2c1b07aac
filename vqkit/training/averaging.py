"""Polyak averaging of a run's weights: an exponential moving average of the parameters,
which a prior is measured, checkpointed and used by.

With Adam at a constant learning rate the weights keep moving about the minimum by about the
step size; their running average sits nearer to it (Polyak and Juditsky 1992; PixelCNN++,
Salimans et al. 2017, evaluates its priors with averaged weights). The average after step t::

    W_avg <- d_t W_avg + (1 - d_t) W_t,    d_t = min(decay, (1 + n) / (10 + n))

with ``n`` the updates so far: the warm-up (TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``) lets the first steps' weights fade within tens of steps rather than the
1 / (1 - decay) a fixed decay takes, so that a short run's average is not its initialisation.
The averaging is torch's ``AveragedModel``; this module adds the warm-up. A run that averages
saves the average as its checkpoints' ``model.safetensors``, the weights every command loads,
and the trained weights that resuming continues from in ``training.safetensors``
(``vqkit.runs.checkpoint.TRAINED_PREFIX``).

Buffers are not averaged: the averaged copy takes the trained model's buffers at each update
(a prior's buffers are constant masks).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_with_warmup(decay: float):
    """An ``AveragedModel`` multi_avg_fn: the EMA above, its decay warmed up by update count."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        n = float(updates)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


class WeightAverage:
    """The running average of ``model``'s parameters.

    Args:
        model: the module being trained (not a data-parallel or compiled wrapper: its
            parameters are what the optimizer steps).
        decay: the average's decay per step, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        self.model = model
        self.averaged = AveragedModel(model, multi_avg_fn=ema_with_warmup(decay))

    @property
    def module(self) -> nn.Module:
        """The averaged weights, as a module of the model's own class."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self) -> None:
        """Average the model's parameters as they are after an optimizer step."""
        self.averaged.update_parameters(self.model)
        for mine, theirs in zip(self.module.buffers(), self.model.buffers()):
            mine.copy_(theirs)

    def resumed(self, step: int) -> None:
        """The average was just loaded from the checkpoint of ``step``, one update per step
        (which sets the warm-up where it goes on)."""
        self.averaged.n_averaged.fill_(step)
