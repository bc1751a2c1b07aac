"""Stage-2 prior sampling speed: incremental vs naive sampler vs one teacher-forced pass.

For each prior (gated PixelCNN, PixelSNAIL; K = 512) and map size (8x8, 16x16, 32x32), the
seconds to sample a batch of 8 maps:

  forward      one teacher-forced forward pass over the batch (no_grad, eval): the work a
               map "costs" when training, and the floor for any sampler
  incremental  vqkit.prior.sample(method="incremental")
  naive        vqkit.prior.sample(method="naive"), one full forward pass per position; above
               --naive-full positions per map only the first --naive-positions steps are
               timed and the total is extrapolated (marked "~")

and the training throughput of each prior at batch 32 on 16x16 maps (nll + backward + Adam).

    python benchmarks/bench_sampling.py [--threads 2] [--channels 128] [--layers 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from vqkit.prior import PriorConfig, build_prior, filtered_probs, sample
from vqkit.prior.sampling import sample_codes

BATCH, K = 8, 512


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # CUDA kernels are asynchronous: wait for the last one


def _seconds(fn, repeats: int) -> float:
    """Best of ``repeats`` runs: on a shared machine the fastest run is the least disturbed."""
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def _naive_steps(prior, size: int, steps: int) -> None:
    """The naive sampler's loop body (a full forward pass, then the pick) for ``steps`` positions."""
    codes = torch.zeros(BATCH, size, size, dtype=torch.long, device=prior.device)
    u = torch.rand(BATCH, size, size, dtype=torch.float64, device=prior.device)
    for t in range(steps):
        i, j = divmod(t, size)
        logits = prior(codes)[:, :, i, j]
        codes[:, i, j] = sample_codes(filtered_probs(logits), u[:, i, j])


def bench_sampling(arch: str, size: int, args) -> dict:
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(arch=arch, codebook_size=K, height=size, width=size,
                                    channels=args.channels, layers=args.layers)).eval().to(args.device)
    codes = torch.randint(K, (BATCH, size, size), device=args.device)
    with torch.no_grad():
        prior(codes)  # warm-up
        forward = _seconds(lambda: prior(codes), 3)
    incremental = _seconds(lambda: sample(prior, BATCH, generator=torch.Generator().manual_seed(0)), 2)
    positions = size * size
    if positions <= args.naive_full:
        naive = _seconds(lambda: sample(prior, BATCH, generator=torch.Generator().manual_seed(0), method="naive"), 1)
        extrapolated = False
    else:
        steps = min(args.naive_positions, positions)
        naive = _seconds(lambda: _naive_steps(prior, size, steps), 1) * positions / steps
        extrapolated = True
    return dict(forward=forward, incremental=incremental, naive=naive, extrapolated=extrapolated)


def bench_training(arch: str, args, steps: int = 10) -> float:
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(arch=arch, codebook_size=K, height=16, width=16,
                                    channels=args.channels, layers=args.layers)).to(args.device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-4)
    codes = torch.randint(K, (32, 16, 16), device=args.device)

    def step():
        loss = prior.nll(codes).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    return steps / (_seconds(lambda: [step() for _ in range(steps)], 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--archs", nargs="+", default=["pixelcnn", "pixelsnail"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way)")
    parser.add_argument("--naive-full", type=int, default=256, help="largest H*W sampled naively in full")
    parser.add_argument("--naive-positions", type=int, default=32, help="steps timed beyond that")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {BATCH}, K {K}, channels {args.channels}, layers {args.layers}, kernel 3, {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"{'prior':<11} {'map':>5} {'forward s':>10} {'incr. s':>9} {'naive s':>10} "
          f"{'naive/incr':>11} {'incr/forward':>13}")
    for arch in args.archs:
        for size in args.sizes:
            r = bench_sampling(arch, size, args)
            mark = "~" if r["extrapolated"] else " "
            print(f"{arch:<11} {size:>2}x{size:<2} {r['forward']:>10.4f} {r['incremental']:>9.3f} "
                  f"{mark}{r['naive']:>9.2f} {mark}{r['naive'] / r['incremental']:>10.1f} "
                  f"{r['incremental'] / r['forward']:>13.2f}", flush=True)
    if any(args.naive_full < s * s for s in args.sizes):
        print(f"~ naive extrapolated from its first {args.naive_positions} positions "
              f"(every naive step is one full forward pass, so the cost per step is constant)")
    for arch in args.archs:
        print(f"training {arch}: {bench_training(arch, args):.2f} steps/s (batch 32, 16x16, nll + backward + Adam)")


if __name__ == "__main__":
    main()
