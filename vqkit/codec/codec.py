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

Determinism. The decoder must see bit for bit the probabilities the encoder used. Both run
the same computation: the prior's incremental state (``Prior.incremental``), position by
position over the same batch of tiles, on one torch thread (so no reduction is split
differently between threads), then ``softmax`` in float64; ``constriction``'s
``Categorical(perfect=False)`` turns those floats into integer frequencies by deterministic
fixed-point arithmetic (every symbol keeps a nonzero frequency). A CRC of the codes in the
header turns any disagreement (say, another CPU's float arithmetic) into an error.

File layout (little-endian)::

    magic      8 bytes  89 'VQK' 0d 0a 1a 0a
    version    u8       FORMAT_VERSION
    mode       u8       0 uniform, 1 prior
    levels     u8       L
    channels   u8       1 or 3
    fingerprint 32 bytes sha256 of the stage-1 (and, in prior mode, the priors') weights and configs
    height, width, padded_height, padded_width, tile_height, tile_width   u32 each
    L x (h, w, K)       u32 each, top-first: the code maps of the padded image
    codes_crc  u32      CRC-32 of the codes (int32, level after level)
    payload_length u64
    header_crc u32      CRC-32 of every byte above
    payload    payload_length bytes
    payload_crc u32     CRC-32 of the payload

The reader checks the magic, version, header checksum, every field's range, the length and
the payload checksum before any model work, so a damaged file gives a ``CodecError`` naming
the problem and never allocates more than its size limits allow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import constriction
import numpy as np
import torch
import torch.nn.functional as F

from vqkit.data.datasets import to_model
from vqkit.data.images import load_image, save_png
from vqkit.errors import UsageError, VqkitError
from vqkit.fsutil import atomic_write_bytes
from vqkit.nn.vqvae import VQVAE
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.generate import LevelPrior, check_chain, decode_codes

MAGIC = b"\x89VQK\r\n\x1a\n"
FORMAT_VERSION = 1
MODES = ("uniform", "prior")
MAX_LEVELS = 8
MAX_PIXELS = 1 << 26          # 64 megapixels: what a file may declare
MAX_CODEBOOK = 1 << 20
# Uniform mode with a codebook size that is not a power of two packs all codes into one big
# number, whose base conversion grows faster than linearly; it is limited to this many codes.
MAX_MIXED_RADIX_CODES = 1 << 16

_FIXED = struct.Struct("<8sBBBB32s6I")
_LEVEL = struct.Struct("<3I")
_TAIL = struct.Struct("<IQI")      # codes_crc, payload_length, header_crc
_CRC = struct.Struct("<I")


class CodecError(VqkitError, ValueError):
    """A ``.vq`` file that cannot be decoded, or an image that cannot be coded; the message
    names the file and the problem."""


@dataclass
class Header:
    """The fields of a ``.vq`` header; ``levels`` holds (h, w, K) per level, top-first."""

    mode: str
    channels: int
    fingerprint: bytes
    height: int
    width: int
    padded_height: int
    padded_width: int
    tile_height: int
    tile_width: int
    levels: list[tuple[int, int, int]]
    codes_crc: int
    payload_length: int

    def to_bytes(self) -> bytes:
        head = _FIXED.pack(MAGIC, FORMAT_VERSION, MODES.index(self.mode), len(self.levels), self.channels,
                           self.fingerprint, self.height, self.width, self.padded_height,
                           self.padded_width, self.tile_height, self.tile_width)
        head += b"".join(_LEVEL.pack(*level) for level in self.levels)
        head += struct.pack("<IQ", self.codes_crc, self.payload_length)
        return head + _CRC.pack(zlib.crc32(head))

    @property
    def num_codes(self) -> int:
        return sum(h * w for h, w, _ in self.levels)


def header_size(levels: int) -> int:
    return _FIXED.size + levels * _LEVEL.size + _TAIL.size


def parse(data: bytes, name: str = "<bytes>") -> tuple[Header, bytes]:
    """Check a whole ``.vq`` file and split it into its header and payload.

    Needs no model: magic, version, header checksum, field ranges, length and payload checksum.
    Raises CodecError naming ``name`` and the first problem found.
    """
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise CodecError(f"{name}: not a .vq file (it does not start with the vqkit magic bytes)")
    if len(data) < _FIXED.size:
        raise CodecError(f"{name}: truncated: {len(data)} bytes, shorter than the fixed header "
                         f"({_FIXED.size} bytes)")
    (_, version, mode, levels, channels, fingerprint, height, width, padded_height, padded_width,
     tile_height, tile_width) = _FIXED.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CodecError(f"{name}: .vq format version {version} is not supported (this vqkit reads "
                         f"version {FORMAT_VERSION})")
    if not 1 <= levels <= MAX_LEVELS:
        raise CodecError(f"{name}: corrupt header: {levels} levels (1 to {MAX_LEVELS} allowed)")
    size = header_size(levels)
    if len(data) < size:
        raise CodecError(f"{name}: truncated: {len(data)} bytes, shorter than its header ({size} bytes)")
    codes_crc, payload_length, header_crc = _TAIL.unpack_from(data, size - _TAIL.size)
    if zlib.crc32(data[:size - 4]) != header_crc:
        raise CodecError(f"{name}: corrupt header (checksum mismatch)")
    shapes = [_LEVEL.unpack_from(data, _FIXED.size + i * _LEVEL.size) for i in range(levels)]
    header = Header(MODES[mode] if mode < len(MODES) else str(mode), channels, fingerprint, height, width,
                    padded_height, padded_width, tile_height, tile_width, [tuple(s) for s in shapes],
                    codes_crc, payload_length)
    _check_fields(header, name)
    expected = size + payload_length + _CRC.size
    if len(data) < expected:
        raise CodecError(f"{name}: truncated: the header announces {payload_length} payload bytes "
                         f"({expected} bytes in all) but the file holds {len(data)} bytes")
    if len(data) > expected:
        raise CodecError(f"{name}: {len(data) - expected} unexpected bytes after the end of the payload")
    payload = data[size:size + payload_length]
    if zlib.crc32(payload) != _CRC.unpack_from(data, size + payload_length)[0]:
        raise CodecError(f"{name}: corrupt payload (checksum mismatch)")
    return header, payload


def _check_fields(h: Header, name: str) -> None:
    problem = None
    if h.mode not in MODES:
        problem = f"unknown coding mode {h.mode}"
    elif h.channels not in (1, 3):
        problem = f"{h.channels} channels (1 or 3 allowed)"
    elif not (1 <= h.height <= h.padded_height and 1 <= h.width <= h.padded_width):
        problem = f"image size {h.height}x{h.width} does not fit its padded size {h.padded_height}x{h.padded_width}"
    elif h.padded_height * h.padded_width > MAX_PIXELS:
        problem = f"padded size {h.padded_height}x{h.padded_width} exceeds {MAX_PIXELS} pixels"
    elif not (1 <= h.tile_height <= h.padded_height and 1 <= h.tile_width <= h.padded_width) \
            or h.padded_height % h.tile_height or h.padded_width % h.tile_width:
        problem = f"tile {h.tile_height}x{h.tile_width} does not divide the padded size"
    elif h.padded_height - h.height >= h.tile_height or h.padded_width - h.width >= h.tile_width:
        problem = "more padding than one tile"
    elif any(not (1 <= lh <= h.padded_height and 1 <= lw <= h.padded_width and 1 <= k <= MAX_CODEBOOK)
             for lh, lw, k in h.levels):
        problem = f"code map shapes {h.levels} do not fit the image"
    elif h.mode == "uniform" and (h.num_codes > h.padded_height * h.padded_width
                                  or not _packable([lh * lw for lh, lw, _ in h.levels], [k for _, _, k in h.levels])
                                  or h.payload_length != uniform_payload_bytes(
                                      [lh * lw for lh, lw, _ in h.levels], [k for _, _, k in h.levels])):
        problem = f"a uniform-mode payload of {h.payload_length} bytes does not match its code maps"
    elif h.mode == "prior" and h.payload_length % 4:
        problem = f"a prior-mode payload of {h.payload_length} bytes is not whole 32-bit words"
    if problem:
        raise CodecError(f"{name}: corrupt header: {problem}")


# --- uniform mode: mixed-radix packing ------------------------------------------------------

def uniform_payload_bytes(counts: Sequence[int], radices: Sequence[int]) -> int:
    """``ceil(sum_l counts[l] * log2 radices[l] / 8)``, computed exactly: the bytes of the
    largest number ``prod_l K_l ** n_l - 1``."""
    if all(k & (k - 1) == 0 for k in radices):
        return (sum(n * (k.bit_length() - 1) for n, k in zip(counts, radices)) + 7) // 8
    if not _packable(counts, radices):
        raise CodecError(f"uniform mode with codebook sizes {list(radices)} (not all powers of two) is "
                         f"limited to {MAX_MIXED_RADIX_CODES} codes; this image has {sum(counts)}")
    total = 1
    for n, k in zip(counts, radices):
        total *= k ** n
    return ((total - 1).bit_length() + 7) // 8


def _packable(counts: Sequence[int], radices: Sequence[int]) -> bool:
    return all(k & (k - 1) == 0 for k in radices) or sum(counts) <= MAX_MIXED_RADIX_CODES


def pack_uniform(levels: Sequence[np.ndarray], radices: Sequence[int]) -> bytes:
    """Codes of every level (flat int arrays, values < K_l) -> the bytes of the number whose
    mixed-radix digits they are, least significant first; exactly ``uniform_payload_bytes``."""
    size = uniform_payload_bytes([len(c) for c in levels], radices)
    if all(k & (k - 1) == 0 for k in radices):
        bits = [((c.astype(np.int64)[:, None] >> np.arange(k.bit_length() - 1)) & 1).astype(np.uint8).ravel()
                for c, k in zip(levels, radices)]
        return np.packbits(np.concatenate(bits), bitorder="little").tobytes().ljust(size, b"\0")
    digits, radix = _flatten(levels, radices)
    return _to_int(digits, radix, 0, len(digits))[0].to_bytes(size, "little")


def unpack_uniform(payload: bytes, counts: Sequence[int], radices: Sequence[int]) -> list[np.ndarray]:
    """Inverse of ``pack_uniform``; raises CodecError when the number is out of range."""
    if len(payload) != uniform_payload_bytes(counts, radices):
        raise CodecError(f"uniform payload of {len(payload)} bytes does not hold {sum(counts)} codes")
    if all(k & (k - 1) == 0 for k in radices):
        bits = np.unpackbits(np.frombuffer(payload, np.uint8), bitorder="little").astype(np.int64)
        out, at = [], 0
        for n, k in zip(counts, radices):
            b = k.bit_length() - 1
            chunk = bits[at:at + n * b].reshape(n, b)
            out.append((chunk << np.arange(b)).sum(1) if b else np.zeros(n, np.int64))
            at += n * b
        if bits[at:].any():
            raise CodecError("uniform payload has bits set beyond its last code")
        return out
    radix = np.concatenate([np.full(n, k, np.int64) for n, k in zip(counts, radices)])
    value = int.from_bytes(payload, "little")
    if value >= _product(radix, 0, len(radix)):
        raise CodecError("uniform payload holds a number beyond its code maps' range")
    digits = np.zeros(len(radix), np.int64)
    _from_int(value, radix, 0, len(radix), digits)
    out, at = [], 0
    for n in counts:
        out.append(digits[at:at + n])
        at += n
    return out


def _flatten(levels, radices) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([c.astype(np.int64) for c in levels]),
            np.concatenate([np.full(len(c), k, np.int64) for c, k in zip(levels, radices)]))


def _product(radix: np.ndarray, a: int, b: int) -> int:
    values, counts = np.unique(radix[a:b], return_counts=True)
    return math.prod(int(v) ** int(c) for v, c in zip(values, counts))


def _to_int(digits: np.ndarray, radix: np.ndarray, a: int, b: int) -> tuple[int, int]:
    """(value, radix product) of digits[a:b], by halves so big-number products stay balanced."""
    if b - a <= 32:
        value, scale = 0, 1
        for d, r in zip(digits[a:b].tolist(), radix[a:b].tolist()):
            value += d * scale
            scale *= r
        return value, scale
    m = (a + b) // 2
    low, low_scale = _to_int(digits, radix, a, m)
    high, high_scale = _to_int(digits, radix, m, b)
    return low + low_scale * high, low_scale * high_scale


def _from_int(value: int, radix: np.ndarray, a: int, b: int, out: np.ndarray) -> None:
    if b - a <= 32:
        for i in range(a, b):
            value, out[i] = divmod(value, int(radix[i]))
        return
    m = (a + b) // 2
    high, low = divmod(value, _product(radix, a, m))
    _from_int(low, radix, a, m, out)
    _from_int(high, radix, m, b, out)


# --- the codec ------------------------------------------------------------------------------

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
        return len(self.data) - self.header.payload_length - _CRC.size


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
        self.stride = config.total_stride
        self.radices = list(config.codebook_sizes)
        stage1 = {"fingerprint": stage1_fingerprint, "config": config.to_dict()}
        self.fingerprints = {"uniform": _hash({"stage1": stage1})}
        self.tile = None
        if chain is not None:
            self.fingerprints["prior"] = _hash({"stage1": stage1, "priors": [
                {"fingerprint": fp, "config": link.prior.config.to_dict()}
                for fp, link in zip(prior_fingerprints, chain)]})
            self.tile = self._tile_of(chain)

    @classmethod
    def load(cls, run: str | Path, priors: Sequence[str | Path] = ()) -> "Codec":
        """The codec of stage-1 run ``run`` with the prior runs ``priors`` (top-first; none:
        uniform mode only). Each prior must have been fitted to this run's model."""
        model, checkpoint = ckpt.load_model(Path(run))
        fingerprint = checkpoint.state.get("fingerprint", "")
        if not priors:
            return cls(model, fingerprint)
        chain = [LevelPrior.load(p) for p in priors]
        for link in chain:
            if link.source.get("fingerprint") != fingerprint:
                raise ckpt.CheckpointError(
                    f"{link.run / 'config.json'}: the prior was fitted to codes of another model than "
                    f"{run}'s latest checkpoint (fingerprint {str(link.source.get('fingerprint'))[:12]} vs "
                    f"{fingerprint[:12]})")
        check_chain(chain, model)
        return cls(model, fingerprint, chain,
                   [ckpt.latest_checkpoint(link.run).state.get("fingerprint", "") for link in chain])

    def _tile_of(self, chain: list[LevelPrior]) -> tuple[int, int]:
        strides = self.model.config.level_strides()
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
        """Code maps -> the uint8 image (C, height, width), cropped from the padded decoding."""
        return decode_codes(self.model, [m[None] for m in codes])[0, :, :height, :width]

    def reconstruct(self, image: torch.Tensor, mode: str = "prior") -> torch.Tensor:
        """The model's own reconstruction of ``image``, which ``decompress(compress(image))`` returns."""
        return self.decode(self.encode(image, mode), image.shape[1], image.shape[2])

    def compress(self, image: torch.Tensor, mode: str = "prior") -> Compressed:
        """A uint8 image (C, H, W) -> its ``.vq`` file."""
        codes = self.encode(image, mode)
        ph, pw, th, tw = self._padded(image.shape[1], image.shape[2], mode)
        if mode == "prior":
            payload, bits = self._prior_encode(codes, ph // th * (pw // tw))
        else:
            payload = pack_uniform([m.flatten().numpy() for m in codes], self.radices)
            bits = sum(m.numel() * math.log2(k) for m, k in zip(codes, self.radices))
        header = Header(mode, image.shape[0], self.fingerprints[mode], image.shape[1], image.shape[2], ph, pw,
                        th, tw, [(m.shape[0], m.shape[1], k) for m, k in zip(codes, self.radices)],
                        _crc_codes(codes), len(payload))
        data = header.to_bytes() + payload + _CRC.pack(zlib.crc32(payload))
        return Compressed(data, header, codes, bits)

    def decompress_codes(self, data: bytes, name: str = "<bytes>") -> tuple[Header, list[torch.Tensor]]:
        """A ``.vq`` file -> its header and code maps, checked against this codec."""
        header, payload = parse(data, name)
        self._check_header(header, name)
        counts = [h * w for h, w, _ in header.levels]
        if header.mode == "prior":
            tiles = header.padded_height // header.tile_height * (header.padded_width // header.tile_width)
            codes = self._prior_decode(payload, tiles, [(h, w) for h, w, _ in header.levels], name)
        else:
            flat = unpack_uniform(payload, counts, self.radices)
            codes = [torch.from_numpy(c).reshape(h, w) for c, (h, w, _) in zip(flat, header.levels)]
        if _crc_codes(codes) != header.codes_crc:
            raise CodecError(f"{name}: the decoded codes do not match the file's checksum: the decoder's "
                             "probabilities differ from the encoder's (another platform or torch build?)")
        return header, codes

    def decompress(self, data: bytes, name: str = "<bytes>") -> torch.Tensor:
        """A ``.vq`` file -> the uint8 image (C, H, W)."""
        header, codes = self.decompress_codes(data, name)
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
        shapes = self.model.config.latent_shapes(h.padded_height, h.padded_width)
        if [(lh, lw) for lh, lw, _ in h.levels] != [tuple(s) for s in shapes] or \
                [k for _, _, k in h.levels] != self.radices:
            raise CodecError(f"{name}: corrupt header: code maps {h.levels} do not fit the model")

    # -- prior mode: range coding with the priors' conditionals --

    def _states(self, maps_above: list[torch.Tensor], level: int, n: int):
        link = self.chain[level]
        return link.prior.incremental(n, cond_codes=[maps_above[j] for j in link.cond_levels])

    def _tile_shapes(self) -> list[tuple[int, int]]:
        return [(link.prior.config.height, link.prior.config.width) for link in self.chain]

    @torch.no_grad()
    def _prior_encode(self, codes: list[torch.Tensor], n: int) -> tuple[bytes, float]:
        encoder = constriction.stream.queue.RangeEncoder()
        family = constriction.stream.model.Categorical(perfect=False)
        tiles = [_to_tiles(m, th, tw) for m, (th, tw) in zip(codes, self._tile_shapes())]
        bits = 0.0
        with _one_thread():
            for level, t in enumerate(tiles):
                state = self._states(tiles, level, n)
                for i in range(t.shape[1]):
                    for j in range(t.shape[2]):
                        probs = state.logits(i, j).double().softmax(-1).numpy()
                        symbols = t[:, i, j]
                        encoder.encode(symbols.numpy().astype(np.int32), family, probs)
                        bits -= float(np.log2(probs[np.arange(n), symbols.numpy()]).sum())
                        state.write(i, j, symbols)
        return encoder.get_compressed().astype("<u4").tobytes(), bits

    @torch.no_grad()
    def _prior_decode(self, payload: bytes, n: int, shapes: list[tuple[int, int]], name: str) -> list[torch.Tensor]:
        words = np.frombuffer(payload, "<u4").astype(np.uint32)
        family = constriction.stream.model.Categorical(perfect=False)
        tiles: list[torch.Tensor] = []
        try:
            decoder = constriction.stream.queue.RangeDecoder(words)
            with _one_thread():
                for level, (th, tw) in enumerate(self._tile_shapes()):
                    t = torch.zeros(n, th, tw, dtype=torch.long)
                    state = self._states(tiles, level, n)
                    for i in range(th):
                        for j in range(tw):
                            probs = state.logits(i, j).double().softmax(-1).numpy()
                            t[:, i, j] = torch.from_numpy(decoder.decode(family, probs).astype(np.int64))
                            state.write(i, j, t[:, i, j])
                    tiles.append(t)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise CodecError(f"{name}: the payload does not decode ({e})") from None
        return [_from_tiles(t, h, w) for t, (h, w) in zip(tiles, shapes)]

    # -- files --

    def compress_file(self, image_path: str | Path, out: str | Path, mode: str = "prior") -> Compressed:
        result = self.compress(load_image(image_path, None, self.model.config.in_channels), mode)
        atomic_write_bytes(out, result.data)
        return result

    def decompress_file(self, path: str | Path, out: str | Path) -> torch.Tensor:
        image = self.decompress(read_vq(path), str(path))
        save_png(image, out)
        return image


def read_vq(path: str | Path) -> bytes:
    """The bytes of a ``.vq`` file; refuses one larger than any image the format allows could need."""
    path = Path(path)
    size = path.stat().st_size
    limit = MAX_PIXELS * 4 + (1 << 20)
    if size > limit:
        raise CodecError(f"{path}: {size} bytes is larger than any .vq file can be ({limit})")
    return path.read_bytes()


def _hash(obj: dict) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()
