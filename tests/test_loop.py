"""The training loop's held-out measure: validation.json, the best checkpoint, early stopping,
and their resumption."""

from __future__ import annotations

import math

import pytest
import torch

from vqkit.errors import UsageError
from vqkit.runs import checkpoint as ckpt
from vqkit.training.loop import StepOutput, TensorBoard, Validation, lr_factor, run_loop, run_progress


def _run(run_dir, values, *, steps, every=1, patience=0, checkpoint_every=1000, start=None):
    """Train a one-weight model whose held-out measure after each evaluation is the next of
    ``values``; the weight counts the steps taken, so every checkpoint says which step it is."""
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    step = 0
    if start is not None:
        step = ckpt.load_training_state(run_dir, model, optimizer).step
    else:
        torch.nn.init.zeros_(model.weight)
    measured = iter(values)

    def step_fn(*_) -> StepOutput:
        return StepOutput(-model.weight.sum(), {})  # SGD adds 1 to the weight per step

    validation = Validation("nll", lambda: next(measured), every=every, patience=patience)
    result = run_loop(run_dir, model, optimizer, step, steps=steps, time_budget=None,
                      checkpoint_every=checkpoint_every, log_every=1000, step_fn=step_fn,
                      board=TensorBoard(run_dir / "tb", False), progress=False, validation=validation)
    return result, model


def _weight_of(run_dir, which):
    model = torch.nn.Linear(1, 1, bias=False)
    ckpt.load_weights_of(ckpt.read_checkpoint(run_dir, which), model)
    return float(model.weight.detach())


def test_best_is_the_minimum_of_the_logged_measure_and_its_weights(tmp_path):
    values = [5.0, 3.0, 4.0, 2.0, 6.0, 7.0]
    result, model = _run(tmp_path, values, steps=12, every=2)
    history = ckpt.read_validation(tmp_path)["history"]
    assert history == [[2, 5.0], [4, 3.0], [6, 4.0], [8, 2.0], [10, 6.0], [12, 7.0]]
    assert (result.best_step, result.best_value, result.stopped_early) == (8, 2.0, False)
    assert ckpt.read_checkpoint(tmp_path, "best").step == 8
    assert _weight_of(tmp_path, "best") == 8.0  # the weights the minimum was measured on
    assert _weight_of(tmp_path, "latest") == 12.0 == float(model.weight.detach())
    assert ckpt.chosen_checkpoint(tmp_path).step == 8
    assert ckpt.chosen_checkpoint(tmp_path, "latest").step == 12


def test_the_last_step_is_measured_when_it_is_not_an_evaluation_step(tmp_path):
    _run(tmp_path, [5.0, 4.0, 1.0], steps=5, every=2)
    assert ckpt.read_validation(tmp_path)["history"] == [[2, 5.0], [4, 4.0], [5, 1.0]]
    assert ckpt.read_checkpoint(tmp_path, "best").step == 5


def test_early_stopping_stops_after_patience_evaluations_without_a_new_best(tmp_path):
    result, model = _run(tmp_path, [3.0, 2.0, 2.5, 2.0, 2.7, 9.0], steps=100, patience=3)
    # Equal is no improvement: after the best at step 2, steps 3, 4 and 5 make three.
    assert (result.step, result.stopped_early, result.best_step) == (5, True, 2)
    assert float(model.weight.detach()) == 5.0 and ckpt.latest_checkpoint(tmp_path).step == 5
    # Resumed, the run is still out of patience: it stops before another step.
    again, _ = _run(tmp_path, [], steps=100, patience=3, start="latest")
    assert (again.step, again.stopped_early) == (5, True)
    # With more patience it goes on from where it stopped, keeping its history.
    more, _ = _run(tmp_path, [1.0], steps=6, patience=5, start="latest")
    assert more.step == 6 and more.best_step == 6
    assert [s for s, _ in ckpt.read_validation(tmp_path)["history"]] == [1, 2, 3, 4, 5, 6]


def test_resume_forgets_measures_after_the_checkpoint_it_resumes(tmp_path):
    _run(tmp_path, [4.0, 3.0, 1.0], steps=3, checkpoint_every=2)
    # Pretend the run died after measuring step 3 but before saving it.
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.step == 3
    (tmp_path / "latest").write_text("step-00000002\n")
    (tmp_path / "best").write_text("step-00000002\n")
    result, _ = _run(tmp_path, [2.5], steps=3, start="latest")
    assert ckpt.read_validation(tmp_path)["history"] == [[1, 4.0], [2, 3.0], [3, 2.5]]
    assert result.best_step == 3


def test_pruning_keeps_the_best_checkpoint(tmp_path):
    _run(tmp_path, [9.0, 1.0] + [5.0] * 8, steps=10, checkpoint_every=1)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-00000002" in kept and kept[-1] == "step-00000010"
    assert len(kept) == ckpt.KEEP_CHECKPOINTS + 1
    assert _weight_of(tmp_path, "best") == 2.0


def test_validation_record_and_pointers_are_checked(tmp_path):
    _run(tmp_path, [1.0], steps=1)
    (tmp_path / ckpt.VALIDATION_FILE).write_text('{"history": [[1, "x"]]}')
    with pytest.raises(ckpt.CheckpointError, match="validation.json: not a validation record"):
        ckpt.read_validation(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no best checkpoint"):
        ckpt.read_checkpoint(tmp_path / "checkpoints", "best")
    with pytest.raises(UsageError, match="best, latest"):
        ckpt.chosen_checkpoint(tmp_path, "first")
    # A run without a best pointer (no held-out measure, or an older vqkit) is used at its latest.
    (tmp_path / "best").unlink()
    assert ckpt.chosen_checkpoint(tmp_path).step == 1


def test_the_time_budget_counts_the_chosen_clock(tmp_path, monkeypatch):
    """The loop reads the time only through the clock ``clock`` names: a fake "cpu" clock that
    advances one second per reading stops the run once the budget is spent, and "wall" time,
    which barely moves meanwhile, does not."""
    from vqkit.training import loop
    ticks = iter(range(10 ** 6))
    monkeypatch.setitem(loop.CLOCKS, "cpu", lambda: float(next(ticks)))
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def run(clock: str):
        return run_loop(tmp_path, model, optimizer, 0, steps=50, time_budget=5.0, checkpoint_every=1000,
                        log_every=1000, step_fn=lambda *_: StepOutput(-model.weight.sum(), {}),
                        board=TensorBoard(tmp_path / "tb", False), progress=False, clock=clock)
    result = run("cpu")
    assert result.stopped_by_time and 1 <= result.step < 10
    assert not run("wall").stopped_by_time


def test_schedule_factors_follow_the_cosine_and_clamp():
    assert lr_factor("constant", 0.7) == 1.0
    assert [lr_factor("cosine", p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor("cosine", 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("cosine", -1.0) == 1.0 and lr_factor("cosine", 3.0) == pytest.approx(0.0)
    # The cooldown: constant for the first 80%, then 1 - sqrt of the share of the last 20% done.
    assert [lr_factor("cooldown", p) for p in (0.0, 0.5, 0.8)] == [1.0, 1.0, 1.0]
    assert lr_factor("cooldown", 0.85) == pytest.approx(0.5)
    assert lr_factor("cooldown", 1.0) == pytest.approx(0.0) == lr_factor("cooldown", 2.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("step", 0.5)
    # The run ends at its steps or its budget, whichever comes first.
    assert run_progress(30, 100, 5.0, None) == 0.3
    assert run_progress(30, 100, 5.0, 10.0) == 0.5
    assert run_progress(80, 100, 5.0, 10.0) == 0.8


def _rates(run_dir, *, steps, schedule="cosine", start=0, optimizer_lr=1.0, budget=None, monkeypatch=None):
    """The learning rate each step of a scheduled run (base lr 0.1) was taken with, and how the
    run ended. With ``budget``, the run counts a fake CPU clock that reads 10 s per step taken."""
    from vqkit.training import loop
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=optimizer_lr)
    seen = []
    if budget is not None:
        monkeypatch.setitem(loop.CLOCKS, "cpu", lambda: 10.0 * len(seen))

    def step_fn(step: int, _progress: float) -> StepOutput:
        seen.append(optimizer.param_groups[0]["lr"])
        return StepOutput(-model.weight.sum(), {})

    result = run_loop(run_dir, model, optimizer, start, steps=steps, time_budget=budget,
                      clock="wall" if budget is None else "cpu", checkpoint_every=1000, log_every=1000,
                      step_fn=step_fn, board=TensorBoard(run_dir / "tb", False), progress=False, lr=0.1,
                      schedule=schedule)
    return seen, result


def test_the_cosine_runs_over_the_steps_from_the_base_lr_not_the_optimizer_s(tmp_path):
    # The optimizer's own rate (as a resumed one holds: the last scheduled) is not the base.
    seen, _ = _rates(tmp_path / "a", steps=4, optimizer_lr=0.003)
    assert seen == pytest.approx([0.1 * lr_factor("cosine", k / 4) for k in range(4)])
    # A resumed run goes on along the same cosine.
    seen, _ = _rates(tmp_path / "b", steps=4, start=2, optimizer_lr=0.003)
    assert seen == pytest.approx([0.05, 0.1 * lr_factor("cosine", 0.75)])
    seen, _ = _rates(tmp_path / "c", steps=3, schedule="constant")
    assert seen == [1.0, 1.0, 1.0]  # a constant schedule leaves the optimizer's rate alone


def test_under_a_time_budget_the_cosine_ends_with_the_budget(tmp_path, monkeypatch):
    """With 10 s per step, a 40 s budget and far more steps, step k is taken at progress k / 4,
    and the run stops once the budget is spent."""
    steps_taken, result = _rates(tmp_path, steps=1000, budget=40.0, monkeypatch=monkeypatch)
    assert result.stopped_by_time and result.step == 5
    assert steps_taken == pytest.approx([0.1 * lr_factor("cosine", k / 4) for k in range(5)])


def test_each_step_is_told_the_share_of_the_run_done(tmp_path, monkeypatch):
    """``step_fn`` gets ``run_progress`` before each step: step k of 4 at k / 4; under a 40 s
    budget (a fake CPU clock reading 10 s per step taken) with far more steps, k / 4 too,
    the budget's share, up to the step that spends it."""
    from vqkit.training import loop

    def progresses(run_dir, steps, budget=None):
        seen = []
        monkeypatch.setitem(loop.CLOCKS, "cpu", lambda: 10.0 * len(seen))
        model = torch.nn.Linear(1, 1, bias=False)

        def step_fn(step: int, progress: float) -> StepOutput:
            seen.append(progress)
            return StepOutput(-model.weight.sum(), {})

        run_loop(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1), 0, steps=steps, time_budget=budget,
                 clock="cpu", checkpoint_every=1000, log_every=1000, step_fn=step_fn,
                 board=TensorBoard(run_dir / "tb", False), progress=False)
        return seen

    assert progresses(tmp_path / "steps", 4) == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert progresses(tmp_path / "budget", 1000, budget=40.0) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_a_schedule_needs_its_base_lr(tmp_path):
    model = torch.nn.Linear(1, 1, bias=False)
    with pytest.raises(ValueError, match="needs the base lr"):
        run_loop(tmp_path, model, torch.optim.SGD(model.parameters(), lr=1.0), 0, steps=1, time_budget=None,
                 checkpoint_every=1, log_every=1, step_fn=lambda *_: None, board=TensorBoard(tmp_path, False),
                 progress=False, schedule="cosine")
