"""Behaviour tests for vqkit.runs.checkpoint: exact round trips, corrupt or foreign run folders,
crash safety of save_checkpoint, pruning, and resuming state without pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import TINY

from vqkit.nn.vqvae import VQVAE, VQVAEConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.checkpoint import (
    KEEP_CHECKPOINTS,
    CheckpointError,
    latest_checkpoint,
    load_model,
    load_training_state,
    model_config_of,
    read_config,
    save_checkpoint,
    write_config,
)


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Model-scale images (n, 1, 16, 16) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1


def _trained(steps: int = 3, seed: int = 0) -> tuple[VQVAE, torch.optim.Adam]:
    """A tiny model after a few Adam steps: k-means initialised codebook, EMA statistics,
    likelihood variance and optimizer moments all non-trivial."""
    torch.manual_seed(seed)
    model = VQVAE(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for s in range(steps):
        out = model(_images(seed=seed * 100 + s))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model, opt


def _run(tmp_path: Path, steps: int = 3, seed: int = 0, name: str = "run"):
    run = tmp_path / name
    model, opt = _trained(steps, seed)
    write_config(run, TINY, {"data": "test:none", "steps": steps})
    save_checkpoint(run, model, opt, steps, {"loss": 0.5})
    return run, model, opt


def _weights_file(run: Path) -> Path:
    return latest_checkpoint(run).path / "model.safetensors"


# --------------------------------------------------------------------------------------------
# Round trips


def test_save_load_gives_bit_identical_outputs(tmp_path):
    run, model, _ = _run(tmp_path)
    model.eval()
    loaded, ck = load_model(run)
    assert not loaded.training
    assert ck.step == 3 and ck.state["metrics"] == {"loss": 0.5}
    x = _images(5, seed=42)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.x_hat, b.x_hat)
    assert torch.equal(a.nll, b.nll)
    codes = model.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(codes, loaded.encode(x), strict=True))
    assert torch.equal(model.decode(codes), loaded.decode(codes))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_config_json_round_trip(tmp_path):
    config = VQVAEConfig(in_channels=3, hidden=12, res_hidden=5, num_res_blocks=3, downsample=1,
                         code_dim=7, codebook_size=33, beta=0.3, ema=False, decay=0.95,
                         kmeans_init=False, restart_after=0, likelihood="logistic_mixture",
                         mixtures=3)
    train = {"data": "cifar10:somewhere", "steps": 7, "lr": 0.000123, "time_budget": None}
    write_config(tmp_path, config, train)
    assert model_config_of(tmp_path) == config
    data = read_config(tmp_path)
    assert data["train"] == train
    assert data["kind"] == "vqvae"
    # The file is plain JSON that other tools can read.
    assert json.loads((tmp_path / "config.json").read_text())["model"]["codebook_size"] == 33


# --------------------------------------------------------------------------------------------
# Foreign or corrupt checkpoints


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    run, _, _ = _run(tmp_path)
    data = json.loads((run / "config.json").read_text())
    data["model"]["hidden"] = 16
    (run / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    msg = str(e.value)
    assert "model.safetensors" in msg and "do not fit" in msg


def test_truncated_weights_are_rejected(tmp_path):
    run, _, _ = _run(tmp_path)
    path = _weights_file(run)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert str(path) in str(e.value) and "fingerprint" in str(e.value)


def test_flipped_byte_is_rejected(tmp_path):
    run, _, _ = _run(tmp_path)
    path = _weights_file(run)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert str(path) in str(e.value) and "fingerprint" in str(e.value)


def test_garbage_weights_with_matching_fingerprint_are_rejected(tmp_path):
    """Even when state.json is edited to match, an unreadable file is a CheckpointError."""
    run, _, _ = _run(tmp_path)
    path = _weights_file(run)
    path.write_bytes(b"\x00" * 40)
    state_path = path.parent / "state.json"
    state = json.loads(state_path.read_text())
    state["fingerprint"] = ckpt.fingerprint(path)
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        load_model(run)
    assert str(path) in str(e.value)


def test_corrupt_training_state_is_rejected(tmp_path):
    run, _, _ = _run(tmp_path)
    path = latest_checkpoint(run).path / "training.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    model, opt = _trained(0)
    with pytest.raises(CheckpointError) as e:
        load_training_state(run, model, opt)
    assert str(path) in str(e.value)


def test_missing_run_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as e:
        load_model(missing)
    assert str(missing) in str(e.value)


def test_missing_config_json(tmp_path):
    run, _, _ = _run(tmp_path)
    (run / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert str(run / "config.json") in str(e.value) and "missing" in str(e.value)


def test_invalid_config_json(tmp_path):
    run, _, _ = _run(tmp_path)
    (run / "config.json").write_text('{"kind": "vqvae", "model": {')
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert str(run / "config.json") in str(e.value) and "JSON" in str(e.value)


def test_config_with_unknown_keys(tmp_path):
    run, _, _ = _run(tmp_path)
    data = json.loads((run / "config.json").read_text())
    data["model"]["layers"] = 3
    (run / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert str(run / "config.json") in str(e.value) and "layers" in str(e.value)


def test_missing_latest(tmp_path):
    run, _, _ = _run(tmp_path)
    (run / "latest").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert str(run / "latest") in str(e.value)


def test_latest_naming_missing_checkpoint(tmp_path):
    run, _, _ = _run(tmp_path)
    (run / "latest").write_text("step-00000099\n")
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert "step-00000099" in str(e.value) and "state.json" in str(e.value)


# --------------------------------------------------------------------------------------------
# Crash safety


class _Crash(RuntimeError):
    pass


def _crash_on_call(monkeypatch, name: str, call: int):
    """Replace ``vqkit.runs.checkpoint.<name>`` by a wrapper that raises on its ``call``-th use."""
    original = getattr(ckpt, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise _Crash(f"simulated crash in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt, name, wrapper)
    return calls


@pytest.mark.parametrize("where,call", [
    ("save_file", 1),           # while writing model.safetensors
    ("save_file", 2),           # while writing training.safetensors
    ("atomic_write_text", 1),   # after the rename, before `latest` is updated
])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where, call):
    run, model, opt = _run(tmp_path, steps=2)
    before = _weights_file(run).read_bytes()
    x = _images(4, seed=7)
    model.eval()
    with torch.no_grad():
        expected = model(x).x_hat

    newer, newer_opt = _trained(5, seed=1)
    _crash_on_call(monkeypatch, where, call)
    with pytest.raises(_Crash):
        save_checkpoint(run, newer, newer_opt, 5)
    monkeypatch.undo()

    assert (run / "latest").read_text().strip() == "step-00000002"
    loaded, ck = load_model(run)
    assert ck.step == 2
    assert _weights_file(run).read_bytes() == before
    with torch.no_grad():
        assert torch.equal(loaded(x).x_hat, expected)
    # The next save of that step still works and becomes the latest.
    save_checkpoint(run, newer, newer_opt, 5)
    assert load_model(run)[1].step == 5
    assert not list((run / "checkpoints").glob(".tmp-*"))


class _OsWithCrash:
    """Stand-in for the ``os`` module whose ``replace`` raises (``mode='always'``)."""

    def __init__(self, real, mode: str):
        self._real, self._mode = real, mode

    def __getattr__(self, name):
        return getattr(self._real, name)

    def replace(self, *args, **kwargs):
        if self._mode == "always":
            raise _Crash("simulated crash in os.replace")
        return self._real.replace(*args, **kwargs)


def test_crash_at_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run, model, _ = _run(tmp_path, steps=2)
    before = _weights_file(run).read_bytes()
    newer, newer_opt = _trained(5, seed=1)
    monkeypatch.setattr(ckpt, "os", _OsWithCrash(os, "always"))
    with pytest.raises(_Crash):
        save_checkpoint(run, newer, newer_opt, 5)
    monkeypatch.undo()
    assert (run / "latest").read_text().strip() == "step-00000002"
    assert not (run / "checkpoints" / "step-00000005").exists()
    loaded, ck = load_model(run)
    assert ck.step == 2 and _weights_file(run).read_bytes() == before


def test_pruning_keeps_at_most_keep_checkpoints(tmp_path):
    model, opt = _trained(1)
    run = tmp_path / "run"
    write_config(run, TINY, {})
    for step in range(1, 6):
        save_checkpoint(run, model, opt, step)
        folders = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert len(folders) <= KEEP_CHECKPOINTS
        assert folders[-1] == f"step-{step:08d}"
        assert (run / "latest").read_text().strip() == folders[-1]
    expected = [f"step-{s:08d}" for s in range(6 - KEEP_CHECKPOINTS, 6)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == expected
    assert load_model(run)[1].step == 5


# --------------------------------------------------------------------------------------------
# Resuming state, without pickle


def test_optimizer_and_rng_state_round_trip_without_pickle(tmp_path, monkeypatch):
    model, opt = _trained(4)
    run = tmp_path / "run"
    write_config(run, TINY, {})
    torch.manual_seed(1234)
    torch.rand(3)
    rng = torch.get_rng_state()
    save_checkpoint(run, model, opt, 4)
    torch.manual_seed(999)  # move the global RNG elsewhere

    # Nothing in the checkpoint is a pickle (or a torch.save zip archive) ...
    files = sorted(p.name for p in latest_checkpoint(run).path.iterdir())
    assert files == ["model.safetensors", "state.json", "training.safetensors"]
    for p in latest_checkpoint(run).path.iterdir():
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", p

    # ... and loading never unpickles.
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during checkpoint load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)

    torch.manual_seed(5)
    fresh = VQVAE(TINY)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    ck = load_training_state(run, fresh, fresh_opt)
    assert ck.step == 4
    assert torch.equal(torch.get_rng_state(), rng)

    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert b["param_groups"][0]["lr"] == 1e-3
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    for index, slots in a["state"].items():
        assert slots.keys() == b["state"][index].keys()
        for key, value in slots.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k

    # One more identical step from both keeps them identical (state really is restored).
    x = _images(8, seed=77)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        torch.manual_seed(3)
        out = m(x)
        o.zero_grad()
        out.loss.backward()
        o.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
