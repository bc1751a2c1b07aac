"""Images/s delivered by each way of reading a folder set, beside what a training step consumes,
and the resident memory of training from a prepared set larger than the machine's memory.

On the CelebA faces (2,000 JPEGs of 178x218), for each image size:

* ``prepare``: decoding, cropping and resizing the folder once into a prepared set (all CPUs).
* reading the training batches of 64 in their seeded order (``loop.batch_indices``), by:
  decoding each file in the training process; ``DataLoader`` workers; the prepared set (pread);
  the set decoded into memory. The ratio is to decoding per item.
* the ``faces-3level`` training step's images/s at that size (batch 16), and the steps/s of
  ``vqkit train``'s loop (checkpoints included) reading from memory, from the prepared set,
  and from the folder with and without workers (the same steps, each alternated twice).

Then (``--big``) the faces resized up to ``--big`` pixels into a prepared set larger than the
free memory; then, for it and for a set of only its first 100 images, each in a process of its
own, one epoch read in its seeded batches of 8 and a small model trained: the peak resident
memory of the two shows whether it depends on the set's size.

    python benchmarks/bench_data.py --faces ../shared/data/faces --work /tmp/vqkit-bench-data \\
        [--sizes 128 256] [--big 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vqkit.data.datasets import in_memory, load_dataset
from vqkit.data.loader import default_workers, read_ahead, usable_cpus
from vqkit.data.prepared import prepare
from vqkit.nn.presets import preset
from vqkit.nn.vqvae import VQVAE, VQVAEConfig
from vqkit.training.loop import step_indices
from vqkit.training.stage1 import TrainConfig, train

BATCH = 64
# The model trained on the large set: small, so that its activations, not the data, are what
# it holds; stride 2^4 keeps a 2048x2048 image's code map at 128x128.
SMALL = VQVAEConfig(in_channels=3, hidden=16, res_hidden=8, num_res_blocks=1, code_dim=8, downsample=4,
                    codebook_size=64)


def read_rate(dataset, batches: int, workers: int) -> float:
    """Images/s of the first ``batches`` training batches of ``BATCH``, read with ``workers``."""
    indices = step_indices(len(dataset), BATCH, seed=0)
    start = time.perf_counter()
    count = sum(len(x) for x, _ in read_ahead(dataset, indices, range(batches), workers=workers))
    return count / (time.perf_counter() - start)


def step_rate(size: int, steps: int) -> float:
    """Images/s of the faces-3level training step (batch 16) on random images of ``size``."""
    torch.manual_seed(0)
    model = VQVAE(preset("faces-3level"))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    x = torch.rand(16, 3, size, size) * 2 - 1

    def step():
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * 16 / (time.perf_counter() - start)


def train_rate(run: Path, dataset, steps: int, workers: int = 0) -> float:
    """Steps/s of ``vqkit train``'s loop (faces-3level, batch 16) on ``dataset`` as it is (a
    folder set is not decoded into memory first)."""
    shutil.rmtree(run, ignore_errors=True)
    config = TrainConfig(data=dataset.spec, steps=steps, batch_size=16, checkpoint_every=10**6, workers=workers,
                         in_memory_gib=0)
    result = train(run, preset("faces-3level"), config, dataset=dataset, progress=False, tensorboard=False)
    return steps / result.seconds


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: a child started by
    fork/vfork and exec inherits its parent's high-water mark there."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child_train(spec: str, run: Path, steps: int) -> None:
    """In a process of its own: train ``SMALL`` on ``spec`` and print the peak resident memory."""
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    config = TrainConfig(data=spec, steps=steps, batch_size=2, checkpoint_every=10**6)
    train(run, SMALL, config, progress=False, tensorboard=False)
    print(json.dumps({"peak_mib": peak_rss_mib(), "s_per_step": (time.perf_counter() - start) / steps}))


def child_read(spec: str) -> None:
    """In a process of its own: read one epoch of ``spec`` in its seeded batches of 8; print the
    images/s and the peak resident memory."""
    dataset = load_dataset(spec, "train")
    indices = step_indices(len(dataset), 8, seed=0)
    start = time.perf_counter()
    count = sum(len(x) for x, _ in read_ahead(dataset, indices, range(len(dataset) // 8), workers=0))
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mib": peak_rss_mib(), "images_per_s": count / seconds,
                      "gib_per_s": count * dataset.channels * dataset.height * dataset.width / seconds / 2**30}))


def child(args: list[str]) -> dict:
    """Run this script with ``args`` in a new process; its last line of output, as JSON."""
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faces", type=Path, default=Path("../shared/data/faces"))
    p.add_argument("--work", type=Path, default=Path("/tmp/vqkit-bench-data"))
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batches", type=int, default=20, help="training batches of 64 read per path")
    p.add_argument("--steps", type=int, default=20, help="training steps per speed measurement")
    p.add_argument("--big", type=int, help="also prepare the faces at this side (2048: 25 GB) and train from it")
    p.add_argument("--big-steps", type=int, default=10, help="training steps on the large set")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the prepared sets in --work")
    p.add_argument("--reuse-big", action="store_true",
                   help="only the large part, on the set that an earlier --keep run left in --work")
    p.add_argument("--child-train", nargs=3, metavar=("SPEC", "RUN", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--child-read", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_train:
        spec, run, steps = args.child_train
        return child_train(spec, Path(run), int(steps))
    if args.child_read:
        return child_read(args.child_read)

    args.work.mkdir(parents=True, exist_ok=True)
    folder = f"folder:{args.faces}"
    cpus = usable_cpus()
    print(f"torch {torch.__version__}, {args.threads} threads, {cpus} CPUs ({default_workers()} workers by default "
          f"for a model on a GPU, none on the CPU); batches of {BATCH} in the seeded training order")
    for size in [] if args.reuse_big else args.sizes:
        out = args.work / f"faces-{size}"
        result = prepare(folder, out, image_size=size, overwrite=True)
        n = sum(result.counts.values())
        print(f"\n## {size}x{size}: prepare {n} images in {result.seconds:.1f} s "
              f"({n / result.seconds:.0f} images/s, {cpus} processes), "
              f"{(out / 'images.npy').stat().st_size / 2**20:.0f} MiB")
        lazy = load_dataset(folder, "train", image_size=size)
        ready = load_dataset(f"prepared:{out}", "train")
        memory = in_memory(lazy, 1 << 40)
        rates = {"decode per item": read_rate(lazy, args.batches, 0)}
        for w in sorted({1, default_workers(), cpus}):
            rates[f"{w} worker{'s' * (w > 1)}"] = read_rate(lazy, args.batches, w)
        rates["prepared set"] = read_rate(ready, args.batches * 5, 0)
        rates["in memory"] = read_rate(memory, args.batches * 5, 0)
        base = rates["decode per item"]
        print("| path | images/s | x decode per item |\n|---|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:,.0f} | {rate / base:.1f} |")
        print(f"| training step consumes (faces-3level, batch 16) | {step_rate(size, args.steps):,.1f} | |")
        ways = {"from memory": (memory, 0), "from the prepared set": (ready, 0),
                "from the folder, decoding per item": (lazy, 0),
                f"from the folder, {default_workers()} worker(s)": (lazy, default_workers())}
        rates = {name: [] for name in ways}
        for _ in range(2):
            for name, (dataset, workers) in ways.items():
                rates[name].append(train_rate(args.work / "run", dataset, args.steps, workers))
        base = statistics.mean(rates["from memory"])
        print("| vqkit train (faces-3level, batch 16) | steps/s | x from memory |\n|---|---|---|")
        for name, values in rates.items():
            print(f"| {name} | {statistics.mean(values):.3f} | {statistics.mean(values) / base:.3f} |")

    if args.big:
        out = args.work / f"faces-{args.big}"
        print(f"\n## {args.big}x{args.big}, free memory {free_gib():.1f} GiB")
        if args.reuse_big and (out / "manifest.json").exists():
            n = len(load_dataset(f"prepared:{out}", "all", image_size=args.big))
            print(f"(reusing the {n} images prepared in {out} by an earlier --keep run)")
        else:
            result = prepare(folder, out, image_size=args.big, overwrite=True, progress=True)
            n = sum(result.counts.values())
            print(f"prepare {n} images in {result.seconds:.0f} s ({n / result.seconds:.1f} images/s)")
        size_gib = (out / "images.npy").stat().st_size / 2**30
        print(f"the set: {size_gib:.1f} GiB")
        few = args.work / "faces-first100"
        shutil.rmtree(few, ignore_errors=True)
        few.mkdir()
        for path in sorted(args.faces.glob("*.jpg"))[:100]:
            (few / path.name).symlink_to(path.resolve())
        small = args.work / f"faces-{args.big}-first100"
        prepare(f"folder:{few}", small, image_size=args.big, overwrite=True)
        for name, spec in ((f"first 100 ({(small / 'images.npy').stat().st_size / 2**30:.1f} GiB)",
                            f"prepared:{small}"), (f"all {n} ({size_gib:.1f} GiB)", f"prepared:{out}")):
            read = child(["--threads", str(args.threads), "--child-read", spec])
            print(f"read one epoch of {name} in batches of 8: {read['images_per_s']:.1f} images/s "
                  f"({read['gib_per_s']:.2f} GiB/s), peak resident memory {read['peak_mib']:,.0f} MiB")
            trained = child(["--threads", str(args.threads), "--child-train", spec, str(args.work / "run-big"),
                             str(args.big_steps)])
            print(f"train from {name}: peak resident memory {trained['peak_mib']:,.0f} MiB, "
                  f"{trained['s_per_step']:.1f} s per step of 2 images")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
