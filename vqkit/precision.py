"""Where a training step runs and in which number format: device, bf16 autocast, channels_last.

``Placement`` is resolved once from the user's settings (``device``, ``precision``,
``channels_last``; "auto" picks the fastest mode the hardware runs well) and then applied to
the model (``prepare_model``), to every batch (``prepare_input``) and around the forward pass
(``autocast``). Only the forward pass is autocast: parameters, gradients and the optimizer stay
in float32, and the quantizer keeps its distances and EMA statistics in float32 whatever the
autocast (see ``quantize.py``), so bf16 changes the speed of the convolutions and little else.

Why these choices (``python benchmarks/bench_precision.py``, figures in the README): on a CPU
with AVX-512 BF16 or AMX, oneDNN runs bf16 training steps 1.5x to 1.7x as fast as float32,
and 1.75x to 2.1x with channels_last tensors, where it needs no layout reorder around every
convolution; test PSNR after equal steps is unchanged (``benchmarks/bench_vqvae2.py``);
on CUDA, bf16 autocast uses the tensor cores. Without native bf16 (AVX2-only CPUs) oneDNN
emulates bf16 by converting to float32, so no speed-up is to be had and "auto" keeps float32
there (not measured: this was written on an AMX machine).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vqkit.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Placement:
    """The resolved settings: ``device``, whether the forward pass is autocast to bfloat16,
    and whether 4-D tensors use the channels_last memory format."""

    device: torch.device
    bf16: bool
    channels_last: bool

    def describe(self) -> str:
        return f"{self.device}, {'bf16 autocast' if self.bf16 else 'fp32'}" + \
            (", channels_last" if self.channels_last else "")


@dataclass(kw_only=True)
class PlacementConfig:
    """The settings as a training configuration carries them (keyword-only fields, so that
    configurations with required fields can inherit them).

    Args:
        device: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.
        precision: bf16 autocasts the forward pass to bfloat16 (codebook maths stays float32);
            auto takes bf16 where the device computes it natively, else fp32.
        channels_last: the channels_last memory format (default: with bf16).
        compile: torch.compile the model.
    """

    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")

    def placement(self) -> Placement:
        return resolve(self.device, self.precision, self.channels_last)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; otherwise ``name``
    (``cpu``, ``cuda``, ``cuda:1``), checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    """The x86 feature flags of this CPU (empty where /proc/cpuinfo does not exist). torch's
    own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also says yes on AVX-512 CPUs
    that only emulate bf16, where bf16 is slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve(device: str = "auto", precision: str = "auto", channels_last: bool | None = None) -> Placement:
    """The ``Placement`` for the user's settings. ``precision="auto"`` is bf16 where the
    device has native bf16, else fp32; ``channels_last=None`` follows bf16: it is what makes
    bf16 convolutions fast on the CPU. (On the AMX machine it also sped float32 up by 1.05x to
    1.27x, but it was not measured on CPUs without native bf16, so it stays opt-in there.)"""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    where = resolve_device(device)
    bf16 = native_bf16(where) if precision == "auto" else precision == "bf16"
    return Placement(device=where, bf16=bf16, channels_last=bf16 if channels_last is None else channels_last)


def autocast(placement: Placement):
    """The context to run a forward pass in."""
    if not placement.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=placement.device.type, dtype=torch.bfloat16)


def prepare_model(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """Move ``model`` to the device and, if asked, to channels_last (in place; returned)."""
    model.to(placement.device)
    if placement.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def prepare_input(x: torch.Tensor, placement: Placement) -> torch.Tensor:
    x = x.to(placement.device, non_blocking=True)
    if placement.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
