"""The .vq codec: round trips, code length against the priors' NLL, exact uniform sizes,
decoding in another process, progressive files (previews from the top levels, truncated
downloads), and a clear CodecError for every damaged or foreign file."""

from __future__ import annotations

import math
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, TINY2

from vqkit.cli.main import main
from vqkit.codec.codec import Codec, CodecError, _frequency_table, _from_tiles, _to_tiles, portable_probabilities
from vqkit.codec.format import MAGIC, header_size, read_vq
from vqkit.codec.packing import pack_uniform, uniform_payload_bytes, unpack_uniform
from vqkit.data.datasets import to_model
from vqkit.data.images import load_image, save_png
from vqkit.errors import UsageError
from vqkit.nn.vqvae import VQVAE, VQVAEConfig
from vqkit.prior import PriorConfig, build_prior
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import LevelPrior
from vqkit.training.stage1 import TrainConfig, train

# A codebook size that is not a power of two: uniform mode packs in mixed radix.
TINY1 = VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2, code_dim=4,
                    codebook_size=12, restart_after=2)
PRIOR = ["--steps", "6", "--batch-size", "8", "--channels", "8", "--layers", "2", "--no-tensorboard"]


def _train(run, config):
    train(run, config, TrainConfig(data=DATA, steps=6, batch_size=8, lr=3e-3), progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-level run with a gated PixelCNN top prior and a PixelSNAIL bottom prior conditioned
    on the top map (28x28 tiles: 7x7 top, 14x14 bottom), and a one-level run with K = 12."""
    root = tmp_path_factory.mktemp("codec")
    _train(root / "run", TINY2)
    _train(root / "one", TINY1)
    assert main(["extract", str(root / "run"), "--limit", "40", "-o", str(root / "codes")]) == 0
    assert main(["train-prior", str(root / "codes" / "top"), "--arch", "pixelcnn", *PRIOR,
                 "-o", str(root / "top")]) == 0
    assert main(["train-prior", str(root / "codes" / "bottom"), "--cond", str(root / "codes" / "top"),
                 "--arch", "pixelsnail", *PRIOR, "-o", str(root / "bottom")]) == 0
    return root


@pytest.fixture(scope="module")
def codec(runs):
    return Codec.load(runs / "run", [runs / "top", runs / "bottom"])


def _image(h, w, seed=0, channels=1):
    """A smooth random image (so the codes are not all alike), uint8 (C, h, w)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, channels, max(1, h // 6), max(1, w // 6), generator=g)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return (big[0] * 255).round().to(torch.uint8)


@pytest.mark.parametrize("size", [(30, 45), (28, 28), (1, 3)])
def test_round_trip_gives_the_models_own_reconstruction(codec, size):
    image = _image(*size)
    compressed = codec.compress(image)
    assert compressed.header.padded_height % 28 == 0 and compressed.header.padded_width % 28 == 0
    assert torch.equal(codec.decompress(compressed.data), codec.reconstruct(image))
    header, codes = codec.decompress_codes(compressed.data)
    assert all(torch.equal(a, b) for a, b in zip(codes, codec.encode(image)))
    assert (header.height, header.width) == size


def test_size_is_the_priors_ideal_code_length(codec):
    image = _image(60, 80, seed=1)
    compressed = codec.compress(image)
    # The ideal code length from the teacher-forced forward pass, tile by tile: the same
    # conditionals as the incremental path, within float rounding, made portable.
    top, bottom = (link.prior for link in codec.chain)
    maps = codec.encode(image)
    t, b = _to_tiles(maps[0], 7, 7), _to_tiles(maps[1], 14, 14)
    with torch.no_grad():
        logits = [top(t), bottom(b, cond_codes=[t])]
    nll = 0.0
    for logit, target in zip(logits, (t, b)):
        probs = portable_probabilities(logit.permute(0, 2, 3, 1).reshape(-1, logit.shape[1]))
        nll -= float(np.log2(probs[np.arange(len(probs)), target.flatten().numpy()]).sum())
    assert compressed.ideal_bits == pytest.approx(nll, rel=1e-4)
    payload_bits = 8 * compressed.header.payload_length
    # The range coder's fixed-point probabilities cost a little, and the last 32-bit words of
    # each level's stream a few bytes.
    assert compressed.ideal_bits - 8 <= payload_bits <= compressed.ideal_bits * 1.001 + 2 * 64
    assert len(compressed.data) == header_size(2) + compressed.header.payload_length


def test_uniform_mode_costs_exactly_log2_k_per_code(codec, runs):
    image = _image(30, 45)
    compressed = codec.compress(image, "uniform")
    top, bottom = compressed.header.levels
    assert (top, bottom) == ((8, 12, 8), (16, 24, 16))  # padded to the stride 4, not to the tiles
    # Each level a number of its own (a progressive file): ceil(n_l log2 K_l / 8) bytes per level.
    assert [s.length for s in compressed.header.segments] == [math.ceil(8 * 12 * 3 / 8), 16 * 24 * 4 // 8]
    assert len(compressed.data) == header_size(2) + 36 + 192
    assert torch.equal(codec.decompress(compressed.data), codec.reconstruct(image, "uniform"))
    one = Codec.load(runs / "one")
    compressed = one.compress(_image(37, 50), "uniform")
    (h, w, k), = compressed.header.levels
    assert (h, w, k) == (10, 13, 12)
    assert compressed.header.payload_length == math.ceil(h * w * math.log2(12) / 8)
    assert torch.equal(one.decompress(compressed.data), one.reconstruct(_image(37, 50), "uniform"))


def test_mixed_radix_packing_is_exact_and_checked():
    rng = np.random.default_rng(0)
    for radices in ([3, 7], [512, 16], [1, 5], [2]):
        counts = [int(rng.integers(1, 200)) for _ in radices]
        levels = [rng.integers(0, k, n) for n, k in zip(counts, radices)]
        data = pack_uniform(levels, radices)
        assert len(data) == math.ceil(sum(n * math.log2(k) for n, k in zip(counts, radices)) / 8 - 1e-12)
        assert all(np.array_equal(a, b) for a, b in zip(levels, unpack_uniform(data, counts, radices)))
    assert uniform_payload_bytes([3], [4]) == 1 and uniform_payload_bytes([5], [4]) == 2
    with pytest.raises(CodecError, match="beyond"):
        unpack_uniform(b"\xff", [1], [5])
    with pytest.raises(CodecError, match="beyond its last code"):
        unpack_uniform(b"\xff", [3], [4])


def test_tiles_round_trip():
    m = torch.arange(6 * 8).reshape(6, 8)
    tiles = _to_tiles(m, 3, 4)
    assert tiles.shape == (4, 3, 4) and torch.equal(tiles[1], m[:3, 4:])
    assert torch.equal(_from_tiles(tiles, 6, 8), m)


def test_another_process_and_thread_count_decode_the_same_codes(codec, runs, tmp_path):
    image = _image(40, 33, seed=3)
    compressed = codec.compress(image)
    path = tmp_path / "x.vq"
    path.write_bytes(compressed.data)
    torch.set_num_threads(2)
    try:
        _, codes = codec.decompress_codes(compressed.data)
    finally:
        torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(codes, compressed.codes))
    script = (
        "import sys, torch, numpy as np\n"
        "torch.set_num_threads(2)\n"
        "from vqkit.codec.codec import Codec, read_vq\n"
        f"codec = Codec.load({str(runs / 'run')!r}, [{str(runs / 'top')!r}, {str(runs / 'bottom')!r}])\n"
        f"_, codes = codec.decompress_codes(read_vq({str(path)!r}))\n"
        f"np.save({str(tmp_path / 'codes.npy')!r}, np.concatenate([c.numpy().ravel() for c in codes]))\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    decoded = np.load(tmp_path / "codes.npy")
    assert np.array_equal(decoded, np.concatenate([c.numpy().ravel() for c in compressed.codes]))


def _rewrite_header(data: bytes, offset: int, fmt: str, value) -> bytes:
    """Change one header field and recompute the header checksum, so the field checks run."""
    size = header_size(data[10])
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    struct.pack_into("<I", out, size - 4, zlib.crc32(bytes(out[:size - 4])))
    return bytes(out)


def test_every_damage_gets_its_error(codec, runs):
    data = codec.compress(_image(30, 45)).data
    size = header_size(2)
    cases = {
        "not a .vq file": b"\x89PNG\r\n\x1a\n" + data[8:],
        "truncated": data[:-7],
        "truncated: 20 bytes": data[:20],
        "corrupt payload": data[:size + 3] + bytes([data[size + 3] ^ 0x10]) + data[size + 4:],
        "corrupt header \\(checksum": data[:50] + bytes([data[50] ^ 1]) + data[51:],
        "unexpected bytes after": data + b"\0",
        "version 9": data[:8] + b"\x09" + data[9:],
        "corrupt header: image size": _rewrite_header(data, 44, "<I", 10 ** 6),
        "exceeds": _rewrite_header(_rewrite_header(data, 52, "<I", 60000), 56, "<I", 60000),
    }
    for message, damaged in cases.items():
        with pytest.raises(CodecError, match=message):
            codec.decompress(damaged, "x.vq")
    other = Codec.load(runs / "one")
    with pytest.raises(CodecError, match="give the prior runs"):
        other.decompress(data, "x.vq")
    with pytest.raises(CodecError, match="made with another model"):
        other.decompress(codec.compress(_image(30, 45), "uniform").data, "x.vq")
    retrained = Codec(codec.model, ckpt.latest_checkpoint(runs / "run").state["fingerprint"], codec.chain,
                      ["other top prior weights", "other bottom prior weights"])
    with pytest.raises(CodecError, match="made with another model.*stage-1 model and priors"):
        retrained.decompress(data, "x.vq")
    with pytest.raises(CodecError, match="x.vq: corrupt header: sizes do not fit"):
        codec.decompress(_rewrite_header(data, 60, "<I", 56), "x.vq")  # another tile height


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Bit flips, a truncation, inserted bytes, or one header field rewritten with a valid header
    checksum (so the field checks, not the checksum, must catch it)."""
    kind = rng.randrange(4)
    out = bytearray(data)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:
        return bytes(out[:rng.randrange(len(out))])
    if kind == 2:
        i = rng.randrange(len(out))
        return bytes(out[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + out[i:])
    offset = rng.choice([9, 10, 11, *range(44, 68, 4), *range(68, 68 + 24 * data[10], 4)])
    fmt = "<B" if offset < 12 else "<I"
    value = rng.choice([0, 1, 2, 3, 7, 28, 255, 2 ** 16, 2 ** 31, rng.randrange(2 ** 32)])
    return _rewrite_header(bytes(out), offset, fmt, value % (256 if fmt == "<B" else 2 ** 32))


def _flip_payload_bit(data: bytes, at: int, bit: int = 0) -> bytes:
    """Payload byte ``at`` (from the end of the header) with one bit flipped, and the checksums
    of its level's segment and of the header fixed: only the decoder can notice."""
    out = bytearray(data)
    levels, size = out[10], header_size(out[10])
    out[size + at] ^= 1 << bit
    start = size
    for level in range(levels):
        entry = 68 + 24 * level
        length = struct.unpack_from("<I", out, entry + 12)[0]
        if start <= size + at < start + length:
            struct.pack_into("<I", out, entry + 16, zlib.crc32(bytes(out[start:start + length])))
        start += length
    struct.pack_into("<I", out, size - 4, zlib.crc32(bytes(out[:size - 4])))
    return bytes(out)


def _payload_flipped(data: bytes, rng: random.Random) -> bytes:
    return _flip_payload_bit(data, rng.randrange(len(data) - header_size(data[10])), rng.randrange(8))


def test_fuzzed_files_give_codec_errors_only(codec):
    """Thousands of random and mutated inputs (seeded): each decodes (a header rewritten to other
    valid values is a valid file) or gives a CodecError; nothing else escapes, nothing hangs.
    Damage behind a valid checksum runs the whole decoder, so the prior-coded file, slower to
    decode, is mutated less often."""
    rng = random.Random(0)
    prior, uniform = codec.compress(_image(9, 9)).data, codec.compress(_image(9, 9), "uniform").data
    inputs = [MAGIC + bytes(rng.randrange(256) for _ in range(rng.randrange(120))) if i % 3 == 0
              else bytes(rng.randrange(256) for _ in range(rng.randrange(64))) for i in range(2000)]
    inputs += [_mutate(prior if rng.random() < 0.1 else uniform, rng) for _ in range(2500)]
    inputs += [_payload_flipped(prior if i % 4 == 0 else uniform, rng) for i in range(60)]
    outcomes = {"decoded": 0, "rejected": 0, "crashed": 0}
    for data in inputs:
        try:
            codec.decompress_codes(data, "fuzz.vq")
            outcomes["decoded"] += 1
        except CodecError:
            outcomes["rejected"] += 1
        except Exception:  # noqa: BLE001 - anything but a CodecError is what this test hunts
            outcomes["crashed"] += 1
    assert sum(outcomes.values()) == len(inputs) == 4560
    assert outcomes["crashed"] == 0 and outcomes["rejected"] > 4400


def test_cli_compress_and_decompress(runs, tmp_path, capsys):
    image = tmp_path / "in.png"
    save_png(_image(30, 45, seed=5), image)
    codec = Codec.load(runs / "run", [runs / "top", runs / "bottom"])
    priors = ["--prior", str(runs / "top"), "--prior", str(runs / "bottom")]
    assert main(["compress", str(runs / "run"), str(image), *priors, "-o", str(tmp_path / "a.vq")]) == 0
    assert "bits per pixel" in capsys.readouterr().out
    assert main(["decompress", str(runs / "run"), str(tmp_path / "a.vq"), *priors,
                 "-o", str(tmp_path / "a.png")]) == 0
    assert torch.equal(load_image(tmp_path / "a.png", None, 1), codec.reconstruct(load_image(image, None, 1)))
    capsys.readouterr()
    assert main(["decompress", str(runs / "run"), str(tmp_path / "a.vq"), *priors, "--levels", "1",
                 "-o", str(tmp_path / "top.png")]) == 0
    assert "a preview from the top 1 of its 2 levels" in capsys.readouterr().out
    assert torch.equal(load_image(tmp_path / "top.png", None, 1),
                       codec.decompress((tmp_path / "a.vq").read_bytes(), levels=1))
    assert main(["decompress", str(runs / "run"), str(tmp_path / "a.vq"), *priors, "--levels", "3",
                 "-o", str(tmp_path / "top.png")]) == 2
    assert "levels must be in 1..2" in capsys.readouterr().err
    assert main(["compress", str(runs / "run"), str(image), str(image), "--uniform", "-o", str(tmp_path / "u")]) == 0
    assert (tmp_path / "u" / "in.vq").exists()
    assert main(["compress", str(runs / "run"), str(image), "-o", str(tmp_path / "b.vq")]) == 2
    assert "--uniform" in capsys.readouterr().err
    (tmp_path / "bad.vq").write_bytes(b"hello")
    assert main(["decompress", str(runs / "run"), str(tmp_path / "bad.vq"), "-o", str(tmp_path / "b.png")]) == 2
    assert "bad.vq: not a .vq file" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
    assert main(["compress", str(runs / "one"), str(image), "--prior", str(runs / "top"),
                 "-o", str(tmp_path / "c.vq")]) == 2
    assert "another model" in capsys.readouterr().err
    assert ckpt.run_kind(runs / "one") == "vqvae"


def test_a_file_is_tied_to_the_prior_checkpoint_it_was_coded_with(runs, tmp_path, capsys):
    top = tmp_path / "top"
    assert main(["train-prior", str(runs / "codes" / "top"), "--arch", "pixelcnn", *PRIOR, "--checkpoint-every", "1",
                 "-o", str(top)]) == 0
    (top / "best").write_text("step-00000005\n")  # as if step 5 had scored best
    best = Codec.load(runs / "run", [top, runs / "bottom"])
    latest = Codec.load(runs / "run", [top, runs / "bottom"], "latest")
    assert best.fingerprints["prior"] != latest.fingerprints["prior"]
    image = tmp_path / "in.png"
    save_png(_image(28, 28, seed=3), image)
    priors = ["--prior", str(top), "--prior", str(runs / "bottom")]
    assert main(["compress", str(runs / "run"), str(image), *priors, "-o", str(tmp_path / "a.vq")]) == 0
    assert main(["decompress", str(runs / "run"), str(tmp_path / "a.vq"), *priors, "--checkpoint", "latest",
                 "-o", str(tmp_path / "a.png")]) == 2
    assert "made with another model" in capsys.readouterr().err and not (tmp_path / "a.png").exists()
    assert main(["decompress", str(runs / "run"), str(tmp_path / "a.vq"), *priors, "-o", str(tmp_path / "a.png")]) == 0


def _sharp_codec() -> tuple[Codec, torch.Tensor]:
    """A fresh one-level model (K = 16, 7x7 prior maps: 28x28 tiles) and a flat 224x224 image
    with a dark square and a noisy patch, whose 56x56 code map is mostly one code; and a prior
    whose output layer is zeroed and biased to the log of that map's code frequencies, so every
    conditional is the map's own histogram: a prior much sharper than uniform."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2,
                              code_dim=4, codebook_size=16))
    image = torch.full((1, 224, 224), 200, dtype=torch.uint8)
    image[:, 100:120, 150:170] = 20
    image[:, 80:90, 10:30] = torch.randint(0, 256, (1, 10, 20), generator=torch.Generator().manual_seed(0),
                                           dtype=torch.uint8)
    model.train()
    model(to_model(image[None]))  # one training step's k-means initialisation spreads the codebook
    model.eval()
    codes = Codec(model, "sharp").encode(image, "uniform")[0]
    counts = torch.bincount(codes.flatten(), minlength=16).double()
    prior = build_prior(PriorConfig(codebook_size=16, height=7, width=7, channels=8, layers=2))
    with torch.no_grad():
        prior.head[-1].weight.zero_()
        prior.head[-1].bias.copy_(torch.log((counts + 0.05) / counts.sum()))
    return Codec(model, "sharp", [LevelPrior(Path("sharp-prior"), prior.eval(), {})], ["sharp-prior"]), image


def test_prior_mode_codes_with_the_priors_probabilities():
    """With a prior far from uniform the payload is the prior's ideal code length (a range coder
    given uniform probabilities would write about log2 K bits a code whatever the prior says)."""
    codec, image = _sharp_codec()
    prior, uniform = codec.compress(image), codec.compress(image, "uniform")
    codes = prior.codes[0]
    assert codes.shape == (56, 56) and len(codes.unique()) >= 8  # not one code everywhere
    assert uniform.header.payload_length == 56 * 56 * 4 // 8
    # The ideal code length under the prior: the map's histogram entropy, about a third of log2 16.
    counts = torch.bincount(codes.flatten(), minlength=16).double()
    p = portable_probabilities(torch.log((counts + 0.05) / counts.sum())[None])[0]
    assert np.abs(p / ((counts + 0.05) / (counts.sum() + 16 * 0.05)).numpy() - 1).max() < 0.02
    assert prior.ideal_bits == pytest.approx(float(-(counts.numpy() * np.log2(p)).sum()), rel=1e-6)
    assert prior.ideal_bits < 0.4 * 8 * uniform.header.payload_length
    payload_bits = 8 * prior.header.payload_length
    assert prior.ideal_bits - 8 <= payload_bits <= prior.ideal_bits + 64, \
        f"prior-mode payload {payload_bits} bits, the prior's ideal code length {prior.ideal_bits:.1f} bits"
    assert prior.header.payload_length < 0.5 * uniform.header.payload_length
    header, decoded = codec.decompress_codes(prior.data)
    assert header.mode == "prior" and torch.equal(decoded[0], codes)
    assert torch.equal(codec.decompress(prior.data), codec.reconstruct(image))


def test_payload_that_decodes_to_other_codes_fails_the_codes_checksum():
    """A payload changed behind valid header and payload checksums still unpacks (uniform mode
    takes any bits), but to other codes: only the codes checksum in the header can notice."""
    codec, image = _sharp_codec()
    good = codec.compress(image, "uniform").data
    data = _flip_payload_bit(good, 0)  # the lowest bit of the first code
    size = header_size(1)
    original = unpack_uniform(good[size:], [56 * 56], [16])[0]
    changed = unpack_uniform(data[size:], [56 * 56], [16])[0]
    assert (changed != original).sum() == 1
    with pytest.raises(CodecError, match="x.vq: the decoded codes do not match the file's checksum"):
        codec.decompress_codes(data, "x.vq")


@pytest.mark.parametrize("mode", ["prior", "uniform"])
def test_the_top_levels_bytes_alone_decode_a_preview(codec, mode):
    """A progressive file: its levels' segments follow the header top-first; the header and the
    top segment alone decode the top level's preview (``decode_levels``), every level decodes
    exactly the whole reconstruction."""
    image = _image(30, 45, seed=2)
    compressed = codec.compress(image, mode)
    data, h = compressed.data, compressed.header
    top_bytes = compressed.prefix_bytes(1)
    assert top_bytes == header_size(2) + h.segments[0].length < len(data) == compressed.prefix_bytes(2)
    if mode == "uniform":  # the preview costs the top level's bits only: ceil(n_top log2 K_top / 8)
        assert h.segments[0].length == math.ceil(8 * 12 * 3 / 8)
    codes = codec.encode(image, mode)
    with torch.no_grad():
        preview = codec.model.decode_levels([codes[0][None]], 1)
    expected = ((preview[0, :, :30, :45] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    for got in (codec.decompress(data, levels=1), codec.decompress(data[:top_bytes], levels=1),
                codec.decompress(data[:top_bytes])):  # a download cut at the end of the top level
        assert torch.equal(got, expected)
    header, top = codec.decompress_codes(data[:top_bytes])
    assert len(top) == 1 and torch.equal(top[0], codes[0])
    assert torch.equal(codec.decompress(data, levels=2), codec.reconstruct(image, mode))
    assert torch.equal(codec.decompress(data), codec.reconstruct(image, mode))
    assert not torch.equal(expected, codec.reconstruct(image, mode))


def test_a_torn_level_is_refused_and_the_complete_ones_above_it_decode(codec):
    data = codec.compress(_image(30, 45, seed=4)).data
    top_bytes = header_size(2) + struct.unpack_from("<I", data, 68 + 12)[0]
    with pytest.raises(CodecError, match=r"x.vq: truncated inside level 1 \(bottom\): the file holds 5 of its "
                                         r"\d+ bytes; its first 1 level\(s\) are complete: decode those alone"):
        codec.decompress(data[:top_bytes + 5], "x.vq")
    assert torch.equal(codec.decompress(data[:top_bytes + 5], levels=1), codec.decompress(data, levels=1))
    with pytest.raises(CodecError, match=r"x.vq: truncated inside level 0 \(top\).*no level is complete"):
        codec.decompress(data[:top_bytes - 1], "x.vq", levels=1)
    with pytest.raises(CodecError, match="x.vq: truncated: the file ends after its header"):
        codec.decompress(data[:header_size(2)], "x.vq")
    damaged = bytearray(data)
    damaged[-1] ^= 1
    with pytest.raises(CodecError, match=r"x.vq: corrupt payload: level 1 \(bottom\) fails its checksum"):
        codec.decompress(bytes(damaged), "x.vq")
    assert torch.equal(codec.decompress(bytes(damaged), levels=1), codec.decompress(data, levels=1))
    with pytest.raises(UsageError, match="x.vq: levels must be in 1..2"):
        codec.decompress(data, "x.vq", levels=3)


def test_reading_a_preview_reads_only_its_levels(codec, tmp_path):
    compressed = codec.compress(_image(30, 45, seed=6))
    path = tmp_path / "x.vq"
    path.write_bytes(compressed.data)
    assert read_vq(path, 1) == compressed.data[:compressed.prefix_bytes(1)]
    assert read_vq(path, 2) == read_vq(path) == compressed.data


def test_rd_plots_every_prefix_as_a_point_of_the_same_file(codec, tmp_path):
    from vqkit.codec.rd import measure, psnr
    image = _image(30, 45, seed=7)
    save_png(image, tmp_path / "a.png")
    result = measure({"run": codec}, [tmp_path / "a.png"], qualities=[50], progress=False)
    points = {(p.method, p.setting): p for p in result.points}
    for mode in ("prior", "uniform"):
        compressed = codec.compress(image, mode)
        top = points[(f"run {mode}", f"{mode}:1/2")]
        assert top.bpp == pytest.approx(8 * compressed.prefix_bytes(1) / (30 * 45))
        assert top.psnr == pytest.approx(psnr(image, codec.decompress(compressed.data, levels=1)))
        assert top.bpp < points[(f"run {mode}", mode)].bpp


def test_the_frequency_table_is_exp_in_integers():
    table = _frequency_table()
    assert len(table) == 32 * 64 + 1 and table[0] == 2 ** 24
    assert table[64] == round(2 ** 24 * math.exp(-1)) and table[128] == round(2 ** 24 * math.exp(-2))
    assert (np.diff(table) <= 0).all() and table.min() == 1


def test_portable_probabilities_round_away_another_machines_float_noise():
    torch.manual_seed(0)
    logits = torch.randn(4096, 64, dtype=torch.float64) * 4
    noisy = logits * (1 + 1e-13 * torch.randn_like(logits))  # another CPU's float64 arithmetic
    assert not np.array_equal(logits.softmax(-1).numpy(), noisy.softmax(-1).numpy())
    p = portable_probabilities(logits)
    assert np.array_equal(p, portable_probabilities(noisy))
    q = logits.softmax(-1).numpy()
    # Within 2^-12 of the maximum the table's integers are exact to 0.02%; below, its 2^-24
    # floor is the range coder's own resolution.
    near = q > 2.0 ** -12 * q.max(-1, keepdims=True)
    assert np.allclose(p.sum(-1), 1.0) and np.abs(p / q - 1)[near].max() < 0.02
    # Far below the maximum every code keeps the smallest frequency, never zero.
    assert (portable_probabilities(torch.tensor([[0.0, -1e4, -40.0]]))[0, 1:] > 0).all()


def test_a_prior_mode_file_decodes_under_another_machines_float_noise(codec, monkeypatch):
    import vqkit.codec.codec as codec_module
    image = _image(60, 80, seed=3)
    data = codec.compress(image).data
    assert data[8] == 3  # a portable file
    real = codec_module.portable_probabilities
    monkeypatch.setattr(codec_module, "portable_probabilities",
                        lambda logits: real(logits * (1 + 1e-12 * torch.randn_like(logits))))
    assert torch.equal(codec.decompress(data), codec.reconstruct(image))
