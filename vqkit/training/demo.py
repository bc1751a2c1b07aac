"""``vqkit demo``: both stages on Fashion-MNIST in a few minutes of CPU, from any machine.

Stage 1 trains the ``demo`` preset and writes a reconstruction grid and the test metrics;
stage 2 extracts the training set's codes (for a small set, also those of the mirrored images:
exact augmentation), fits a class-conditional PixelSNAIL prior sized for that many maps, keeps
its best checkpoint by held-out NLL (stopping once that no longer improves) and draws one row
of samples per class beside samples of the uniform prior that stage 1 assumes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from vqkit.data.datasets import find_fashion_mnist, from_model, load_dataset, to_model
from vqkit.data.images import make_grid, save_png, side_by_side
from vqkit.errors import UsageError
from vqkit.fsutil import atomic_write_text
from vqkit.nn.presets import preset
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import extract_codes
from vqkit.runs.generate import decode_codes, prior_codes, uniform_codes
from vqkit.training.evaluate import evaluate
from vqkit.training.prior import PriorTrainConfig, evaluate_prior, prior_config_for, split_indices, train_prior
from vqkit.training.stage1 import TrainConfig, train

# Mirrored codes regularise a prior of a small set (the embedded sample's 1,500 images: 3.579
# against 3.747 held-out bits per code, benchmarks/bench_prior_fit.py); the full 60,000 do not
# overfit within the demo's budget, and Fashion-MNIST's shoes all point left.
FLIP_UP_TO = 10_000


def run_demo(out: str | Path = "runs/demo", *, data: str | None = None, steps: int = 3000, lr: float = 1e-3,
             time_budget: float | None = 180.0, resume: bool = False, prior_steps: int = 6000,
             prior_time_budget: float = 180.0, report: Callable[[str], None] = print) -> None:
    """Train the demo into ``out`` and write ``reconstructions.png``, ``metrics.json`` and (unless
    ``prior_time_budget`` is 0) ``samples.png``. ``data`` is a Fashion-MNIST folder; by default
    it is searched for, then the embedded sample is used (see ``find_fashion_mnist``). Each
    stage's figures go to ``report`` as they are known."""
    spec, description = find_fashion_mnist(data)
    report(f"demo data: {description}")
    out = Path(out)
    if not resume and (out / "latest").exists():
        if ckpt.model_config_of(out) != preset("demo"):
            raise UsageError(f"{out} holds a run that is not a demo run; choose another --out")
        report(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    config = TrainConfig(data=spec, steps=steps, batch_size=64, lr=lr, seed=0, time_budget=time_budget,
                         checkpoint_every=500, image_every=500)
    result = train(out, preset("demo"), config, resume=resume)
    model, _ = ckpt.load_model(out)
    test = load_dataset(spec, "test")
    metrics = evaluate(model, test, limit=2000)
    images, _ = test.batch(torch.arange(16))
    recon = from_model(model.decode(model.encode(to_model(images))))
    grid_path = out / "reconstructions.png"
    save_png(make_grid(torch.cat([images, recon]), nrow=16), grid_path)
    atomic_write_text(out / "metrics.json", json.dumps(
        {"data": spec, "steps": result.step, "seconds": round(result.seconds, 1), **metrics.to_dict()},
        indent=2) + "\n")
    report(f"stage 1: trained {result.step} steps in {result.seconds:.0f} s")
    report(f"test: {metrics.summary()}")
    report(f"wrote {grid_path} (originals above reconstructions) and {out / 'metrics.json'}")
    if prior_time_budget <= 0:
        return

    source = {"run": str(out.resolve()), "step": result.step, "data": spec, "split": "train",
              "fingerprint": ckpt.latest_checkpoint(out).state.get("fingerprint")}
    codes_dir = out / "codes"
    train_set = load_dataset(spec, "train")
    [codes] = extract_codes(model, train_set, codes_dir, overwrite=True, flip=len(train_set) <= FLIP_UP_TO,
                            source=source)
    prior_dir = out / "prior"
    prior_config = prior_config_for(codes, "pixelsnail", conditional=True)
    prior_train = PriorTrainConfig(codes=str(codes_dir), steps=prior_steps, batch_size=64,
                                   lr=1e-3, time_budget=prior_time_budget, eval_every=100, patience=5)
    prior_result = train_prior(prior_dir, prior_config, prior_train)
    prior, _ = ckpt.load_prior(prior_dir)
    _, val, val_idx = split_indices(codes, prior_train)
    stop = ", stopped early" if prior_result.stopped_early else ""
    report(f"stage 2: prior ({prior_config.channels} channels, {prior_config.layers} layers, dropout "
           f"{prior_config.dropout:g}, for {len(codes)} maps) trained {prior_result.step} steps in "
           f"{prior_result.seconds:.0f} s{stop}; best at step {prior_result.best_step}: "
           f"{evaluate_prior(prior, val, val_idx).summary()}")
    labels = torch.arange(codes.num_classes).repeat_interleave(8)
    sampled = decode_codes(model, [prior_codes(prior, len(labels), labels, seed=0)])
    h, w = codes.shape
    uniform = decode_codes(model, [uniform_codes(len(labels), h, w, codes.codebook_size, seed=0)])
    samples_path = out / "samples.png"
    save_png(side_by_side(make_grid(uniform, nrow=8), make_grid(sampled, nrow=8)), samples_path)
    report(f"wrote {samples_path}: uniform prior (left) beside the class-conditional prior "
           f"(right, one row per class)")
    report(f"TensorBoard curves: tensorboard --logdir {out}")
