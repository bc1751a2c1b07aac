"""What the test modules share: one torch thread, the embedded data set, the tiny models.

Every test runs on one torch thread: the models here are tiny, and their convolutions are
slower with several threads on a shared two-core machine. It is set when pytest loads this
file, before any test module is imported. (Processes a test starts, e.g. the data-parallel
workers of test_distributed, do not load it and set their own.)

The constants can be imported (``from conftest import DATA, TINY``, as ``shared_data`` is);
the fixtures of the same names in lower case hand out fresh copies, which a test may change.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vqkit.data.datasets import sample_dir
from vqkit.nn.vqvae import VQVAE2Config, VQVAEConfig

torch.set_num_threads(1)

# The embedded Fashion-MNIST sample (28x28 grey images), as a data-set spec.
DATA = f"fashion-mnist:{sample_dir()}"

# The network fields of every tiny model: a few thousand weights, milliseconds a step.
TINY_NET = dict(hidden=8, res_hidden=4, num_res_blocks=1, code_dim=4)
# One level: 7x7 codes of a 28x28 image, K = 16.
TINY = VQVAEConfig(in_channels=1, downsample=2, codebook_size=16, **TINY_NET)
# Two levels: 7x7 top (K = 8) and 14x14 bottom (K = 16) codes of a 28x28 image; dead codes
# restarted after 2 steps, so a few steps' training already exercises restarts.
TINY2 = VQVAE2Config(in_channels=1, strides=[1, 1], codebook_sizes=[8, 16], restart_after=2, **TINY_NET)


def cli_ok(capsys, argv: list) -> str:
    """Run ``vqkit ARGV`` in this process; its stdout, after asserting that it exited 0 (else
    the failure is its stderr)."""
    from vqkit.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture
def data_spec() -> str:
    """The embedded sample's data-set spec, ``fashion-mnist:<sample_dir()>``."""
    return DATA


@pytest.fixture
def tiny() -> VQVAEConfig:
    """A fresh copy of ``TINY``; ``dataclasses.replace(tiny, ...)`` for a variant."""
    return dataclasses.replace(TINY)


@pytest.fixture
def tiny2() -> VQVAE2Config:
    """A fresh copy of ``TINY2`` (its list fields copied too)."""
    return dataclasses.replace(TINY2, strides=list(TINY2.strides), codebook_sizes=list(TINY2.codebook_sizes))
