"""Stage-1 training speed by number format: fp32 / bf16 autocast, with and without
channels_last, optionally torch.compile; images/s and the ratio to plain fp32.

Every mode trains the same model from the same initial weights on the same random batch.
Modes are timed in interleaved rounds and the best round of each is kept, so that a burst of
load from another process on a shared machine hurts every mode alike.

    python benchmarks/bench_precision.py [--preset vqvae2-256 --size 64 --batch 16] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from vqkit.nn.presets import PRESETS, preset
from vqkit.nn.vqvae import build_model
from vqkit.precision import Placement, autocast, native_bf16, prepare_input, prepare_model


def make_step(model: torch.nn.Module, x: torch.Tensor, placement: Placement, compiled: bool):
    model = prepare_model(model, placement)
    x = prepare_input(x, placement)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        with autocast(placement):
            loss = forward(x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vqvae2-256")
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = preset(args.preset) if args.preset in PRESETS else preset(args.preset)
    torch.manual_seed(0)
    base = build_model(config)
    x = torch.rand(args.batch, config.in_channels, args.size, args.size) * 2 - 1
    cpu = torch.device("cpu")
    modes = {f"{'bf16' if bf16 else 'fp32'}{' +channels_last' if cl else ''}{' +compile' if comp else ''}":
             (Placement(cpu, bf16, cl), comp)
             for comp in ([False, True] if args.compile else [False])
             for bf16 in (False, True) for cl in (False, True)}
    steps = {}
    for name, (placement, compiled) in modes.items():
        steps[name] = make_step(copy.deepcopy(base), x, placement, compiled)
        steps[name]()  # warm-up (and compilation)
    best = dict.fromkeys(modes, float("inf"))
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{args.preset}, {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, "
          f"native bf16: {native_bf16(cpu)}, torch {torch.__version__}")
    print(f"{'mode':<34} {'images/s':>9} {'vs fp32':>8}")
    fp32 = args.steps * args.batch / best["fp32"]
    for name, seconds in best.items():
        rate = args.steps * args.batch / seconds
        print(f"{name:<34} {rate:>9.1f} {rate / fp32:>7.2f}x")


if __name__ == "__main__":
    main()
