import pytest
import torch

from vqkit import precision
from vqkit.data.datasets import TensorImageSet
from vqkit.nn.quantize import VectorQuantizer
from vqkit.nn.vqvae import VQVAE2Config, build_model
from vqkit.precision import Placement, autocast, prepare_input, prepare_model, resolve
from vqkit.runs.checkpoint import load_model
from vqkit.training.stage1 import TrainConfig, train

CPU = torch.device("cpu")


def test_resolve_explicit_precisions():
    assert resolve("cpu", "fp32") == Placement(CPU, bf16=False, channels_last=False)
    assert resolve("cpu", "bf16") == Placement(CPU, bf16=True, channels_last=True)
    assert resolve("cpu", "bf16", channels_last=False).channels_last is False
    assert resolve("cpu", "fp32", channels_last=True).channels_last is True


def test_auto_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert resolve("cpu", "auto").bf16 is False  # emulated bf16 is slower than float32
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert resolve("cpu", "auto") == Placement(CPU, bf16=True, channels_last=True)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"amx_bf16"})
    assert resolve("cpu", "auto").bf16 is True


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve("cpu", "fp8")
    with pytest.raises(ValueError, match="unknown device"):
        resolve("gpu0")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve("cuda")
    with pytest.raises(ValueError, match="unknown precision"):
        TrainConfig(data="mnist:x", precision="half")


def test_prepare_converts_memory_format_only_when_asked():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    cl = Placement(CPU, bf16=False, channels_last=True)
    assert prepare_model(conv, cl).weight.is_contiguous(memory_format=torch.channels_last)
    assert prepare_input(x, cl).is_contiguous(memory_format=torch.channels_last)
    assert prepare_input(x, Placement(CPU, False, False)).is_contiguous()
    codes = torch.zeros(2, 4, 4, dtype=torch.long)  # not an image: left alone
    assert prepare_input(codes, cl).is_contiguous()


def test_autocast_runs_convolutions_in_bf16_and_the_quantizer_in_float32():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    vq = VectorQuantizer(16, 8, ema=True).train()
    reference = VectorQuantizer(16, 8, ema=True).train()
    reference.load_state_dict(vq.state_dict())
    x = torch.randn(4, 3, 6, 6)
    with autocast(Placement(CPU, bf16=True, channels_last=False)):
        z_e = conv(x)
        out = vq(z_e)
    assert z_e.dtype == torch.bfloat16
    assert vq.codebook.dtype == vq.ema_sum.dtype == vq.ema_count.dtype == torch.float32
    assert out.loss.dtype == torch.float32
    # The same bf16 z_e, quantized in plain float32, picks the same codes and EMA update.
    ref = reference(z_e.detach().float())
    assert torch.equal(out.codes, ref.codes)
    torch.testing.assert_close(vq.codebook, reference.codebook)
    with autocast(Placement(CPU, bf16=False, channels_last=False)):
        assert conv(x).dtype == torch.float32


def _images(n=32, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 255
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    return TensorImageSet("toy", (base * ramp).expand(n, 3, size, size).to(torch.uint8).contiguous(),
                          torch.zeros(n, dtype=torch.long), None)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_training_in_each_precision_saves_loadable_float32_weights(tmp_path, mode):
    config = VQVAE2Config(in_channels=3, hidden=16, res_hidden=8, num_res_blocks=1, strides=[1, 1],
                          code_dim=8, codebook_sizes=[16, 16])
    result = train(tmp_path / mode, config, TrainConfig(data="toy", steps=4, batch_size=8, precision=mode,
                                                        device="cpu"),
                   dataset=_images(), progress=False, tensorboard=False)
    assert result.step == 4
    model, _ = load_model(tmp_path / mode)
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())


def test_bf16_training_tracks_fp32_training(tmp_path):
    """Same init, same batches: bf16 autocast only rounds the convolutions, so the losses of a
    few steps stay close to float32's (bf16 keeps 8 bits of mantissa: ~0.4% per rounding)."""
    config = VQVAE2Config(in_channels=3, hidden=16, res_hidden=8, num_res_blocks=1, strides=[1, 1],
                          code_dim=8, codebook_sizes=[16, 16], kmeans_init=False, restart_after=0)
    losses = {}
    for mode in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(config).train()
        placement = resolve("cpu", mode)
        prepare_model(model, placement)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = prepare_input(_images().batch(torch.arange(8))[0].float() / 127.5 - 1, placement)
        losses[mode] = []
        for _ in range(5):
            with autocast(placement):
                out = model(x)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses[mode].append(float(out.loss.detach()))
    torch.testing.assert_close(torch.tensor(losses["bf16"]), torch.tensor(losses["fp32"]), rtol=0.05, atol=0)
