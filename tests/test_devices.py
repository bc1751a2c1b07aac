"""The same behaviour on every device present: the nearest-code search, a bf16 training step and
sampling. Each case runs on the CPU, and on CUDA where it is there (benchmarks/gpu_check.sh runs
the suite on a lent GPU); CI has no GPU, so there the CUDA cases are skipped."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY2

from vqkit.nn.quantize import VectorQuantizer, nearest_codes
from vqkit.nn.vqvae import build_model
from vqkit.precision import Placement, autocast, prepare_input, prepare_model
from vqkit.prior import PriorConfig, build_prior, sample

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [100, 700])  # the plain and the grouped search
def test_nearest_codes_are_the_nearest_up_to_float32_ties(device, k):
    g = torch.Generator().manual_seed(k)
    z, codebook = torch.randn(5000, 16, generator=g), torch.randn(k, 16, generator=g)
    codes = nearest_codes(z.to(device), codebook.to(device)).cpu()
    distances = torch.cdist(z.double(), codebook.double()).square()  # (N, K), exact enough
    best = distances.min(1).values
    chosen = distances.gather(1, codes[:, None])[:, 0]
    # float32 distances from ||z||^2 - 2 z.e + ||e||^2 can swap two codes nearer than their rounding.
    assert torch.all(chosen - best <= 1e-4 * (1 + best))
    assert (codes == distances.argmin(1)).float().mean() > 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_step_trains_the_encoders_and_keeps_the_codebook_in_float32(device):
    torch.manual_seed(0)
    placement = Placement(device=torch.device(device), bf16=True, channels_last=True)
    model = prepare_model(build_model(TINY2), placement).train()
    x = prepare_input(torch.rand(4, 1, 28, 28) * 2 - 1, placement)
    with autocast(placement):
        loss = model(x).loss
    loss.backward()
    assert torch.isfinite(loss)
    grad = model.encoders[-1].net[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    for q in model.quantizers:
        if isinstance(q, VectorQuantizer):
            assert q.codebook.dtype == q.ema_sum.dtype == q.ema_count.dtype == torch.float32
            assert q.codebook.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_takes_labels_and_maps_from_the_cpu_and_repeats_with_the_seed(device):
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(arch="pixelsnail", codebook_size=11, height=4, width=4, channels=16, layers=2,
                                    attention_heads=2, attention_every=2, num_classes=3,
                                    cond_codes=[[5, 2, 2]])).to(device)
    labels, top = torch.tensor([0, 1, 2]), torch.randint(5, (3, 2, 2))

    def draw():
        return sample(prior, 3, labels=labels, cond_codes=[top], generator=torch.Generator().manual_seed(4))

    codes = draw()
    assert codes.device.type == device and codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 11
    assert torch.equal(codes, draw())
