"""Run folders, code sets and .vq files written by an earlier vqkit (tests/data/legacy, see its
README) still load and give bit for bit what that vqkit gave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.cli.main import main
from vqkit.codec.codec import Codec
from vqkit.data.images import load_image
from vqkit.errors import CodecError

LEGACY = Path(__file__).parent / "data" / "legacy"
PRIORS = [LEGACY / "top", LEGACY / "bottom"]


def _skip_unless_float32_matches(codec: Codec, data: bytes) -> None:
    """``two.vq`` (format version 1) was coded with the float32 priors' softmax of the CPU that
    wrote it, which another CPU kind computes to other bits; there the file's codes checksum
    refuses it by name, and what it would decode to cannot be checked."""
    try:
        codec.decompress_codes(data, "two.vq")
    except CodecError as e:
        if "probabilities differ" not in str(e):
            raise
        pytest.skip(f"this CPU's float32 arithmetic differs from the one that wrote two.vq ({e})")


def _pixels(path: Path) -> torch.Tensor:
    return load_image(path, None)


def test_one_level_run_encodes_to_the_codes_it_gave(tmp_path):
    assert main(["encode", str(LEGACY / "one"), str(LEGACY / "image.png"), "--device", "cpu",
                 "-o", str(tmp_path / "c.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "c.npy"), np.load(LEGACY / "one-codes.npy"))


def test_two_level_run_encodes_and_decodes_as_it_did(tmp_path):
    assert main(["encode", str(LEGACY / "two"), str(LEGACY / "image.png"), "--device", "cpu",
                 "-o", str(tmp_path / "c")]) == 0
    for level in ("top", "bottom"):
        assert np.array_equal(np.load(tmp_path / "c" / f"{level}.npy"),
                              np.load(LEGACY / "two-codes" / f"{level}.npy"))
    assert main(["decode", str(LEGACY / "two"), str(LEGACY / "two-codes"), "--device", "cpu",
                 "-o", str(tmp_path / "d.png")]) == 0
    assert torch.equal(_pixels(tmp_path / "d.png"), _pixels(LEGACY / "two-decoded.png"))


@pytest.mark.parametrize("name, priors", [("one", []), ("two", ["top", "bottom"])])
def test_vq_files_decompress_to_the_same_pixels(tmp_path, name, priors):
    if priors:
        _skip_unless_float32_matches(Codec.load(LEGACY / name, PRIORS), (LEGACY / f"{name}.vq").read_bytes())
    args = [a for p in priors for a in ("--prior", str(LEGACY / p))]
    assert main(["decompress", str(LEGACY / name), str(LEGACY / f"{name}.vq"), *args,
                 "-o", str(tmp_path / "out.png")]) == 0
    assert torch.equal(_pixels(tmp_path / "out.png"), _pixels(LEGACY / f"{name}.vq.png"))


def test_code_sets_and_priors_load(tmp_path):
    from vqkit.runs.codes import load_codes
    top = load_codes(LEGACY / "codes" / "top")
    assert len(top) == 16 and tuple(top.shape) == (7, 7) and top.codebook_size == 8
    # Priors trained by the earlier vqkit code a file as they did: today's progressive, portable
    # (version 3) file decodes to the same pixels as the version-1 file and holds the same codes.
    priors = ["--prior", str(LEGACY / "top"), "--prior", str(LEGACY / "bottom")]
    assert main(["compress", str(LEGACY / "two"), str(LEGACY / "odd.png"), *priors,
                 "-o", str(tmp_path / "again.vq")]) == 0
    assert (tmp_path / "again.vq").read_bytes()[8] == 3 and (LEGACY / "two.vq").read_bytes()[8] == 1
    assert main(["decompress", str(LEGACY / "two"), str(tmp_path / "again.vq"), *priors,
                 "-o", str(tmp_path / "again.png")]) == 0
    assert torch.equal(_pixels(tmp_path / "again.png"), _pixels(LEGACY / "two.vq.png"))
    codec = Codec.load(LEGACY / "two", PRIORS)
    _skip_unless_float32_matches(codec, (LEGACY / "two.vq").read_bytes())
    _, old = codec.decompress_codes((LEGACY / "two.vq").read_bytes())
    _, new = codec.decompress_codes((tmp_path / "again.vq").read_bytes())
    assert all(torch.equal(a, b) for a, b in zip(old, new))
    # A version-1 file is not progressive, but decoded whole it still gives a preview of its top level.
    assert torch.equal(codec.decompress((LEGACY / "two.vq").read_bytes(), levels=1),
                       codec.decompress((tmp_path / "again.vq").read_bytes(), levels=1))


def test_a_portable_file_written_on_another_cpu_kind_decodes_here(tmp_path):
    """``two-v3.vq`` (format version 3) was coded on an Intel Xeon with AMX: its probabilities
    are portable, so on every CPU kind it decodes to the pixels the earlier vqkit gave."""
    assert (LEGACY / "two-v3.vq").read_bytes()[8] == 3
    priors = [a for p in PRIORS for a in ("--prior", str(p))]
    assert main(["decompress", str(LEGACY / "two"), str(LEGACY / "two-v3.vq"), *priors,
                 "-o", str(tmp_path / "out.png")]) == 0
    assert torch.equal(_pixels(tmp_path / "out.png"), _pixels(LEGACY / "two.vq.png"))
