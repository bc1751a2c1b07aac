"""vqkit.data.loader: batches read by worker processes arrive in the seeded order, and training
through them, or from a prepared set, gives bit-identical weights."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from vqkit.data.datasets import DataError, load_dataset
from vqkit.data.loader import StepBatches, default_workers, iter_batches, read_ahead, workers_for
from vqkit.data.prepared import prepare
from vqkit.errors import ConfigError
from vqkit.runs import checkpoint as ckpt
from vqkit.training.loop import batch_indices
from vqkit.training.stage1 import TrainConfig, train


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    root = tmp_path / "src"
    root.mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (10, 9, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def _indices(step: int) -> torch.Tensor:
    return batch_indices(step, 21, batch_size=4, seed=3)


def test_workers_read_in_the_order_asked_for(folder):
    data = load_dataset(f"folder:{folder}", "all", image_size=8)
    order = range(2, 13)  # across epoch boundaries (5 batches of 4 in 21 images)
    direct = [data.batch(_indices(s)) for s in order]
    got = list(read_ahead(data, _indices, order, workers=2))
    assert len(got) == len(direct)
    for (x, y), (xd, yd) in zip(got, direct):
        assert torch.equal(x, xd) and torch.equal(y, yd)


def test_step_batches_continue_and_restart(folder):
    data = load_dataset(f"folder:{folder}", "all", image_size=8)
    with StepBatches(data, _indices, stop=20, workers=2) as batches:
        for step in (5, 6, 7, 2, 3, 19):  # a rewind to 2 starts a new stream there
            assert torch.equal(batches.get(step)[0], data.batch(_indices(step))[0])


def test_iter_batches_covers_the_set_in_order(folder):
    data = load_dataset(f"folder:{folder}", "all", image_size=8)
    starts, images = zip(*[(s, x) for s, x, _ in iter_batches(data, 5, limit=22, workers=2)])
    assert starts == (0, 5, 10, 15, 20) and len(images[-1]) == 2
    assert torch.equal(torch.cat(images), data.batch(torch.arange(22))[0])


def test_a_workers_data_error_arrives_as_one_line(folder):
    (folder / "07.png").write_bytes(b"not a png")
    data = load_dataset(f"folder:{folder}", "all", image_size=8)
    with pytest.raises(DataError, match=r"^\S*07\.png: cannot decode image \(not an image file\)$"):
        list(iter_batches(data, 4, workers=2))


def test_who_gets_workers(folder, tmp_path):
    lazy = load_dataset(f"folder:{folder}", "all", image_size=8)
    prepare(f"folder:{folder}", tmp_path / "set", image_size=8)
    ready = load_dataset(f"prepared:{tmp_path / 'set'}")
    memory = load_dataset(f"fashion-mnist:{Path(__file__).parent.parent / 'vqkit/sample_data/fashion-mnist'}")
    gpu = torch.device("cuda")
    # By default only a decoding set read for an accelerator gets workers: on the CPU the
    # training step uses every core.
    assert workers_for(lazy, None, gpu) == default_workers() and workers_for(lazy, None) == 0
    assert workers_for(lazy, 3) == 3 and workers_for(lazy, 0, gpu) == 0
    assert workers_for(ready, None, gpu) == 0 and workers_for(ready, 2) == 2
    assert workers_for(memory, 4, gpu) == 0
    with pytest.raises(DataError, match="workers must be >= 0"):
        workers_for(lazy, -1)
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        TrainConfig(data="x", workers=-1)


# --------------------------------------------------------------------------------------------
# Training through the workers and from prepared sets


RGB = dataclasses.replace(TINY, in_channels=3)


def _train(run: Path, data: str, steps: int, resume: bool = False, **kw) -> dict[str, torch.Tensor]:
    config = TrainConfig(data=data, image_size=kw.pop("image_size", 8), steps=steps, batch_size=4, lr=1e-3,
                         **kw)
    train(run, RGB, config, resume=resume, progress=False, tensorboard=False)
    return ckpt.load_model(run)[0].state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_bit_identical_in_memory_through_workers_and_prepared(folder, tmp_path):
    spec = f"folder:{folder}"
    in_memory = _train(tmp_path / "memory", spec, 7)
    lazy = _train(tmp_path / "workers", spec, 7, workers=2, in_memory_gib=0)
    prepare(spec, tmp_path / "set", image_size=8)
    from_prepared = _train(tmp_path / "prepared", f"prepared:{tmp_path / 'set'}", 7, image_size=None)
    assert _same(in_memory, lazy) and _same(in_memory, from_prepared)


def test_resume_through_workers_is_exact(folder, tmp_path):
    spec = f"folder:{folder}"
    straight = _train(tmp_path / "straight", spec, 6, workers=0, in_memory_gib=0)
    _train(tmp_path / "resumed", spec, 3, workers=2, in_memory_gib=0)
    resumed = _train(tmp_path / "resumed", spec, 6, resume=True, workers=2, in_memory_gib=0)
    assert _same(straight, resumed)


def test_indices_for_workers_pickle():
    import pickle

    from vqkit.training.loop import step_indices
    fn = step_indices(21, 4, 3)
    assert isinstance(fn, functools.partial)
    assert torch.equal(pickle.loads(pickle.dumps(fn))(5), _indices(5))
