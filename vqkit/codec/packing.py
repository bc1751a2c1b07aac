"""Uniform mode's payload: the codes of every level as one number in mixed radix ``K_l``, exactly
``ceil(sum_l n_l log2 K_l / 8)`` bytes, the ``log K`` per latent that stage 1 assumes. With every
``K_l`` a power of two the digits are bit fields; otherwise the number is built by base
conversion, limited to ``MAX_MIXED_RADIX_CODES`` codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vqkit.errors import CodecError

# Uniform mode with a codebook size that is not a power of two packs all codes into one big
# number, whose base conversion grows faster than linearly; it is limited to this many codes.
MAX_MIXED_RADIX_CODES = 1 << 16


def uniform_payload_bytes(counts: Sequence[int], radices: Sequence[int]) -> int:
    """``ceil(sum_l counts[l] * log2 radices[l] / 8)``, computed exactly: the bytes of the
    largest number ``prod_l K_l ** n_l - 1``."""
    if all(k & (k - 1) == 0 for k in radices):
        return (sum(n * (k.bit_length() - 1) for n, k in zip(counts, radices)) + 7) // 8
    if not packable(counts, radices):
        raise CodecError(f"uniform mode with codebook sizes {list(radices)} (not all powers of two) is "
                         f"limited to {MAX_MIXED_RADIX_CODES} codes; this image has {sum(counts)}")
    total = 1
    for n, k in zip(counts, radices):
        total *= k ** n
    return ((total - 1).bit_length() + 7) // 8


def packable(counts: Sequence[int], radices: Sequence[int]) -> bool:
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
