"""The ``.vq`` container: header layout, its checks, and reading a file (see ``vqkit.codec.codec``
for what the payload holds and how it is coded).

Version 3 (written since portable probabilities) is **progressive**: the levels' bytes follow
the header top-first, each in its own segment whose length and CRC the header gives, so the
first ``N`` segments alone decode the top ``N`` levels (a preview), and a download cut after
them is still a usable file. Its prior-mode probabilities are portable across CPUs
(``vqkit.codec.codec``, "Determinism"). Layout (little-endian)::

    magic      8 bytes  89 'VQK' 0d 0a 1a 0a
    version    u8       3
    mode       u8       0 uniform, 1 prior
    levels     u8       L, the model's code maps (levels; a residual level's stages one each)
    channels   u8       1 or 3
    fingerprint 32 bytes sha256 of the stage-1 (and, in prior mode, the priors') weights and configs
    height, width, padded_height, padded_width, tile_height, tile_width   u32 each
    L x (h, w, K, length, crc, codes_crc)   u32 each, top-first: the code map of the padded image,
                        its segment's length in bytes and CRC-32, and the CRC-32 of its codes (int32)
    header_crc u32      CRC-32 of every byte above
    L segments          top-first, ``length`` bytes each

Version 2 (still read) has version 3's layout, its prior-mode probabilities those of the
prior's float32 arithmetic, which decode only on a CPU whose arithmetic gives the same bits.
Version 1 (still read, float32 like version 2) holds every level in one segment, its checksums after the level table
and after the payload::

    magic .. tile_width as above (version 1), then L x (h, w, K) u32 each,
    codes_crc u32, payload_length u64, header_crc u32, payload, payload_crc u32

``parse`` checks the magic, version, header checksum, every field's range, the lengths and the
checksum of every segment it returns before any model work, so a damaged file gives a
``CodecError`` naming the problem (and the level) and never allocates more than its size limits
allow.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from vqkit.codec.packing import packable, uniform_payload_bytes
from vqkit.errors import CodecError, UsageError
from vqkit.nn.vqvae import level_names

MAGIC = b"\x89VQK\r\n\x1a\n"
FORMAT_VERSION = 3            # what this vqkit writes
READ_VERSIONS = (1, 2, 3)
# The first version whose prior-mode probabilities are portable (see vqkit.codec.codec).
PORTABLE_VERSION = 3
MODES = ("uniform", "prior")
MAX_LEVELS = 8
MAX_PIXELS = 1 << 26          # 64 megapixels: what a file may declare
MAX_CODEBOOK = 1 << 20

_FIXED = struct.Struct("<8sBBBB32s6I")
_LEVEL = struct.Struct("<6I")      # h, w, K, segment length, segment CRC, codes CRC
_LEVEL_V1 = struct.Struct("<3I")   # h, w, K
_TAIL_V1 = struct.Struct("<IQI")   # codes_crc, payload_length, header_crc
CRC = struct.Struct("<I")


@dataclass
class Segment:
    """The bytes of one or more levels (version 2 and later: exactly one): their ``length``, the CRC-32 of
    those bytes and the CRC-32 of the codes they decode to (int32, level after level)."""

    length: int
    crc: int
    codes_crc: int


@dataclass
class Header:
    """The fields of a ``.vq`` header; ``levels`` holds (h, w, K) per level, top-first;
    ``segments`` one ``Segment`` per level (version 2 and later) or one for all levels (version 1)."""

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
    segments: list[Segment]
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        """The header of FORMAT_VERSION (this vqkit writes no other)."""
        if self.version != FORMAT_VERSION or len(self.segments) != len(self.levels):
            raise CodecError(f"only version {FORMAT_VERSION} headers, one segment per level, are written")
        head = _FIXED.pack(MAGIC, FORMAT_VERSION, MODES.index(self.mode), len(self.levels), self.channels,
                           self.fingerprint, self.height, self.width, self.padded_height,
                           self.padded_width, self.tile_height, self.tile_width)
        head += b"".join(_LEVEL.pack(*level, s.length, s.crc, s.codes_crc)
                         for level, s in zip(self.levels, self.segments))
        return head + CRC.pack(zlib.crc32(head))

    @property
    def num_codes(self) -> int:
        return sum(h * w for h, w, _ in self.levels)

    @property
    def payload_length(self) -> int:
        """Bytes of every level's segment together."""
        return sum(s.length for s in self.segments)

    @property
    def size(self) -> int:
        """Bytes of the header (version 1: with the payload checksum that closes the file)."""
        return header_size(len(self.levels), self.version) + (CRC.size if self.version == 1 else 0)

    def segment_levels(self) -> list[range]:
        """The levels each segment holds, top-first."""
        if len(self.segments) == len(self.levels):
            return [range(level, level + 1) for level in range(len(self.levels))]
        return [range(len(self.levels))]


def header_size(levels: int, version: int = FORMAT_VERSION) -> int:
    """Bytes from the magic to the header checksum, included."""
    if version == 1:
        return _FIXED.size + levels * _LEVEL_V1.size + _TAIL_V1.size
    return _FIXED.size + levels * _LEVEL.size + CRC.size


def _level_label(level: int, levels: int, names: list[str] | None = None) -> str:
    if names is not None and len(names) == levels:
        return f"level {level} ({names[level]})" if levels > 1 else "level 0"
    return f"level {level} ({level_names(levels)[level]})" if levels > 1 else "level 0"


def parse(data: bytes, name: str = "<bytes>", levels: int | None = None,
          names: list[str] | None = None) -> tuple[Header, list[bytes]]:
    """Check a ``.vq`` file and split it into its header and the segments of its top levels.

    Needs no model: magic, version, header checksum, field ranges, lengths and the checksum of
    every segment returned. ``levels`` asks for the top ``levels`` levels only (``data`` may
    end after their segments); None asks for every level of a whole file, or, of a progressive
    file cut at the end of a level, every level it holds in full: a preview. A file cut inside a
    level that is asked for (a torn level) is refused. A version-1 file holds all its levels in
    one segment, returned whole whatever ``levels`` asks. Raises CodecError naming ``name`` and
    the first problem found, UsageError for a ``levels`` the file cannot have. ``names``, the
    code maps' names of the model the file is for (``CodeMap.name``), label its levels in the
    messages; without them the labels are a hierarchy's (``level_names``).
    """
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise CodecError(f"{name}: not a .vq file (it does not start with the vqkit magic bytes)")
    if len(data) < _FIXED.size:
        raise CodecError(f"{name}: truncated: {len(data)} bytes, shorter than the fixed header "
                         f"({_FIXED.size} bytes)")
    (_, version, mode, count, channels, fingerprint, height, width, padded_height, padded_width,
     tile_height, tile_width) = _FIXED.unpack_from(data)
    if version not in READ_VERSIONS:
        raise CodecError(f"{name}: .vq format version {version} is not supported (this vqkit reads "
                         f"versions {', '.join(map(str, READ_VERSIONS))})")
    if not 1 <= count <= MAX_LEVELS:
        raise CodecError(f"{name}: corrupt header: {count} levels (1 to {MAX_LEVELS} allowed)")
    size = header_size(count, version)
    if len(data) < size:
        raise CodecError(f"{name}: truncated: {len(data)} bytes, shorter than its header ({size} bytes)")
    if zlib.crc32(data[:size - 4]) != CRC.unpack_from(data, size - 4)[0]:
        raise CodecError(f"{name}: corrupt header (checksum mismatch)")
    if levels is not None and not 1 <= levels <= count:
        raise UsageError(f"{name}: levels must be in 1..{count} (the file holds {count} level(s)), got {levels}")
    table = _LEVEL if version >= 2 else _LEVEL_V1
    rows = [table.unpack_from(data, _FIXED.size + i * table.size) for i in range(count)]
    if version >= 2:
        segments = [Segment(*row[3:]) for row in rows]
    else:
        codes_crc, payload_length, _ = _TAIL_V1.unpack_from(data, size - _TAIL_V1.size)
        payload_crc = CRC.unpack_from(data, size + payload_length)[0] \
            if len(data) >= size + payload_length + CRC.size else 0
        segments = [Segment(payload_length, payload_crc, codes_crc)]
    header = Header(MODES[mode] if mode < len(MODES) else str(mode), channels, fingerprint, height, width,
                    padded_height, padded_width, tile_height, tile_width, [tuple(row[:3]) for row in rows],
                    segments, version)
    _check_fields(header, name)
    if version == 1:
        return header, [_whole_v1(data, header, name)]
    return header, _segments(data, header, name, levels, names)


def _whole_v1(data: bytes, header: Header, name: str) -> bytes:
    size, length = header_size(len(header.levels), 1), header.payload_length
    expected = size + length + CRC.size
    if len(data) < expected:
        raise CodecError(f"{name}: truncated: the header announces {length} payload bytes "
                         f"({expected} bytes in all) but the file holds {len(data)} bytes (a version-1 "
                         "file, whose levels share one checksummed segment, decodes only whole)")
    if len(data) > expected:
        raise CodecError(f"{name}: {len(data) - expected} unexpected bytes after the end of the payload")
    payload = data[size:size + length]
    if zlib.crc32(payload) != header.segments[0].crc:
        raise CodecError(f"{name}: corrupt payload (checksum mismatch)")
    return payload


def _segments(data: bytes, header: Header, name: str, levels: int | None,
              names: list[str] | None) -> list[bytes]:
    count = len(header.levels)
    offset = header_size(count)
    out: list[bytes] = []
    for level, segment in enumerate(header.segments[:levels or count]):
        end = offset + segment.length
        if len(data) < end:
            if levels is None and len(data) == offset:
                break  # cut at the end of a level: a preview of the levels above
            label = _level_label(level, count, names)
            hint = (f"; its first {level} level(s) are complete: decode those alone (levels={level})"
                    if level else "; no level is complete")
            raise CodecError(f"{name}: truncated inside {label}: the file holds {len(data) - offset} of its "
                             f"{segment.length} bytes{hint}")
        chunk = data[offset:end]
        if zlib.crc32(chunk) != segment.crc:
            raise CodecError(f"{name}: corrupt payload: {_level_label(level, count, names)} fails its checksum")
        out.append(chunk)
        offset = end
    if not out:
        raise CodecError(f"{name}: truncated: the file ends after its header, before any level")
    if (levels is None or levels == count) and len(out) == count and len(data) > offset:
        raise CodecError(f"{name}: {len(data) - offset} unexpected bytes after the end of the payload")
    return out


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
    elif h.mode == "uniform" and (h.num_codes > h.padded_height * h.padded_width or any(
            not packable(counts, radices) or s.length != uniform_payload_bytes(counts, radices)
            for s, counts, radices in _segment_codes(h))):
        problem = (f"uniform-mode segments of {[s.length for s in h.segments]} bytes do not match their "
                   "code maps")
    elif h.mode == "prior" and any(s.length % 4 for s in h.segments):
        problem = f"prior-mode segments of {[s.length for s in h.segments]} bytes are not whole 32-bit words"
    if problem:
        raise CodecError(f"{name}: corrupt header: {problem}")


def _segment_codes(h: Header):
    """Per segment: itself, the code counts and the codebook sizes of the levels it holds."""
    for segment, levels in zip(h.segments, h.segment_levels()):
        yield (segment, [h.levels[i][0] * h.levels[i][1] for i in levels], [h.levels[i][2] for i in levels])


def read_vq(path: str | Path, levels: int | None = None) -> bytes:
    """The bytes of a ``.vq`` file; refuses one larger than any image the format allows could need.

    With ``levels``, a progressive (version 2 or later) file is read only as far as the end of its top
    ``levels`` levels' segments, as the header gives them; ``parse`` checks what was read.
    """
    path = Path(path)
    size = path.stat().st_size
    limit = MAX_PIXELS * 4 + (1 << 20)
    if size > limit:
        raise CodecError(f"{path}: {size} bytes is larger than any .vq file can be ({limit})")
    with path.open("rb") as f:
        head = f.read(_FIXED.size)
        if levels is None or len(head) < _FIXED.size or head[:len(MAGIC)] != MAGIC or head[8] < 2 \
                or not 1 <= head[10] <= MAX_LEVELS:
            return head + f.read()
        table = f.read(head[10] * _LEVEL.size + CRC.size)
        lengths = [_LEVEL.unpack_from(table, i * _LEVEL.size)[3]
                   for i in range(min(levels, head[10])) if (i + 1) * _LEVEL.size <= len(table)]
        return head + table + f.read(sum(lengths))
