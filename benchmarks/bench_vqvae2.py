"""VQ-VAE-2 side by side with the popular PyTorch reproduction, rosinality/vq-vae-2-pytorch,
at its default sizes (hidden 128, 2 residual blocks of 32, code dim 64, K = 512; 32x32 top and
64x64 bottom maps at 256x256). The peer is imported from a checkout given by --peer (fetch it
yourself; nothing of it is copied into vqkit):

    git clone https://github.com/rosinality/vq-vae-2-pytorch /tmp/rosinality
    python benchmarks/bench_vqvae2.py --peer /tmp/rosinality [--part train|quality|sample|all]

train   stage-1 training images/s and peak memory (RSS above the process's own after imports),
        each configuration in its own subprocess: the peer as published (float32, its loss
        recon MSE + 0.25 latent loss, Adam), the peer under our number format (bf16 autocast +
        channels_last, to show where the difference comes from), vqkit in float32 and vqkit in
        its default placement (``precision=auto``). 256x256 at batch 4 and 64x64 at batch 16.
quality test PSNR after the same number of steps on the same batches (--data, --image-size,
        --quality-steps; default 64x64 faces, batch 16, Adam 3e-4 as the peer's train_vqvae.py):
        the peer as published against vqkit's vqvae2-256 (same architecture, same EMA codebooks,
        no k-means or restarts) in its default placement, so a faster number format must not
        cost quality.
sample  seconds to sample a batch of 8 images at 256x256: top prior (32x32, PixelSNAIL with
        attention), bottom prior conditioned on the top map (64x64, no attention), decode.
        The peer's priors are its defaults (channel 256, 4 blocks of 4 residual blocks of 256,
        kernel 5, 8 heads, 3 conditioning residual blocks); ours have the same channels, kernel,
        heads and conditioning depth with --layers gated residual blocks (attention every 4 on
        top); the default 32 makes a forward pass cost about as much as the peer's, whose blocks
        hold two convolutions each. The peer's sampler re-runs the network on all rows so far for every position, so
        its time per position grows linearly with the row: a few positions at two rows are
        timed and the whole map is extrapolated (marked ~). Also one teacher-forced forward pass
        of each prior, the floor for any sampler. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqkit.data.datasets import load_dataset, to_model
from vqkit.nn.presets import preset
from vqkit.nn.vqvae import build_model
from vqkit.precision import Placement, autocast, prepare_input, prepare_model, resolve
from vqkit.prior import PriorConfig, build_prior, sample
from vqkit.runs.checkpoint import load_model
from vqkit.training.evaluate import evaluate
from vqkit.training.loop import batch_indices
from vqkit.training.stage1 import TrainConfig, train

K, N_SAMPLES = 512, 8


def _like_the_peer():
    """vqvae2-256 trained as the peer trains: every level every batch, no per-prefix losses
    (the preset's prefix decoders cost vqkit about 1.05x a step: 446 against 426 ms, batch 4, 1 thread)."""
    return dataclasses.replace(preset("vqvae2-256"), prefix_training="off")


def _peer(path: str):
    sys.path.insert(0, path)
    import pixelsnail  # noqa: F401  (the peer's modules, from its checkout)
    import vqvae
    return vqvae, pixelsnail


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def conv_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the (transposed) convolutions in one forward pass of ``x``."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += inputs[0].numel() * module.out_channels // module.groups * k
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()(x)
    for h in handles:
        h.remove()
    return total


def train_child(args) -> dict:
    """One configuration's training speed and memory, in this (child) process."""
    torch.manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.impl.startswith("peer"):
        vqvae, _ = _peer(args.peer)
        model = vqvae.VQVAE()

        def loss_of(m, x):
            recon, latent_loss = m(x)
            return (recon.float() - x).pow(2).mean() + 0.25 * latent_loss.mean()
        bf16 = args.impl == "peer-bf16"
        placement = Placement(torch.device("cpu"), bf16=bf16, channels_last=bf16)
    else:
        model = build_model(_like_the_peer())
        loss_of = lambda m, x: m(x).loss  # noqa: E731
        placement = resolve("cpu", "fp32" if args.impl == "vqkit-fp32" else "auto")
    macs = conv_macs(model, torch.zeros(1, 3, args.size, args.size))
    prepare_model(model.train(), placement)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    x = prepare_input(torch.rand(args.batch, 3, args.size, args.size) * 2 - 1, placement)

    def step():
        with autocast(placement):
            loss = loss_of(model, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    best = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        best = min(best, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images_per_s": args.steps * args.batch / best, "peak_mib": (peak - base_rss) / 1024,
            "params": _params(model), "gmacs": macs / 1e9, "placement": placement.describe()}


def bench_train(args) -> None:
    """Every configuration runs ``--repeats`` times, interleaved, in fresh subprocesses; the
    fastest run of each is kept (on a shared machine it is the least disturbed one)."""
    print(f"\nstage-1 training, {args.threads} threads (best of {args.repeats} processes x {args.rounds} rounds)")
    print(f"{'image':>7} {'batch':>5}  {'implementation':<44} {'images/s':>9} {'vs peer':>8} {'peak MiB':>9} "
          f"{'params':>10} {'GMAC/image':>11}")
    impls = (("peer", "rosinality (fp32, as published)"),
             ("peer-bf16", "rosinality + bf16 autocast + channels_last"),
             ("vqkit-fp32", "vqkit fp32"), ("vqkit", "vqkit default (precision=auto)"))
    for size, batch, steps in ((256, 4, 3), (64, 16, 8)):
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for impl, _ in impls:
                cmd = [sys.executable, __file__, "--child", "train", "--impl", impl, "--peer", args.peer,
                       "--size", str(size), "--batch", str(batch), "--steps", str(steps),
                       "--rounds", str(args.rounds), "--threads", str(args.threads)]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                if impl not in best or r["images_per_s"] > best[impl]["images_per_s"]:
                    best[impl] = r
        for impl, label in impls:
            r = best[impl]
            print(f"{size:>4}px {batch:>5}  {label:<44} {r['images_per_s']:>9.1f} "
                  f"{r['images_per_s'] / best['peer']['images_per_s']:>7.2f}x {r['peak_mib']:>9.0f} "
                  f"{r['params']:>10,} {r['gmacs']:>11.2f}", flush=True)


def bench_quality(args) -> None:
    train_set = load_dataset(args.data, "train", image_size=args.image_size)
    test_set = load_dataset(args.data, "test", image_size=args.image_size)
    steps, batch = args.quality_steps, 16
    print(f"\nquality: {args.data} at {args.image_size}x{args.image_size}, {steps} steps of batch {batch}, "
          f"Adam 3e-4, test PSNR on {len(test_set)} images")

    vqvae, _ = _peer(args.peer)
    torch.manual_seed(0)
    peer = vqvae.VQVAE().train()
    optimizer = torch.optim.Adam(peer.parameters(), lr=3e-4)
    start = time.perf_counter()
    for step in range(steps):
        x = to_model(train_set.batch(batch_indices(step, len(train_set), batch, 0))[0])
        recon, latent_loss = peer(x)
        loss = (recon - x).pow(2).mean() + 0.25 * latent_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peer_seconds = time.perf_counter() - start
    peer.eval()
    squared, count = 0.0, 0
    used_top, used_bottom = set(), set()
    with torch.no_grad():
        for i in range(0, len(test_set), 100):
            images = test_set.batch(torch.arange(i, min(i + 100, len(test_set))))[0]
            quant_t, quant_b, _, id_t, id_b = peer.encode(to_model(images))
            recon = peer.decode(quant_t, quant_b).clamp(-1, 1)
            used_top.update(id_t.unique().tolist())
            used_bottom.update(id_b.unique().tolist())
            squared += float(((recon + 1) / 2 - images.float() / 255).pow(2).sum())
            count += images.numel()
    peer_psnr = 10 * math.log10(1 / (squared / count))

    print(f"{'rosinality (fp32)':<34} {peer_psnr:>6.2f} dB   {peer_seconds:>6.0f} s   "
          f"codes used: top {len(used_top)}/{K}, bottom {len(used_bottom)}/{K}", flush=True)
    for precision, label in (("fp32", "vqkit fp32"), ("auto", "vqkit default (precision=auto)")):
        with tempfile.TemporaryDirectory() as tmp:
            result = train(Path(tmp) / "run", _like_the_peer(),
                           TrainConfig(data=args.data, steps=steps, batch_size=batch, lr=3e-4, seed=0,
                                       image_size=args.image_size, checkpoint_every=10**9, precision=precision),
                           dataset=train_set, progress=False, tensorboard=False)
            ours = evaluate(load_model(Path(tmp) / "run")[0], test_set, progress=False)
        print(f"{label:<34} {ours.psnr:>6.2f} dB   {result.seconds:>6.0f} s   codes used: "
              f"{', '.join(f'{lv.name} {lv.codes_used}/{lv.codebook_size}' for lv in ours.levels)}", flush=True)


@torch.no_grad()
def _peer_sampling_seconds(model, height: int, width: int, condition, positions: int) -> float:
    """The peer's sampler (its sample.py loop body: the network on rows 0..i for position
    (i, j)) timed on ``positions`` positions of row 0 and of row ``height // 4``, then
    extrapolated over the map, where position (i, j) costs ``a + b * (i + 1)``."""
    def per_position(row: int) -> float:
        codes = torch.zeros(N_SAMPLES, height, width, dtype=torch.long)
        cache = {}
        model(codes[:, :row + 1, :], condition=condition, cache=cache)  # warm-up, fills the cache
        start = time.perf_counter()
        for j in range(positions):
            out, cache = model(codes[:, :row + 1, :], condition=condition, cache=cache)
            probs = torch.softmax(out[:, :, row, j], 1)
            codes[:, row, j] = torch.multinomial(probs, 1).squeeze(-1)
        return (time.perf_counter() - start) / positions

    far = height // 4
    t0, t1 = per_position(0), per_position(far)
    b = max((t1 - t0) / far, 0.0)
    a = t0 - b
    return width * sum(a + b * (i + 1) for i in range(height))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def bench_sample(args) -> None:
    _, pixelsnail = _peer(args.peer)
    torch.manual_seed(0)
    peer_top = pixelsnail.PixelSNAIL([32, 32], K, 256, 5, 4, 4, 256, dropout=0.1).eval()
    peer_bottom = pixelsnail.PixelSNAIL([64, 64], K, 256, 5, 4, 4, 256, attention=False, dropout=0.1,
                                        n_cond_res_block=3, cond_res_channel=256).eval()
    common = dict(arch="pixelsnail", codebook_size=K, channels=256, layers=args.layers, kernel_size=5,
                  attention_heads=8)
    top = build_prior(PriorConfig(height=32, width=32, attention_every=4, **common)).eval()
    bottom = build_prior(PriorConfig(height=64, width=64, attention_every=args.layers + 1,
                                     cond_codes=[[K, 32, 32]], cond_layers=3, **common)).eval()
    stage1 = build_model(preset("vqvae2-256")).eval()
    top_codes = torch.randint(K, (N_SAMPLES, 32, 32))
    bottom_codes = torch.randint(K, (N_SAMPLES, 64, 64))

    print(f"\nsampling {N_SAMPLES} images at 256x256, {args.threads} threads")
    print(f"{'':<10} {'params top':>11} {'params bottom':>14} {'forward top':>12} {'forward bottom':>15}")
    peer_fwd = (_seconds(lambda: peer_top(top_codes)), _seconds(lambda: peer_bottom(bottom_codes, condition=top_codes)))
    ours_fwd = (_seconds(lambda: top(top_codes)), _seconds(lambda: bottom(bottom_codes, cond_codes=[top_codes])))
    for name, (t, b), (ft, fb) in (("rosinality", (peer_top, peer_bottom), peer_fwd),
                                   ("vqkit", (top, bottom), ours_fwd)):
        print(f"{name:<10} {_params(t):>11,} {_params(b):>14,} {ft:>11.2f}s {fb:>14.2f}s", flush=True)

    peer_t = _peer_sampling_seconds(peer_top, 32, 32, None, args.peer_positions)
    peer_b = _peer_sampling_seconds(peer_bottom, 64, 64, top_codes, args.peer_positions)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    drawn_top = sample(top, N_SAMPLES, generator=g)
    ours_t = time.perf_counter() - start
    drawn_bottom = sample(bottom, N_SAMPLES, cond_codes=[drawn_top], generator=g)
    ours_b = time.perf_counter() - start - ours_t
    decode = _seconds(lambda: stage1.decode([drawn_top, drawn_bottom]))
    peer_total = peer_t + peer_b + decode
    ours_total = ours_t + ours_b + decode
    print(f"{'':<10} {'top':>10} {'bottom':>10} {'decode':>8} {'total':>10}")
    print(f"{'rosinality':<10} {'~':>1}{peer_t:>8.0f}s {'~':>1}{peer_b:>8.0f}s {decode:>7.2f}s "
          f"{'~':>1}{peer_total:>8.0f}s  ({peer_total / 3600:.1f} h)")
    print(f"{'vqkit':<10} {ours_t:>9.1f}s {ours_b:>9.1f}s {decode:>7.2f}s {ours_total:>9.1f}s  "
          f"({ours_total / 60:.1f} min)")
    print(f"vqkit is {peer_total / ours_total:.0f}x faster; its sampler takes "
          f"{(ours_t + ours_b) / sum(ours_fwd):.1f}x one forward pass of its priors "
          f"(the peer's: {(peer_t + peer_b) / sum(peer_fwd):.0f}x of its own)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, help="checkout of rosinality/vq-vae-2-pytorch")
    p.add_argument("--part", choices=["train", "quality", "sample", "all"], default="all")
    p.add_argument("--data", default="folder:../shared/data/faces", help="data for the quality part")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--quality-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds inside each training process")
    p.add_argument("--repeats", type=int, default=3, help="processes per training configuration")
    p.add_argument("--layers", type=int, default=32,
                   help="gated residual blocks of our priors (32: a forward pass costs about the peer's)")
    p.add_argument("--peer-positions", type=int, default=4, help="positions timed per row for the peer")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child == "train":
        print(json.dumps(train_child(args)))
        return
    print(f"torch {torch.__version__}; peer: {args.peer}")
    if args.part in ("train", "all"):
        bench_train(args)
    if args.part in ("quality", "all"):
        bench_quality(args)
    if args.part in ("sample", "all"):
        bench_sample(args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
