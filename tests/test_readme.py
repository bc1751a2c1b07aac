"""The README's Python examples run as written, on tiny data: each fenced ``python`` block is
executed in order with the dataset paths pointed at the embedded sample and the training
budgets cut to a few steps, so an example that drifts from the API fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vqkit.cli.main import main
from vqkit.data.datasets import sample_dir
from vqkit.data.images import save_png

README = Path(__file__).parent.parent / "README.md"
DATA = f"fashion-mnist:{sample_dir()}"
TINY2 = ('{"in_channels": 3, "hidden": 8, "res_hidden": 4, "num_res_blocks": 1, "strides": [1, 1], '
         '"code_dim": 4, "codebook_sizes": [8, 16], "restart_after": 2}')
PRIOR = ["--steps", "3", "--batch-size", "8", "--channels", "8", "--layers", "2", "--no-tensorboard"]


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _tiny(code: str) -> str:
    """The block with the README's data set replaced by the embedded sample and every
    training run cut to two steps."""
    code = re.sub(r'"mnist:[^"]*"', repr(DATA), code)
    code = re.sub(r",\s*steps=\d+", "", code)
    return code.replace("TrainConfig(", "TrainConfig(steps=2, checkpoint_every=2, ")


def _stage1_with_priors(root: Path) -> None:
    """The two-level RGB run and its priors that the README's codec example names, trained on a
    folder of random 28x28 images, and the photo it compresses."""
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        save_png(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=g), root / "photos" / f"{i:02d}.png")
    (root / "c2.json").write_text(TINY2)
    data = f"folder:{root / 'photos'}"
    assert main(["train", "--config", str(root / "c2.json"), "--data", data, "--steps", "2", "--batch-size", "8",
                 "--no-tensorboard", "-o", str(root / "runs/c2")]) == 0
    assert main(["extract", str(root / "runs/c2"), "--limit", "16", "-o", str(root / "runs/c2-codes")]) == 0
    assert main(["train-prior", str(root / "runs/c2-codes/top"), *PRIOR, "-o", str(root / "runs/c2-top")]) == 0
    assert main(["train-prior", str(root / "runs/c2-codes/bottom"), "--cond", str(root / "runs/c2-codes/top"),
                 *PRIOR, "-o", str(root / "runs/c2-bottom")]) == 0
    save_png(torch.randint(0, 256, (3, 30, 27), dtype=torch.uint8, generator=g), root / "photo.png")


def test_the_readme_has_python_examples():
    assert len(_blocks()) >= 4


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for index, block in enumerate(_blocks()):
        # A block meant for torchrun trains its own run: give it a folder of its own.
        where = tmp_path / f"block{index}" if "torchrun" in block else tmp_path
        where.mkdir(exist_ok=True)
        monkeypatch.chdir(where)
        if '"runs/c2"' in block and not (where / "runs/c2").exists():
            _stage1_with_priors(where)
        if '"models/mnist"' in block and not (where / "models/mnist").exists():
            assert main(["export", "runs/mnist", "-o", "models/mnist"]) == 0  # the run of block 1
        try:
            exec(compile(_tiny(block), f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
        except Exception as e:  # noqa: BLE001 - name the block in the failure
            pytest.fail(f"README python block {index + 1} failed: {type(e).__name__}: {e}\n{block}")
