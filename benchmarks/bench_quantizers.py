"""Every quantizer variant beside lucidrains' vector-quantize-pytorch doing the same maths: one
training step (forward, backward, and the EMA update where there is one) at N=65536, D=64.

Variants (vqkit / vector-quantize-pytorch):
  vq          VectorQuantizer(ema=True)                  / VectorQuantize(rotation_trick=False)
  vq-cosine   VectorQuantizer(ema=True, cosine=True)     / VectorQuantize(use_cosine_sim=True, ...)
  vq-factor8  VectorQuantizer(ema=True, factor_dim=8)    / VectorQuantize(codebook_dim=8, ...)
  vq-rotation VectorQuantizer(ema=True, rotation=True)   / VectorQuantize(rotation_trick=True)
  fsq         FSQ(levels, 64)                            / FSQ(levels=levels, dim=64)
  lfq         LFQ(bits, 64, temperature=0.01)            / LFQ(dim=64, codebook_size=2**bits,
                                                             commitment_loss_weight=0.25)
Both sides: EMA decay 0.99, commitment 0.25, no k-means, no dead-code restarts; LFQ's entropy
weight 0.1, diversity 1, temperature 0.01 (vector-quantize-pytorch's inverse temperature 100).

The step's loss is the quantizer's own plus ``<z_q, G>`` for a fixed random G, the gradient
a decoder would send back. Each case runs in its own subprocess (so memory peaks do not mix): the time is the best of
``--repeats`` steps after one warm-up; the memory the peak of the tensors alive at once during
one more step (torch's profiler: allocations and frees in time order, the inputs and the module
excluded), which the ratio compares, and in brackets the growth of the process's peak RSS over
all the steps (allocator and library buffers included, noisy at tens of MiB).
vector-quantize-pytorch is never a vqkit dependency: install it in an environment of its own
and name that interpreter with ``--peer-python`` (default: this one); where it cannot be
imported its column says so and the rest still runs.

    python -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch==2.13.0 \\
        && /work/bench-venv/bin/pip install vector-quantize-pytorch
    OMP_NUM_THREADS=1 python benchmarks/bench_quantizers.py --threads 1 --peer-python /work/bench-venv/bin/python
    ... --interleave --variants fsq --repeats 30     # both in one process, steps alternated
    ... --device cuda --variants vq --chunk-elements 20 22 24 26   # vqkit's block size, 2^20..2^26
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

N, D = 65536, 64
ROOT = Path(__file__).resolve().parent.parent

# name -> (vqkit keywords, vector-quantize-pytorch keywords, K values or levels/bits to run)
VARIANTS = {
    "vq": ({}, {}, [512, 2048]),
    "vq-cosine": ({"cosine": True}, {"use_cosine_sim": True}, [512, 2048]),
    "vq-factor8": ({"factor_dim": 8}, {"codebook_dim": 8}, [512, 2048]),
    "vq-rotation": ({"rotation": True}, {"rotation_trick": True}, [512, 2048]),
    "fsq": ({}, {}, [[8, 5, 5, 5], [8, 8, 8, 5, 5, 5]]),
    "lfq": ({}, {}, [10, 12]),
}


def build(impl: str, variant: str, size):
    """The module and its training step for one case."""
    ours, theirs, _ = VARIANTS[variant]
    if impl == "vqkit":
        sys.path.insert(0, str(ROOT))
        from vqkit.nn.quantize import VectorQuantizer
        from vqkit.nn.scalar import FSQ, LFQ
        if variant == "fsq":
            q = FSQ(size, D, channel_dim=-1)
        elif variant == "lfq":
            q = LFQ(size, D, temperature=0.01, channel_dim=-1)  # theirs, for equal maths
        else:
            q = VectorQuantizer(size, D, ema=True, decay=0.99, channel_dim=-1, **ours)

        def step(z, upstream):
            out = q(z)
            torch.autograd.backward([out.loss, out.z_q], [None, upstream])
    else:
        import vector_quantize_pytorch as vqp
        if variant == "fsq":
            q = vqp.FSQ(levels=size, dim=D)

            def step(z, upstream):
                z_q, _ = q(z)
                z_q.backward(upstream)
            return q.train(), step
        if variant == "lfq":
            q = vqp.LFQ(dim=D, codebook_size=2 ** size, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                        diversity_gamma=1.0)
        else:
            q = vqp.VectorQuantize(dim=D, codebook_size=size, decay=0.99, commitment_weight=0.25,
                                   **{"rotation_trick": False, **theirs})

        def step(z, upstream):
            z_q, _, loss = q(z)
            torch.autograd.backward([loss.sum(), z_q], [None, upstream])
    return q.train(), step


def run_case(impl: str, variant: str, size, repeats: int, device: str = "cpu",
             chunk_log2: int | None = None) -> dict:
    if chunk_log2 is not None:
        sys.path.insert(0, str(ROOT))
        from vqkit.nn import quantize
        quantize._CHUNK_ELEMENTS = 1 << chunk_log2  # the distance block, tuned for a CPU's cache
    torch.manual_seed(0)
    q, step = build(impl, variant, size)
    q.to(device)
    z = torch.randn(1, N, D, device=device, requires_grad=True)  # (B, N, D), channels last on both sides
    upstream = torch.randn(1, N, D, device=device)  # the decoder's gradient w.r.t. z_q
    cuda = z.device.type == "cuda"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(z, upstream)  # warm-up
    times = []
    for _ in range(repeats):
        z.grad = None
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(z, upstream)
        if cuda:
            torch.cuda.synchronize()  # the kernels are asynchronous: wait for the step's last one
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    z.grad = None
    tensors = peak_cuda_bytes(lambda: step(z, upstream)) if cuda else peak_tensor_bytes(lambda: step(z, upstream))
    return {"ms": 1000 * min(times), "tensor_mib": tensors / 2 ** 20, "rss_mib": max(peak - base, 0) / 1024}


def peak_cuda_bytes(fn) -> int:
    """The most bytes of CUDA tensors alive at once while ``fn`` runs, those alive before excluded
    (the caching allocator's own peak counter, which sees every allocation on the device)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_tensor_bytes(fn) -> int:
    """The most bytes of tensors alive at once while ``fn`` runs, those alive before excluded: the
    running sum of the allocations and frees that torch's profiler records, in time order."""
    from torch.profiler import profile
    with profile(profile_memory=True) as prof:
        fn()
    total = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.self_cpu_memory_usage
        peak = max(peak, total)
    return peak


def run_interleaved(variant: str, size, repeats: int, device: str = "cpu") -> dict:
    """Both implementations in one process, their steps alternated (A B B A ...) on one input, so
    that the drift of a shared machine falls on both alike: min and median milliseconds."""
    torch.manual_seed(0)
    steps = {}
    for impl in ("vqkit", "lucidrains"):
        q, steps[impl] = build(impl, variant, size)
        q.to(device)
    z = torch.randn(1, N, D, device=device, requires_grad=True)
    upstream = torch.randn(1, N, D, device=device)
    sync = torch.cuda.synchronize if z.device.type == "cuda" else lambda: None
    for step in steps.values():
        step(z, upstream)  # warm-up
    times = {impl: [] for impl in steps}
    for repeat in range(repeats):
        for impl, step in sorted(steps.items(), reverse=repeat % 2 == 1):
            z.grad = None
            sync()
            t = time.perf_counter()
            step(z, upstream)
            sync()
            times[impl].append(1000 * (time.perf_counter() - t))
    return {impl: {"min": min(t), "median": statistics.median(t)} for impl, t in times.items()}


def label(variant: str, size) -> str:
    if variant == "fsq":
        import math
        return f"fsq {size} (K={math.prod(size)})"
    if variant == "lfq":
        return f"lfq {size} bits (K={2 ** size})"
    return f"{variant} K={size}"


def measure(python: str, impl: str, variant: str, size, args, chunk_log2: int | None = None) -> dict | str:
    """One case in a subprocess of ``python``: its figures, or why there are none."""
    cmd = [python, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--device", args.device, "--case", json.dumps([impl, variant, size, chunk_log2])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return "not importable" if "No module named 'vector_quantize_pytorch'" in done.stderr else last[:60]
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep_chunks(args) -> None:
    """vqkit's VQ variants with each distance block size: time and peak tensors per size."""
    print("| variant | " + " | ".join(f"2^{c} elements" for c in args.chunk_elements) + " |")
    print("| --- |" + " --- |" * len(args.chunk_elements))
    for variant in (v for v in args.variants if v.startswith("vq")):
        for size in VARIANTS[variant][2]:
            cells = []
            for chunk_log2 in args.chunk_elements:
                r = measure(sys.executable, "vqkit", variant, size, args, chunk_log2)
                cells.append(r if isinstance(r, str) else f"{r['ms']:,.1f} ms, {r['tensor_mib']:,.0f} MiB")
            print(f"| {label(variant, size)} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer-python", default=sys.executable,
                   help="the interpreter that has vector-quantize-pytorch (default: this one)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--vq-ks", type=int, nargs="+", help="codebook sizes for the vq variants (default 512 2048)")
    p.add_argument("--chunk-elements", type=int, nargs="+", metavar="LOG2",
                   help="instead of the peer, time vqkit's VQ variants with distance blocks of 2^LOG2 "
                        "elements each (the constant _CHUNK_ELEMENTS, 2^20, was measured on CPUs)")
    p.add_argument("--interleave", action="store_true",
                   help="time both implementations in one process of --peer-python, steps alternated "
                        "(steadier ratios on a busy machine; no memory figures)")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda; on CUDA the memory is the caching allocator's peak, not RSS")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--ab-case", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.vq_ks:
        for variant, (ours, theirs, _) in VARIANTS.items():
            if variant.startswith("vq"):
                VARIANTS[variant] = (ours, theirs, args.vq_ks)
    if args.case:
        impl, variant, size, chunk_log2 = json.loads(args.case)
        print(json.dumps(run_case(impl, variant, size, args.repeats, args.device, chunk_log2)))
        return
    if args.ab_case:
        print(json.dumps(run_interleaved(*json.loads(args.ab_case), args.repeats, args.device)))
        return
    if args.interleave:
        print(f"one training step, N={N}, D={D}, {args.device}, {args.threads} thread(s), {args.repeats} "
              f"alternated repeats in one process; torch {torch.__version__}")
        print("| variant | vqkit min / median | vector-quantize-pytorch min / median | speed-up (min, median) |")
        print("| --- | --- | --- | --- |")
        for variant in args.variants:
            for size in VARIANTS[variant][2]:
                cmd = [args.peer_python, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
                       "--device", args.device, "--ab-case", json.dumps([variant, size])]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(f"| {label(variant, size)} | {(done.stderr.strip().splitlines() or ['failed'])[-1][:60]} |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                ours, theirs = r["vqkit"], r["lucidrains"]
                print(f"| {label(variant, size)} | {ours['min']:,.1f} / {ours['median']:,.1f} ms | "
                      f"{theirs['min']:,.1f} / {theirs['median']:,.1f} ms | {theirs['min'] / ours['min']:.1f}x, "
                      f"{theirs['median'] / ours['median']:.1f}x |", flush=True)
        return
    print(f"one training step (forward + backward + EMA), N={N}, D={D}, {args.device}, {args.threads} "
          f"thread(s), best of {args.repeats}; torch {torch.__version__}")
    if args.chunk_elements:
        sweep_chunks(args)
        return
    print("| variant | vqkit: time, peak tensors (RSS growth) | vector-quantize-pytorch | speed-up | memory |")
    print("| --- | --- | --- | --- | --- |")
    for variant in args.variants:
        for size in VARIANTS[variant][2]:
            ours = measure(sys.executable, "vqkit", variant, size, args)
            theirs = measure(args.peer_python, "lucidrains", variant, size, args)

            def cell(r):
                return r if isinstance(r, str) else \
                    f"{r['ms']:,.0f} ms, {r['tensor_mib']:,.0f} MiB ({r['rss_mib']:,.0f} MiB RSS)"
            both = not isinstance(ours, str) and not isinstance(theirs, str)
            speed = f"{theirs['ms'] / ours['ms']:.1f}x" if both else "-"
            memory = f"1/{theirs['tensor_mib'] / ours['tensor_mib']:.1f}" if both else "-"
            print(f"| {label(variant, size)} | {cell(ours)} | {cell(theirs)} | {speed} | {memory} |", flush=True)


if __name__ == "__main__":
    main()
