"""Stage-1 training throughput, one process against data-parallel processes (gloo on the CPU).

Trains a preset with ``vqkit.training.stage1`` for a few steps at the same global batch in each mode,
one after the other, and prints images/s and the ratio to the first mode:

* 1 process, 1 thread
* 1 process, as many threads as processes below (the fair single-process baseline)
* N processes under torchrun, 1 thread each, global batch split between them

On a machine with as many cores as processes the last two use the same CPU; what data
parallelism adds or costs there is the ratio between them.

    python benchmarks/bench_distributed.py [--preset cifar10] [--data cifar10:DIR]
        [--batch 64] [--steps 30] [--nproc 2] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def worker(args) -> None:
    """One training run (one process, or one rank under torchrun); rank 0 prints JSON."""
    from vqkit import distributed
    from vqkit.nn.presets import preset
    from vqkit.training.stage1 import TrainConfig, train

    torch.set_num_threads(args.threads)
    distributed.setup()
    per_process = args.batch // distributed.world_size()
    config = TrainConfig(data=args.data, steps=args.steps, batch_size=per_process, lr=1e-3,
                         checkpoint_every=10 * args.steps, device="cpu", precision=args.precision)
    result = train(args.out, preset(args.preset), config, progress=False, tensorboard=False)
    if distributed.is_main():
        print(json.dumps({"seconds": result.seconds, "images_per_s": args.steps * args.batch / result.seconds,
                          "loss": result.last_loss}))
    distributed.shutdown()


def measure(args, processes: int, threads: int) -> dict:
    out = Path(args.tmp) / f"run-{processes}x{threads}"
    common = [__file__, "--worker", "--out", str(out), "--preset", args.preset, "--data", args.data,
              "--batch", str(args.batch), "--precision", args.precision,
              "--steps", str(args.steps), "--threads", str(threads)]
    if processes == 1:
        command = [sys.executable, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    stdout = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(stdout.strip().splitlines()[-1])


def default_data() -> str:
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data" / "cifar10").is_dir():
            return f"cifar10:{parent / 'shared' / 'data' / 'cifar10'}"
    raise SystemExit("no shared/data/cifar10 found; pass --data")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--data", help="dataset spec (default: shared/data/cifar10)")
    p.add_argument("--batch", type=int, default=64, help="global batch, split between the processes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (vqkit train --precision)")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data = args.data or default_data()
    if args.worker:
        worker(args)
        return
    if args.batch % args.nproc:
        raise SystemExit(f"--batch {args.batch} does not split between {args.nproc} processes")
    from vqkit.precision import resolve
    print(f"stage-1 training, preset {args.preset}, {args.data}, global batch {args.batch}, "
          f"{resolve('cpu', args.precision).describe()}, "
          f"{args.steps} steps (k-means and the final checkpoint included), {os.cpu_count()} CPUs")
    print(f"{'mode':>28} {'images/s':>9} {'ratio':>6} {'loss':>7}")
    base = None
    with tempfile.TemporaryDirectory() as args.tmp:
        for processes, threads in ((1, 1), (1, args.nproc), (args.nproc, 1)):
            r = measure(args, processes, threads)
            base = base or r["images_per_s"]
            mode = f"{processes} process(es) x {threads} thread(s)"
            print(f"{mode:>28} {r['images_per_s']:>9.1f} {r['images_per_s'] / base:>6.2f} {r['loss']:>7.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
