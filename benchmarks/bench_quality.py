"""Quality under a CPU time budget: train a preset for a fixed number of seconds, then
evaluate on the whole test split (MSE on [0, 1], PSNR, bits/dim, codebook usage).

    python benchmarks/bench_quality.py --data cifar10:../shared/data/cifar10 --preset cifar10 --budget 600
    python benchmarks/bench_quality.py --data fashion-mnist:../shared/data/fashion-mnist --preset mnist --budget 300
    python benchmarks/bench_quality.py --data folder:../shared/data/faces --image-size 128 \\
        --preset faces-3level --budget 600

`--quantizer SPEC` (as `vqkit train --quantizer`, repeatable per level) and `--codebook-size K`
(VQ levels, and each stage of a residual one) compare quantizers at equal bits per position and
equal CPU time, e.g. on CIFAR-10's 16x16 maps at 10 bits: `--codebook-size 1024`,
`--quantizer fsq:8,5,5,5`, `--quantizer lfq:10`, `--quantizer residual:2 --codebook-size 32`
(the evaluation then reports each stage as a code map: its usage and the PSNR down to it).

The run folder is kept (default under /tmp) for `vqkit reconstruct` and TensorBoard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vqkit.data.datasets import load_dataset
from vqkit.nn.presets import preset
from vqkit.nn.quantizers import parse_quantizer
from vqkit.nn.vqvae import VQVAE2Config, with_quantizer
from vqkit.runs.checkpoint import load_model, read_model_config
from vqkit.training.evaluate import evaluate
from vqkit.training.loop import SCHEDULES
from vqkit.training.stage1 import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--config", type=Path, help="model config JSON instead of a preset")
    p.add_argument("--prefix-training", choices=VQVAE2Config.PREFIX_TRAINING,
                   help="(hierarchies) override the model's prefix_training")
    p.add_argument("--prefix-share", type=float, help="(hierarchies) override the model's prefix_share")
    p.add_argument("--prefix-cooldown", type=float,
                   help="(hierarchies with prefix training) TrainConfig.prefix_cooldown instead of its default")
    p.add_argument("--budget", type=float, default=600.0, help="training seconds")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="the learning rate over the budget")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what --budget counts: wall seconds, or this process's CPU seconds (fairer between "
                        "runs on a shared machine, where other jobs stretch the wall time of each step)")
    p.add_argument("--image-size", type=int, help="centre-crop and resize folder images")
    p.add_argument("--out", type=Path, help="run folder (default: a new folder under /tmp)")
    p.add_argument("--quantizer", action="append", help="the quantizer instead of the preset's (repeat per level)")
    p.add_argument("--codebook-size", type=int,
                   help="K of every VQ level (each stage's, for residual VQ) instead of the preset's")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"vqkit-{args.preset}-"))
    if out.exists() and args.out:
        shutil.rmtree(out)
    config = TrainConfig(data=args.data, steps=10**9, batch_size=args.batch_size, lr=args.lr,
                         schedule=args.schedule, seed=args.seed, time_budget=args.budget, clock=args.clock,
                         checkpoint_every=10**9, image_size=args.image_size, prefix_cooldown=args.prefix_cooldown)
    model_config = read_model_config(args.config) if args.config else preset(args.preset)
    if args.prefix_training:
        model_config = dataclasses.replace(model_config, prefix_training=args.prefix_training)
    if args.prefix_share:
        model_config = dataclasses.replace(model_config, prefix_share=args.prefix_share)
    if args.codebook_size:
        sizes = {"codebook_sizes": [args.codebook_size] * model_config.num_levels} \
            if isinstance(model_config, VQVAE2Config) else {"codebook_size": args.codebook_size}
        model_config = type(model_config).from_dict({**model_config.to_dict(), **sizes})
    if args.quantizer:
        specs = [parse_quantizer(text) for text in args.quantizer]
        model_config = with_quantizer(model_config, specs[0] if len(specs) == 1 else specs)
    wall = time.monotonic()
    result = train(out, model_config, config, progress=False)
    wall = time.monotonic() - wall
    model, _ = load_model(out)
    cooldown = json.loads((out / "config.json").read_text())["train"]["prefix_cooldown"]  # the value used
    metrics = evaluate(model, load_dataset(args.data, "test", image_size=args.image_size), progress=False)
    print(json.dumps({"preset": str(args.config or args.preset), "model": model_config.to_dict(),
                      "data": args.data, "lr": args.lr, "prefix_cooldown": cooldown,
                      "batch_size": args.batch_size, "threads": args.threads,
                      "clock": args.clock, "seconds": round(result.seconds, 1), "wall_seconds": round(wall, 1),
                      "steps": result.step,
                      "run": str(out), **metrics.to_dict()}, indent=2))
    print(f"{args.config or args.preset} after {result.step} steps / {result.seconds:.0f} s ({args.clock}; "
          f"{wall:.0f} s wall): {metrics.summary()}")


if __name__ == "__main__":
    main()
