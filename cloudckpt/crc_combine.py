"""The crc32c of a whole file from the crc32cs of its consecutive pieces, without reading the bytes again.

google-crc32c has no ``combine``; this is zlib's ``crc32_combine`` (GF(2) matrix arithmetic) with the Castagnoli
polynomial. Appending ``n`` bytes shifts a crc by a linear operator that depends on ``n`` only; it is built once per
length (cached) as 32 columns, so combining the equal-sized ranges of a ranged pull costs 32 XORs each.

Example:
    >>> import google_crc32c
    >>> a, b = b"check", b"point"
    >>> combine(google_crc32c.value(a), google_crc32c.value(b), len(b)) == google_crc32c.value(a + b)
    True
"""

from __future__ import annotations

from functools import lru_cache

_POLY = 0x82F63B78  # Castagnoli, reflected


def _times(matrix: tuple[int, ...] | list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, matrix[n]) for n in range(32)]


@lru_cache(maxsize=64)
def _operator(length: int) -> tuple[int, ...]:
    """The shift of a crc through ``length`` zero bytes (no pre/post conditioning) as a matrix of 32 columns:
    zlib's loop, with the columns of the identity carried instead of one crc (the shift is linear)."""
    acc = [1 << i for i in range(32)]
    odd = [_POLY] + [1 << n for n in range(31)]  # one zero bit
    even = _square(odd)  # two
    odd = _square(even)  # four
    while length:
        even = _square(odd)  # one zero byte at the first pass, then doubling
        if length & 1:
            acc = [_times(even, col) for col in acc]
        length >>= 1
        if not length:
            break
        odd = _square(even)
        if length & 1:
            acc = [_times(odd, col) for col in acc]
        length >>= 1
    return tuple(acc)


def combine(crc1: int, crc2: int, length2: int) -> int:
    """The crc32c of ``A + B`` from ``crc1`` (of A), ``crc2`` (of B) and ``length2`` (B's length in bytes)."""
    if length2 <= 0:
        return crc1
    return _times(_operator(length2), crc1) ^ crc2
