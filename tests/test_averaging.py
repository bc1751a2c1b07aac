"""Polyak averaging of a run's weights: the warmed-up EMA formula, what checkpoints hold, and
resuming an averaged run."""

from __future__ import annotations

import pytest
import torch

from vqkit.errors import ConfigError
from vqkit.runs import checkpoint as ckpt
from vqkit.training.averaging import WeightAverage, ema_with_warmup
from vqkit.training.loop import StepOutput, TensorBoard, run_loop
from vqkit.training.prior import PriorTrainConfig
from vqkit.training.setup import start_run


def test_the_average_follows_the_warmed_up_formula():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.9)
    expected = None
    for n in range(40):
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[float(n), -2.0 * n]]))
        average.update()
        w = model.weight.detach().clone()
        # The first update copies; after n updates, the next lerps by 1 - min(decay, (1 + n) / (10 + n)).
        expected = w if expected is None else expected + (1 - min(0.9, (1 + n) / (10 + n))) * (w - expected)
        assert torch.allclose(average.module.weight, expected), n
    assert average.updates == 40
    assert not torch.equal(average.module.weight, model.weight)  # the average lags the weights


def test_buffers_follow_the_model_and_the_decay_is_checked():
    model = torch.nn.BatchNorm1d(3)
    average = WeightAverage(model, decay=0.99)
    model.running_mean.fill_(5.0)
    average.update()
    assert torch.equal(average.module.running_mean, model.running_mean)
    for decay in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(model, decay)
    with pytest.raises(ConfigError, match="average_decay"):
        PriorTrainConfig(codes="c", average_decay=1.0)


def test_the_fixed_decay_is_reached_after_warm_up():
    averaged, current = [torch.zeros(1)], [torch.ones(1)]
    update = ema_with_warmup(0.999)
    update(averaged, current, torch.tensor(10_000))
    assert float(averaged[0]) == pytest.approx(0.001)


def _train(folder, steps, resume=False, decay=0.5):
    """A one-weight model that SGD moves by +1 per step, averaged with ``decay``."""
    config = PriorTrainConfig(codes="unused", steps=steps, lr=1.0, device="cpu", precision="fp32")
    model_config = PriorTrainConfig(codes="model")  # any JSON config names the model

    def build():
        model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        return model

    run = start_run(folder, "prior", model_config, build, config, resume=resume, tensorboard=False,
                    data_field="codes", average_decay=decay)
    model = run.model
    run_loop(folder, model, run.optimizer, run.step, steps=steps, time_budget=None, checkpoint_every=1000,
             log_every=1000, step_fn=lambda *_: StepOutput(-model.weight.sum(), {}),
             board=TensorBoard(folder, False), progress=False, average=run.average)
    return run


def _averaged(weights, first_update=0, decay=0.5):
    """The average of ``weights`` (one per step) after ``first_update`` earlier updates."""
    average = None
    for n, w in enumerate(weights, start=first_update):
        average = w if average is None else average + (1 - min(decay, (1 + n) / (10 + n))) * (w - average)
    return average


def _saved(folder):
    model = torch.nn.Linear(1, 1, bias=False)
    ckpt.load_weights_of(ckpt.latest_checkpoint(folder), model)
    return float(model.weight.detach())


def test_checkpoints_hold_the_average_and_resume_the_trained_weights(tmp_path):
    straight = _train(tmp_path / "straight", 6)
    assert float(straight.model.weight.detach()) == 6.0
    average = _averaged([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert 1.0 < average < 6.0  # behind the trained weights
    assert _saved(tmp_path / "straight") == pytest.approx(average)
    assert float(straight.result.weight.detach()) == pytest.approx(average)
    _train(tmp_path / "resumed", 3)
    resumed = _train(tmp_path / "resumed", 6, resume=True)
    assert float(resumed.model.weight.detach()) == 6.0  # trained on from 3, not from the average
    assert _saved(tmp_path / "resumed") == _saved(tmp_path / "straight")
    assert resumed.average.updates == 6


def test_averaging_can_start_or_stop_on_resume(tmp_path):
    _train(tmp_path / "a", 3, decay=0.0)
    assert _saved(tmp_path / "a") == 3.0
    on = _train(tmp_path / "a", 5, resume=True)
    assert float(on.model.weight.detach()) == 5.0
    assert _saved(tmp_path / "a") == pytest.approx(_averaged([4.0, 5.0]))  # from the first step averaged
    off = _train(tmp_path / "a", 7, resume=True, decay=0.0)
    assert float(off.model.weight.detach()) == 7.0 == _saved(tmp_path / "a")
