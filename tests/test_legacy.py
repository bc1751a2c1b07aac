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

LEGACY = Path(__file__).parent / "data" / "legacy"


def _pixels(path: Path) -> torch.Tensor:
    return load_image(path, None)


def test_one_level_run_encodes_to_the_codes_it_gave(tmp_path):
    assert main(["encode", str(LEGACY / "one"), str(LEGACY / "image.png"), "-o", str(tmp_path / "c.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "c.npy"), np.load(LEGACY / "one-codes.npy"))


def test_two_level_run_encodes_and_decodes_as_it_did(tmp_path):
    assert main(["encode", str(LEGACY / "two"), str(LEGACY / "image.png"), "-o", str(tmp_path / "c")]) == 0
    for level in ("top", "bottom"):
        assert np.array_equal(np.load(tmp_path / "c" / f"{level}.npy"),
                              np.load(LEGACY / "two-codes" / f"{level}.npy"))
    assert main(["decode", str(LEGACY / "two"), str(LEGACY / "two-codes"), "-o", str(tmp_path / "d.png")]) == 0
    assert torch.equal(_pixels(tmp_path / "d.png"), _pixels(LEGACY / "two-decoded.png"))


@pytest.mark.parametrize("name, priors", [("one", []), ("two", ["top", "bottom"])])
def test_vq_files_decompress_to_the_same_pixels(tmp_path, name, priors):
    args = [a for p in priors for a in ("--prior", str(LEGACY / p))]
    assert main(["decompress", str(LEGACY / name), str(LEGACY / f"{name}.vq"), *args,
                 "-o", str(tmp_path / "out.png")]) == 0
    assert torch.equal(_pixels(tmp_path / "out.png"), _pixels(LEGACY / f"{name}.vq.png"))


def test_code_sets_and_priors_load(tmp_path):
    from vqkit.runs.codes import load_codes
    top = load_codes(LEGACY / "codes" / "top")
    assert len(top) == 16 and tuple(top.shape) == (7, 7) and top.codebook_size == 8
    # Priors trained by the earlier vqkit code a file as they did: today's progressive
    # (version 2) file holds the same codes and decodes to the same pixels as the version-1 file.
    priors = ["--prior", str(LEGACY / "top"), "--prior", str(LEGACY / "bottom")]
    assert main(["compress", str(LEGACY / "two"), str(LEGACY / "odd.png"), *priors,
                 "-o", str(tmp_path / "again.vq")]) == 0
    assert (tmp_path / "again.vq").read_bytes()[8] == 2 and (LEGACY / "two.vq").read_bytes()[8] == 1
    codec = Codec.load(LEGACY / "two", [LEGACY / "top", LEGACY / "bottom"])
    _, old = codec.decompress_codes((LEGACY / "two.vq").read_bytes())
    _, new = codec.decompress_codes((tmp_path / "again.vq").read_bytes())
    assert all(torch.equal(a, b) for a, b in zip(old, new))
    assert main(["decompress", str(LEGACY / "two"), str(tmp_path / "again.vq"), *priors,
                 "-o", str(tmp_path / "again.png")]) == 0
    assert torch.equal(_pixels(tmp_path / "again.png"), _pixels(LEGACY / "two.vq.png"))
    # A version-1 file is not progressive, but decoded whole it still gives a preview of its top level.
    assert torch.equal(codec.decompress((LEGACY / "two.vq").read_bytes(), levels=1),
                       codec.decompress((tmp_path / "again.vq").read_bytes(), levels=1))
