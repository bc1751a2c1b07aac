"""Quality under a CPU time budget: train a preset for a fixed number of seconds, then
evaluate on the whole test split (MSE on [0, 1], PSNR, bits/dim, codebook usage).

    python benchmarks/bench_quality.py --data cifar10:../shared/data/cifar10 --preset cifar10 --budget 600
    python benchmarks/bench_quality.py --data fashion-mnist:../shared/data/fashion-mnist --preset mnist --budget 300
    python benchmarks/bench_quality.py --data folder:../shared/data/faces --image-size 128 \\
        --preset faces-3level --budget 600

The run folder is kept (default under /tmp) for `vqkit reconstruct` and TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from vqkit.data.datasets import load_dataset
from vqkit.nn.presets import PRESETS, preset
from vqkit.runs.checkpoint import load_model
from vqkit.training.evaluate import evaluate
from vqkit.training.stage1 import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--budget", type=float, default=600.0, help="training seconds")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, help="centre-crop and resize folder images")
    p.add_argument("--out", type=Path, help="run folder (default: a new folder under /tmp)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"vqkit-{args.preset}-"))
    if out.exists() and args.out:
        shutil.rmtree(out)
    config = TrainConfig(data=args.data, steps=10**9, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, time_budget=args.budget, checkpoint_every=10**9,
                       image_size=args.image_size)
    model_config = preset(args.preset) if args.preset in PRESETS else preset(args.preset)
    result = train(out, model_config, config, progress=False)
    model, _ = load_model(out)
    metrics = evaluate(model, load_dataset(args.data, "test", image_size=args.image_size), progress=False)
    print(json.dumps({"preset": args.preset, "data": args.data, "lr": args.lr,
                      "batch_size": args.batch_size, "threads": args.threads,
                      "seconds": round(result.seconds, 1), "steps": result.step,
                      "run": str(out), **metrics.to_dict()}, indent=2))
    print(f"{args.preset} after {result.step} steps / {result.seconds:.0f} s: {metrics.summary()}")


if __name__ == "__main__":
    main()
