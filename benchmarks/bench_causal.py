"""Training step of the causal networks: ``CausalConv``'s 2-D convolutions against its taps' matmul.

``vqkit.nn.causal.CausalConv`` trains (train mode, gradients on) as one 2-D convolution per
rectangle of its kernel, and computes every other pass as the concatenated taps and one
matmul, the operations its incremental samplers repeat. Both compute the same layer; this times
one training step (forward, backward, Adam) of whole networks each way, side by side, the
networks in train mode and only their ``CausalConv`` modules switched to eval mode for the taps:

* the priors (gated PixelCNN and PixelSNAIL at their default sizes) on 7x7 maps, K = 256, batch
  64, and on 16x16 maps, K = 512, batch 32 (vqkit's Fashion-MNIST and CIFAR-10 code maps);
* the PixelCNN decoder's likelihood (``likelihood="pixelcnn"`` at its default sizes) on 28x28
  grey images, batch 32, given fixed conditioning features.

    python benchmarks/bench_causal.py [--threads 1] [--repeats 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from vqkit.nn.causal import CausalConv
from vqkit.nn.likelihood import make_likelihood
from vqkit.nn.presets import preset
from vqkit.prior import PriorConfig, build_prior


def _step_ms(model: torch.nn.Module, loss_fn, convolved: bool, repeats: int) -> float:
    """Median milliseconds of a training step of ``model`` (in train mode) with its causal
    convolutions as 2-D convolutions or, their own modules in eval mode, as the taps."""
    model.train()
    for module in model.modules():
        if isinstance(module, CausalConv):
            module.train(convolved)
    optimizer = torch.optim.Adam(model.parameters())
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:  # the first steps allocate
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); median ms per training step")
    print(f"{'network':<40} {'taps':>9} {'conv2d':>9} {'speed-up':>9}")
    cases = []
    for arch in ("pixelcnn", "pixelsnail"):
        for side, k, batch in ((7, 256, 64), (16, 512, 32)):
            config = PriorConfig(arch=arch, codebook_size=k, height=side, width=side)
            codes = torch.randint(k, (batch, side, side), generator=torch.Generator().manual_seed(0))
            cases.append((f"prior {arch} {side}x{side}, batch {batch}", lambda c=config: build_prior(c),
                          lambda m, x=codes: m.nll(x).mean()))
    g = torch.Generator().manual_seed(0)
    decoder = dataclasses.replace(preset("mnist"), likelihood="pixelcnn")
    images = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
    features = torch.randn(32, decoder.pixelcnn_channels, 28, 28, generator=g)
    cases.append(("PixelCNN decoder 28x28, batch 32", lambda: make_likelihood(decoder),
                  lambda m: m(features, images).loss))
    for name, build, loss in cases:
        ms = {}
        for mode, train_mode in (("taps", False), ("conv2d", True)):
            torch.manual_seed(0)
            model = build()
            ms[mode] = _step_ms(model, lambda m=model: loss(m), train_mode, args.repeats)
        print(f"{name:<40} {ms['taps']:>9.1f} {ms['conv2d']:>9.1f} {ms['taps'] / ms['conv2d']:>8.2f}x")


if __name__ == "__main__":
    main()
