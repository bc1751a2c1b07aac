"""Quantizer training step (forward + backward + EMA update) at N=65536, D=64.

Compares, in one run and at the same thread count:
  matmul    torch.mm of the same shape (N x D) @ (D x K): the ceiling for the distances
  vqkit     vqkit.nn.quantize.VectorQuantizer(ema=True), blocked distances with a fused argmin
  plain     full N x K distance matrix, argmin, gather; EMA by index_add
  one-hot   the common reproduction pattern: N x K distances and an N x K one-hot matrix
            used for the lookup and the EMA statistics

GFLOP/s counts 2 N D K for the distances. Peak memory is the growth of the process's peak
RSS over the calls, inputs excluded (each case runs in its own subprocess so peaks do not mix).

``--against REF`` instead times this tree's VectorQuantizer against the one in git revision
REF (its vqkit/nn/quantize.py, run with this tree's other modules) on the same (B, D, H, W)
input, in one process with the repeats interleaved, so that a regression shows as a ratio
rather than drowning in the drift of a shared machine; it reports wall-clock and CPU time
(the process's, all threads: steadier than wall time when other processes take the cores).

    python benchmarks/bench_quantizer.py [--threads 2] [--repeats 3] [--against main]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

N, D = 65536, 64


def plain_step(z, codebook, ema_count, ema_sum, decay=0.99, eps=1e-5):
    flat = z.detach()
    dist = flat.square().sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.square().sum(1)
    codes = dist.argmin(1)
    z_q = codebook[codes]
    counts = torch.bincount(codes, minlength=codebook.shape[0]).float()
    sums = torch.zeros_like(ema_sum).index_add_(0, codes, flat)
    ema_count.mul_(decay).add_(counts, alpha=1 - decay)
    ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
    n = ema_count.sum()
    codebook.copy_(ema_sum / ((ema_count + eps) / (n + len(ema_count) * eps) * n).unsqueeze(1))
    loss = 0.25 * F.mse_loss(z, z_q)
    return z + (z_q - z).detach(), loss


def onehot_step(z, codebook, ema_count, ema_sum, decay=0.99, eps=1e-5):
    flat = z.detach()
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1, keepdim=True).t()
    codes = (-dist).max(1)[1]
    onehot = F.one_hot(codes, codebook.shape[0]).type(flat.dtype)
    z_q = onehot @ codebook
    ema_count.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
    ema_sum.mul_(decay).add_(onehot.t() @ flat, alpha=1 - decay)
    n = ema_count.sum()
    codebook.copy_(ema_sum / ((ema_count + eps) / (n + len(ema_count) * eps) * n).unsqueeze(1))
    loss = 0.25 * (z_q.detach() - z).pow(2).mean()
    return z + (z_q - z).detach(), loss


def run_case(case: str, k: int, repeats: int) -> dict:
    torch.manual_seed(0)
    z = torch.randn(N, D, requires_grad=True)
    codebook = torch.randn(k, D)
    if case == "vqkit":
        from vqkit.nn.quantize import VectorQuantizer
        q = VectorQuantizer(k, D, ema=True).train()
        q.codebook.copy_(codebook)
        q.ema_sum.copy_(codebook)
        z4 = z.t().reshape(1, D, 256, 256)  # a (B, D, H, W) view of the same N vectors

        def step():
            out = q(z4)
            (out.loss + out.z_q.sum()).backward()
    elif case == "matmul":
        out = torch.empty(N, k)

        def step():
            torch.mm(z.detach(), codebook.t(), out=out)
    else:
        fn = plain_step if case == "plain" else onehot_step
        ema_count, ema_sum = torch.ones(k), codebook.clone()

        def step():
            z_q, loss = fn(z, codebook, ema_count, ema_sum)
            (loss + z_q.sum()).backward()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = min(times)
    return {"case": case, "K": k, "ms": 1000 * seconds, "gflops": 2 * N * D * k / seconds / 1e9,
            "peak_mib": max(peak - base, 0) / 1024}


def quantizer_at(ref: str) -> type:
    """``VectorQuantizer`` as of git revision ``ref``."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(root), "show", f"{ref}:vqkit/nn/quantize.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"quantize_at_{ref}")
    exec(compile(source, f"{ref}:vqkit/nn/quantize.py", "exec"), module.__dict__)
    return module.VectorQuantizer


def compare(ref: str, k: int, repeats: int) -> dict:
    """Wall-clock and CPU milliseconds per training step (forward, backward, EMA update) of this
    tree's quantizer and ``ref``'s, interleaved, on the same input and starting codebook."""
    from vqkit.nn.quantize import VectorQuantizer
    torch.manual_seed(0)
    z4 = torch.randn(N, D).t().reshape(1, D, 256, 256).requires_grad_()
    codebook = torch.randn(k, D)
    steps = {}
    for name, cls in (("this tree", VectorQuantizer), (ref, quantizer_at(ref))):
        q = cls(k, D, ema=True).train()
        q.codebook.copy_(codebook)
        q.ema_sum.copy_(codebook)

        def step(q=q):
            out = q(z4)
            (out.loss + out.z_q.sum()).backward()
        step()  # warm-up
        steps[name] = step
    times = {name: {"wall": [], "cpu": []} for name in steps}
    for repeat in range(repeats):
        # A B B A ...: whichever runs second in a pair finds the caches and allocator warmer.
        for name, step in sorted(steps.items(), reverse=repeat % 2 == 1):
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[name]["cpu"].append(1000 * (time.process_time() - cpu))
            times[name]["wall"].append(1000 * (time.perf_counter() - wall))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ks", type=int, nargs="+", default=[512, 8192])
    p.add_argument("--against", metavar="REF", help="time this tree's quantizer against git revision REF's")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case, args.k, args.repeats)))
        return
    if args.against:
        print(f"quantizer training step, N={N}, D={D}, {args.threads} threads, {args.repeats} "
              f"interleaved repeats: this tree against {args.against}")
        print(f"{'K':>5} {'clock':>5} {'this min':>9} {'ref min':>9} {'this med':>9} {'ref med':>9} "
              f"{'min ratio':>9} {'med ratio':>9}")
        for k in args.ks:
            ours, theirs = compare(args.against, k, args.repeats).values()
            for clock in ("wall", "cpu"):
                a, b = ours[clock], theirs[clock]
                print(f"{k:>5} {clock:>5} {min(a):>9.1f} {min(b):>9.1f} {statistics.median(a):>9.1f} "
                      f"{statistics.median(b):>9.1f} {min(a) / min(b):>9.3f} "
                      f"{statistics.median(a) / statistics.median(b):>9.3f}")
        return
    print(f"quantizer training step, N={N}, D={D}, {args.threads} threads, best of {args.repeats}")
    print(f"{'K':>5} {'case':>8} {'ms':>9} {'GFLOP/s':>8} {'peak MiB':>9} {'vs matmul':>9} {'vqkit speed-up':>14}")
    for k in args.ks:
        rows = {}
        for case in ("matmul", "vqkit", "plain", "one-hot"):
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats",
                   str(args.repeats), "--case", case, "--k", str(k)]
            rows[case] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        for case, r in rows.items():
            ratio = r["gflops"] / rows["matmul"]["gflops"]
            speedup = r["ms"] / rows["vqkit"]["ms"]
            print(f"{k:>5} {case:>8} {r['ms']:>9.1f} {r['gflops']:>8.1f} {r['peak_mib']:>9.0f} "
                  f"{ratio:>8.0%} {speedup:>13.2f}x")


if __name__ == "__main__":
    main()
