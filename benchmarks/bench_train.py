"""Stage-1 training throughput per preset: images/s and peak memory of a training step.

Random images of each preset's natural size, batch 64, Adam; each preset in its own
subprocess so that peak RSS belongs to it alone.

    python benchmarks/bench_train.py [--threads 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SIZES = {"cifar10": (3, 32), "cifar10-paper": (3, 32), "mnist": (1, 28), "demo": (1, 28)}


def run(name: str, steps: int, batch: int) -> dict:
    from vqkit.nn.presets import preset
    from vqkit.nn.vqvae import VQVAE

    torch.manual_seed(0)
    model = VQVAE(preset(name))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    channels, size = SIZES[name]
    x = torch.rand(batch, channels, size, size) * 2 - 1
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in model.parameters())
    return {"preset": name, "images_per_s": steps * batch / seconds, "peak_mib": (peak - base) / 1024,
            "params": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.preset:
        print(json.dumps(run(args.preset, args.steps, args.batch)))
        return
    print(f"stage-1 training step, batch {args.batch}, {args.threads} threads, {args.steps} steps")
    print(f"{'preset':>14} {'images/s':>9} {'peak MiB':>9} {'params':>10}")
    for name in SIZES:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--steps", str(args.steps),
               "--batch", str(args.batch), "--preset", name]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"{name:>14} {r['images_per_s']:>9.0f} {r['peak_mib']:>9.0f} {r['params']:>10,}")


if __name__ == "__main__":
    main()
