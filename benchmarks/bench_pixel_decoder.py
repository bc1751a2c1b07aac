"""The PixelCNN likelihood's cost: sampling an image incrementally against naively, and a
training step beside the conv decoder's.

For a batch of --batch images of 3x32x32 (CIFAR-10's size), with the default PixelCNN sizes of
the model config (or those given), the seconds of:

  forward      one teacher-forced pass of the likelihood over the batch (no_grad): the floor
               for any sampler
  incremental  PixelCNNLikelihood.reconstruct(method="incremental"): cached per-layer state,
               one pixel per step
  naive        reconstruct(method="naive"): the whole network over the whole canvas per pixel
               (1,024 passes); both draw the same image (checked here)

and then the seconds of one training step (forward, backward, Adam) at batch 32 of a VQ-VAE
with a 8x8 latent map (downsample 2) with the ``pixelcnn`` likelihood beside the same model with
``logistic_mixture``, and the seconds the incremental sampler takes for a batch of 256 (one
batch of ``vqkit eval``'s reconstructions).

    OMP_NUM_THREADS=1 python benchmarks/bench_pixel_decoder.py [--layers 4] [--channels 32] [--kernel 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from vqkit.nn.likelihood import make_likelihood
from vqkit.nn.vqvae import VQVAE, VQVAEConfig


def _seconds(fn, repeats: int = 1) -> float:
    """Best of ``repeats`` runs: on a shared machine the fastest run is the least disturbed."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    defaults = VQVAEConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=defaults.pixelcnn_layers)
    parser.add_argument("--channels", type=int, default=defaults.pixelcnn_channels)
    parser.add_argument("--kernel", type=int, default=defaults.pixelcnn_kernel_size)
    parser.add_argument("--mixtures", type=int, default=defaults.mixtures)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = dict(pixelcnn_layers=args.layers, pixelcnn_channels=args.channels, pixelcnn_kernel_size=args.kernel,
                 mixtures=args.mixtures)
    lik = make_likelihood(VQVAEConfig(likelihood="pixelcnn", **sizes)).eval()
    params = torch.randn(args.batch, lik.decoder_channels, 32, 32)
    x = torch.rand(args.batch, 3, 32, 32) * 2 - 1

    with torch.no_grad():
        forward = _seconds(lambda: lik(params, x), 3)
    images = {}

    def draw(method):
        images[method] = lik.reconstruct(params, torch.Generator().manual_seed(0), method=method)

    incremental = _seconds(lambda: draw("incremental"), 2)
    naive = _seconds(lambda: draw("naive"))
    same = torch.equal(images["incremental"], images["naive"])
    print(f"PixelCNN likelihood: {args.layers} layers of {args.channels} channels, kernel {args.kernel}, "
          f"{args.mixtures} mixtures; batch {args.batch} of 3x32x32; {args.threads} thread(s)")
    print(f"  forward (teacher-forced)  {forward:8.3f} s")
    print(f"  incremental sampler       {incremental:8.2f} s")
    print(f"  naive sampler             {naive:8.2f} s   ({naive / incremental:.0f}x the incremental's; "
          f"same images: {same})")
    big = torch.randn(256, lik.decoder_channels, 32, 32)
    print(f"  incremental, batch 256    {_seconds(lambda: lik.reconstruct(big)):8.2f} s")

    batch = torch.rand(32, 3, 32, 32) * 2 - 1
    for likelihood in ("logistic_mixture", "pixelcnn"):
        extra = sizes if likelihood == "pixelcnn" else {"mixtures": args.mixtures}
        model = VQVAE(VQVAEConfig(hidden=64, res_hidden=32, downsample=2, likelihood=likelihood, **extra))
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def step():
            opt.zero_grad()
            model(batch).loss.backward()
            opt.step()

        step()
        print(f"  train step, batch 32, {likelihood:<16} {_seconds(step, 5):.3f} s")


if __name__ == "__main__":
    main()
