"""The ``.vq`` container: header layout, its checks, and reading a file (see ``vqkit.codec.codec``
for what the payload holds and how it is coded).

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

``parse`` checks the magic, version, header checksum, every field's range, the length and the
payload checksum before any model work, so a damaged file gives a ``CodecError`` naming the
problem and never allocates more than its size limits allow.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from vqkit.codec.packing import packable, uniform_payload_bytes
from vqkit.errors import CodecError

MAGIC = b"\x89VQK\r\n\x1a\n"
FORMAT_VERSION = 1
MODES = ("uniform", "prior")
MAX_LEVELS = 8
MAX_PIXELS = 1 << 26          # 64 megapixels: what a file may declare
MAX_CODEBOOK = 1 << 20

_FIXED = struct.Struct("<8sBBBB32s6I")
_LEVEL = struct.Struct("<3I")
_TAIL = struct.Struct("<IQI")      # codes_crc, payload_length, header_crc
CRC = struct.Struct("<I")


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
        return head + CRC.pack(zlib.crc32(head))

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
    expected = size + payload_length + CRC.size
    if len(data) < expected:
        raise CodecError(f"{name}: truncated: the header announces {payload_length} payload bytes "
                         f"({expected} bytes in all) but the file holds {len(data)} bytes")
    if len(data) > expected:
        raise CodecError(f"{name}: {len(data) - expected} unexpected bytes after the end of the payload")
    payload = data[size:size + payload_length]
    if zlib.crc32(payload) != CRC.unpack_from(data, size + payload_length)[0]:
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
                                  or not packable([lh * lw for lh, lw, _ in h.levels], [k for _, _, k in h.levels])
                                  or h.payload_length != uniform_payload_bytes(
                                      [lh * lw for lh, lw, _ in h.levels], [k for _, _, k in h.levels])):
        problem = f"a uniform-mode payload of {h.payload_length} bytes does not match its code maps"
    elif h.mode == "prior" and h.payload_length % 4:
        problem = f"a prior-mode payload of {h.payload_length} bytes is not whole 32-bit words"
    if problem:
        raise CodecError(f"{name}: corrupt header: {problem}")


def read_vq(path: str | Path) -> bytes:
    """The bytes of a ``.vq`` file; refuses one larger than any image the format allows could need."""
    path = Path(path)
    size = path.stat().st_size
    limit = MAX_PIXELS * 4 + (1 << 20)
    if size > limit:
        raise CodecError(f"{path}: {size} bytes is larger than any .vq file can be ({limit})")
    return path.read_bytes()
