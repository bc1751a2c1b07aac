"""Discrete codes as compression: ``.vq`` files, entropy-coded with the fitted priors.

VQ-VAE (van den Oord et al. 2017, section 1) motivates discrete latents by communication and
compression; VQ-VAE-2 (Razavi et al. 2019, section 3.3) turns an image into a few small integer
maps. This module writes those maps as real bit streams:

* **prior mode**: every code is range-coded (``constriction``'s queue coder) with the
  probability the fitted prior gives it, ``p(c_i | c_<i, maps above)`` (Algorithm 2's chain,
  top level first, each lower level given the maps above it). The file costs about
  ``sum_i -log2 p(c_i)`` bits, the model's ideal code length.
* **uniform mode**: the codes of every level as one number in mixed radix ``K_l``, exactly
  ``ceil(sum_l n_l log2 K_l / 8)`` payload bytes: the ``log K`` per latent stage 1 assumes.

Sizes. The priors model maps of one fixed size, so in prior mode the image is padded
(edge pixels repeated) to a multiple of the *tile*, the image size a prior map covers
(``prior.height x total stride``); the stage-1 model encodes and decodes the whole padded
image at once and only the entropy model works tile by tile (tile ``k`` of a lower level is
conditioned on tile ``k`` of the levels above). Uniform mode pads to the model's total stride.
The decoder crops back to the stored size.

Determinism. The decoder must see bit for bit the probabilities the encoder used, on whatever
CPU it runs: float arithmetic differs between CPU kinds (AVX2, AVX-512, AMX kernels sum in other
orders), so a float32 prior's logits agree only to about 1e-6 between machines, and any
difference in a frequency derails the range decoder. So the entropy model is the prior in
float64 on one torch thread (the same reductions in the same order in every process), whose
logits agree between machines to about 1e-13, made exact by rounding: each logit below its
position's maximum is rounded to a multiple of 1/64 (``_LOGIT_STEPS``) and looked up in a table
of integer frequencies ``round(2^24 exp(-d / 64))`` computed in decimal arithmetic (the same
integers everywhere); the probabilities handed to ``constriction`` are those integers over
their sum, which IEEE division gives bit for bit alike. A logit lands on the other side of a
rounding boundary on another machine with a chance of about 1e-11 (twice its noise over the
step), about once in 10^5 files of a few hundred codes of K = 512; the rounding moves each
probability within 2^-12 of its position's largest by at most 1.6% and costs about 1e-5 bits
per code on average (the table's 2^-24 floor is about the range coder's own resolution). ``constriction``'s
``Categorical(perfect=False)`` turns the probabilities into its fixed-point frequencies by
deterministic arithmetic (every symbol keeps a nonzero frequency). A CRC of the codes in the
header turns any disagreement into an error. Files of format versions 1 and 2 were coded with
the float32 prior's softmax and decode only where that arithmetic gives the same bits.

Progressive files. Each level is coded on its own, top-first (prior mode: one range-coder
stream per level, each level's conditionals given the maps above it; uniform mode: one mixed-radix
number per level), into its own segment of the file, so the top ``N`` levels' bytes decode
without the rest: ``decompress(data, levels=N)`` is a preview decoded from those levels alone
(``VQVAE.decode_levels``), and all levels give exactly the reconstruction of a whole decode.

The "levels" of a file are the model's code maps (``VQVAEConfig.code_maps``): a residual level's
stages are coded as levels of one resolution, stage s's prior conditioned on the stages above it,
each in a segment of its own, so a preview of the first stages decodes the sum of those stages.

The container (header, checksums, limits) is ``vqkit.codec.format``; uniform mode's packing is
``vqkit.codec.packing``.
"""

from __future__ import annotations

import contextlib
import copy
import decimal
import functools
import hashlib
import json
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import constriction
import numpy as np
import torch
import torch.nn.functional as F

from vqkit.codec.format import (
    FORMAT_VERSION,
    MAX_LEVELS,
    MAX_PIXELS,
    MODES,
    PORTABLE_VERSION,
    Header,
    Segment,
    parse,
    read_vq,
)
from vqkit.codec.packing import pack_uniform, unpack_uniform
from vqkit.data.datasets import from_model, to_model
from vqkit.data.images import load_image, save_png
from vqkit.errors import CodecError, UsageError
from vqkit.fsutil import atomic_write_bytes
from vqkit.nn.vqvae import VQVAE
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import LevelPrior, check_chain, decode_codes

# Portable probabilities (see "Determinism"): logits are rounded to multiples of 1 / _LOGIT_STEPS
# below their maximum; those more than _LOGIT_RANGE below it share the smallest frequency.
_LOGIT_STEPS = 64
_LOGIT_RANGE = 32
_FREQUENCY_BITS = 24


@functools.cache
def _frequency_table() -> np.ndarray:
    """``max(1, round(2^24 exp(-i / 64)))`` for i = 0 .. 2048, in decimal arithmetic, whose
    results the decimal standard fixes on every platform (libm's exp may differ by an ulp): the
    powers of one ``exp(-1 / 64)`` at 40 digits, rounded half to even."""
    context = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    step = context.exp(context.divide(decimal.Decimal(-1), decimal.Decimal(_LOGIT_STEPS)))
    power, table = decimal.Decimal(2 ** _FREQUENCY_BITS), []
    for _ in range(_LOGIT_RANGE * _LOGIT_STEPS + 1):
        table.append(max(1, int(power.to_integral_value(context=context))))
        power = context.multiply(power, step)
    return np.array(table, dtype=np.int64)


def portable_probabilities(logits: torch.Tensor) -> np.ndarray:
    """Float64 logits (n, K) -> probabilities (n, K) that are the same bits on every machine
    whose logits differ from these by rounding noise (about 1e-13): rounded logits looked up in
    an integer table, over their sum."""
    below = logits.double().numpy()
    below = np.rint((below.max(-1, keepdims=True) - below) * _LOGIT_STEPS)
    frequencies = _frequency_table()[np.minimum(below, _LOGIT_RANGE * _LOGIT_STEPS).astype(np.int64)]
    # Sums of integers below 2^53 are exact, and one IEEE division per entry is correctly rounded.
    return frequencies / frequencies.sum(-1, keepdims=True, dtype=np.int64)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the entropy model on one torch thread: the same reductions in the same order in
    every process, whatever its thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _crc_codes(maps: Sequence[torch.Tensor]) -> int:
    crc = 0
    for m in maps:
        crc = zlib.crc32(m.to(torch.int32).contiguous().numpy().astype("<i4").tobytes(), crc)
    return crc


def _to_tiles(m: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """A map (H, W) -> its tiles (n, th, tw), row by row of tiles."""
    h, w = m.shape
    return m.reshape(h // th, th, w // tw, tw).permute(0, 2, 1, 3).reshape(-1, th, tw)


def _from_tiles(tiles: torch.Tensor, h: int, w: int) -> torch.Tensor:
    th, tw = tiles.shape[1:]
    return tiles.reshape(h // th, w // tw, th, tw).permute(0, 2, 1, 3).reshape(h, w)


@dataclass
class Compressed:
    """One compressed image: the ``.vq`` bytes, its codes (one (h, w) map per level,
    top-first) and the model's ideal code length ``sum -log2 p(code)`` in bits (uniform mode:
    ``sum n_l log2 K_l``)."""

    data: bytes
    header: Header
    codes: list[torch.Tensor]
    ideal_bits: float

    @property
    def header_bytes(self) -> int:
        return self.header.size

    def prefix_bytes(self, levels: int) -> int:
        """Bytes of the file up to the end of its top ``levels`` levels: what a preview of
        them reads."""
        return self.header.size + sum(s.length for s in self.header.segments[:levels])


class Codec:
    """A stage-1 model and, for prior mode, one prior per level (top-first).

        codec = Codec.load("runs/photos", priors=["runs/photos-top", "runs/photos-bottom"])
        data = codec.compress(image).data           # image: uint8 (C, H, W)
        image2 = codec.decompress(data)             # == codec.reconstruct(image)
    """

    def __init__(self, model: VQVAE, stage1_fingerprint: str, chain: list[LevelPrior] | None = None,
                 prior_fingerprints: Sequence[str] = ()):
        self.model = model.eval()
        self.chain = chain
        config = model.config
        code_maps = config.code_maps()
        if len(code_maps) > MAX_LEVELS:
            raise CodecError(f"the model has {len(code_maps)} code maps (levels and residual stages), but a .vq "
                             f"file holds at most {MAX_LEVELS}")
        self.stride = config.total_stride
        self.radices = [m.codebook_size for m in code_maps]
        stage1 = {"fingerprint": stage1_fingerprint, "config": config.to_dict()}
        self.fingerprints = {"uniform": _hash({"stage1": stage1})}
        self.tile = None
        if chain is not None:
            self.fingerprints["prior"] = _hash({"stage1": stage1, "priors": [
                {"fingerprint": fp, "config": link.prior.config.to_dict()}
                for fp, link in zip(prior_fingerprints, chain)]})
            self.tile = self._tile_of(chain)
        self._entropy_priors = None

    @classmethod
    def load(cls, run: str | Path, priors: Sequence[str | Path] = (), which: str = ckpt.BEST) -> "Codec":
        """The codec of stage-1 run ``run`` with the prior runs ``priors`` (top-first; none:
        uniform mode only) at their checkpoint ``which`` (``best`` or ``latest``). Each prior
        must have been fitted to this run's model."""
        model, checkpoint = ckpt.load_model(Path(run))
        fingerprint = checkpoint.state.get("fingerprint", "")
        if not priors:
            return cls(model, fingerprint)
        chain = [LevelPrior.load(p, which) for p in priors]
        for link in chain:
            if link.source.get("fingerprint") != fingerprint:
                raise ckpt.CheckpointError(
                    f"{link.run / 'config.json'}: the prior was fitted to codes of another model than "
                    f"{run}'s latest checkpoint (fingerprint {str(link.source.get('fingerprint'))[:12]} vs "
                    f"{fingerprint[:12]})")
        check_chain(chain, model)
        return cls(model, fingerprint, chain, [link.fingerprint for link in chain])

    def _tile_of(self, chain: list[LevelPrior]) -> tuple[int, int]:
        strides = [m.stride for m in self.model.config.code_maps()]
        tiles = {(link.prior.config.height * strides[level], link.prior.config.width * strides[level])
                 for level, link in enumerate(chain)}
        for link in chain:
            c = link.prior.config
            if c.num_classes is not None or c.cond_channels:
                raise CodecError(f"{link.run}: a prior conditioned on a class label or a float map cannot "
                                 "code images, which carry neither")
        if len(tiles) != 1:
            raise CodecError(f"the priors' maps cover different image sizes {sorted(tiles)}; they must "
                             "come from one extraction")
        return tiles.pop()

    @property
    def modes(self) -> list[str]:
        return list(self.fingerprints)

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "prior" and self.chain is None:
            raise CodecError("prior mode needs the prior runs (one per level, top-first)")

    def _padded(self, height: int, width: int, mode: str) -> tuple[int, int, int, int]:
        """(padded height, padded width, tile height, tile width): prior mode pads to whole
        tiles; uniform mode pads to the model's total stride and codes the image as one tile."""
        th, tw = self.tile if mode == "prior" else (self.stride, self.stride)
        ph, pw = -(-height // th) * th, -(-width // tw) * tw
        return ph, pw, *((th, tw) if mode == "prior" else (ph, pw))

    def _check_image(self, image: torch.Tensor) -> None:
        c = self.model.config.in_channels
        if image.dim() != 3 or image.shape[0] != c or image.dtype != torch.uint8:
            raise CodecError(f"expected a uint8 image ({c}, H, W), got {image.dtype} {tuple(image.shape)}")
        if image.shape[1] < 1 or image.shape[2] < 1 or image.shape[1] * image.shape[2] > MAX_PIXELS:
            raise CodecError(f"an image of {image.shape[1]}x{image.shape[2]} pixels cannot be coded "
                             f"(1 to {MAX_PIXELS} pixels)")

    @torch.no_grad()
    def encode(self, image: torch.Tensor, mode: str = "prior") -> list[torch.Tensor]:
        """The code maps (h_l, w_l) of the image padded for ``mode``, top-first."""
        self._check_mode(mode)
        self._check_image(image)
        ph, pw, _, _ = self._padded(image.shape[1], image.shape[2], mode)
        x = F.pad(image[None].float(), (0, pw - image.shape[2], 0, ph - image.shape[1]), mode="replicate")
        return [m[0] for m in self.model.encode(to_model(x))]

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Code maps of every level, or of the top levels only (a preview, ``decode_levels``),
        -> the uint8 image (C, height, width), cropped from the padded decoding."""
        if len(codes) == self.model.num_maps:
            return decode_codes(self.model, [m[None] for m in codes])[0, :, :height, :width]
        device = self.model.device
        preview = self.model.decode_levels([m[None].to(device) for m in codes], len(codes))
        return from_model(preview.cpu())[0, :, :height, :width]

    def reconstruct(self, image: torch.Tensor, mode: str = "prior") -> torch.Tensor:
        """The model's own reconstruction of ``image``, which ``decompress(compress(image))`` returns."""
        return self.decode(self.encode(image, mode), image.shape[1], image.shape[2])

    def compress(self, image: torch.Tensor, mode: str = "prior") -> Compressed:
        """A uint8 image (C, H, W) -> its ``.vq`` file."""
        codes = self.encode(image, mode)
        ph, pw, th, tw = self._padded(image.shape[1], image.shape[2], mode)
        if mode == "prior":
            payloads, bits = self._prior_encode(codes, ph // th * (pw // tw))
        else:
            payloads = [pack_uniform([m.flatten().numpy()], [k]) for m, k in zip(codes, self.radices)]
            bits = sum(m.numel() * math.log2(k) for m, k in zip(codes, self.radices))
        header = Header(mode, image.shape[0], self.fingerprints[mode], image.shape[1], image.shape[2], ph, pw,
                        th, tw, [(m.shape[0], m.shape[1], k) for m, k in zip(codes, self.radices)],
                        [Segment(len(p), zlib.crc32(p), _crc_codes([m])) for p, m in zip(payloads, codes)])
        return Compressed(header.to_bytes() + b"".join(payloads), header, codes, bits)

    def decompress_codes(self, data: bytes, name: str = "<bytes>",
                         levels: int | None = None) -> tuple[Header, list[torch.Tensor]]:
        """A ``.vq`` file -> its header and the code maps of its top ``levels`` levels (None:
        every level, or those a file cut at the end of a level holds), checked against this
        codec. A version-1 file decodes whole and gives its top ``levels`` maps."""
        header, segments = parse(data, name, levels, [m.name for m in self.model.config.code_maps()])
        self._check_header(header, name)
        n = header.padded_height // header.tile_height * (header.padded_width // header.tile_width)
        codes: list[torch.Tensor] = []
        for segment, payload, span in zip(header.segments, segments, header.segment_levels()):
            shapes = [header.levels[level][:2] for level in span]
            if header.mode == "prior":
                maps = self._prior_decode(payload, n, codes, span, shapes, name, header.version)
            else:
                flat = unpack_uniform(payload, [h * w for h, w in shapes], [self.radices[i] for i in span])
                maps = [torch.from_numpy(c).reshape(h, w) for c, (h, w) in zip(flat, shapes)]
            if _crc_codes(maps) != segment.codes_crc:
                which = "" if len(span) > 1 or len(header.levels) == 1 else f" of level {span[0]}"
                raise CodecError(f"{name}: the decoded codes{which} do not match the file's checksum: the "
                                 "decoder's probabilities differ from the encoder's (another platform or torch "
                                 "build?)")
            codes += maps
        return header, codes[:levels]

    def decompress(self, data: bytes, name: str = "<bytes>", levels: int | None = None) -> torch.Tensor:
        """A ``.vq`` file -> the uint8 image (C, H, W); with ``levels`` (or from a file cut at the
        end of a level), the preview decoded from the top levels alone."""
        header, codes = self.decompress_codes(data, name, levels)
        return self.decode(codes, header.height, header.width)

    def _check_header(self, h: Header, name: str) -> None:
        if h.mode not in self.fingerprints:
            raise CodecError(f"{name}: coded with the priors (prior mode); give the prior runs, top-first")
        if h.fingerprint != self.fingerprints[h.mode]:
            what = "stage-1 model" if h.mode == "uniform" else "stage-1 model and priors"
            raise CodecError(f"{name}: made with another model: its fingerprint {h.fingerprint.hex()[:12]} is "
                             f"not this {what}'s ({self.fingerprints[h.mode].hex()[:12]})")
        expected = self._padded(h.height, h.width, h.mode)
        if h.channels != self.model.config.in_channels or \
                (h.padded_height, h.padded_width, h.tile_height, h.tile_width) != expected:
            raise CodecError(f"{name}: corrupt header: sizes do not fit the model")
        shapes = self.model.config.map_shapes(h.padded_height, h.padded_width)
        if [(lh, lw) for lh, lw, _ in h.levels] != [tuple(s) for s in shapes] or \
                [k for _, _, k in h.levels] != self.radices:
            raise CodecError(f"{name}: corrupt header: code maps {h.levels} do not fit the model")

    # -- prior mode: range coding with the priors' conditionals --

    def _states(self, maps_above: list[torch.Tensor], level: int, n: int, version: int):
        """The incremental state of level ``level``'s entropy model for a file of ``version``:
        the prior in float64 (portable versions) or as it is (the float32 softmax of versions 1, 2)."""
        link = self.chain[level]
        prior = link.prior
        if version >= PORTABLE_VERSION:
            if self._entropy_priors is None:
                self._entropy_priors = [copy.deepcopy(other.prior).double().cpu().eval() for other in self.chain]
            prior = self._entropy_priors[level]
        return prior.incremental(n, cond_codes=[maps_above[j].to(prior.device) for j in link.cond_levels])

    @staticmethod
    def _probabilities(state, i: int, j: int, version: int) -> np.ndarray:
        logits = state.logits(i, j)
        if version >= PORTABLE_VERSION:
            return portable_probabilities(logits)
        return logits.double().softmax(-1).cpu().numpy()

    def _tile_shapes(self) -> list[tuple[int, int]]:
        return [(link.prior.config.height, link.prior.config.width) for link in self.chain]

    @torch.no_grad()
    def _prior_encode(self, codes: list[torch.Tensor], n: int) -> tuple[list[bytes], float]:
        """Each level's codes range-coded in a stream of its own: (one payload per level, the
        ideal code length in bits)."""
        family = constriction.stream.model.Categorical(perfect=False)
        tiles = [_to_tiles(m, th, tw) for m, (th, tw) in zip(codes, self._tile_shapes())]
        bits = 0.0
        payloads = []
        with _one_thread():
            for level, t in enumerate(tiles):
                encoder = constriction.stream.queue.RangeEncoder()
                state = self._states(tiles, level, n, FORMAT_VERSION)
                for i in range(t.shape[1]):
                    for j in range(t.shape[2]):
                        probs = self._probabilities(state, i, j, FORMAT_VERSION)
                        symbols = t[:, i, j]
                        encoder.encode(symbols.numpy().astype(np.int32), family, probs)
                        bits -= float(np.log2(probs[np.arange(n), symbols.numpy()]).sum())
                        state.write(i, j, symbols)
                payloads.append(encoder.get_compressed().astype("<u4").tobytes())
        return payloads, bits

    @torch.no_grad()
    def _prior_decode(self, payload: bytes, n: int, above: list[torch.Tensor], span: range,
                      shapes: list[tuple[int, int]], name: str, version: int) -> list[torch.Tensor]:
        """The maps of the levels ``span`` from one range-coder stream of a file of format
        ``version``, given the decoded maps ``above`` of every level above them (top-first)."""
        words = np.frombuffer(payload, "<u4").astype(np.uint32)
        family = constriction.stream.model.Categorical(perfect=False)
        tile_shapes = self._tile_shapes()
        tiles = [_to_tiles(m, *tile_shapes[level]) for level, m in enumerate(above)]
        try:
            decoder = constriction.stream.queue.RangeDecoder(words)
            with _one_thread():
                for level in span:
                    th, tw = tile_shapes[level]
                    t = torch.zeros(n, th, tw, dtype=torch.long)
                    state = self._states(tiles, level, n, version)
                    for i in range(th):
                        for j in range(tw):
                            probs = self._probabilities(state, i, j, version)
                            t[:, i, j] = torch.from_numpy(decoder.decode(family, probs).astype(np.int64))
                            state.write(i, j, t[:, i, j])
                    tiles.append(t)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise CodecError(f"{name}: the payload does not decode ({e})") from None
        return [_from_tiles(t, h, w) for t, (h, w) in zip(tiles[len(above):], shapes)]

    # -- files --

    def compress_file(self, image_path: str | Path, out: str | Path, mode: str = "prior") -> Compressed:
        result = self.compress(load_image(image_path, None, self.model.config.in_channels), mode)
        atomic_write_bytes(out, result.data)
        return result

    def decompress_file(self, path: str | Path, out: str | Path, levels: int | None = None) -> tuple[torch.Tensor, int]:
        """Decode the file at ``path`` (with ``levels``, reading only its top levels' bytes) to
        the PNG ``out``: (the image, the number of levels it was decoded from)."""
        header, codes = self.decompress_codes(read_vq(path, levels), str(path), levels)
        image = self.decode(codes, header.height, header.width)
        save_png(image, out)
        return image, len(codes)


def _hash(obj: dict) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()
