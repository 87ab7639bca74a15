"""Checksums of local files, streamed in blocks (memory stays bounded). crc32c by default, sha256 on request."""

from __future__ import annotations

import hashlib
from pathlib import Path

import google_crc32c

BLOCK = 8 * 2**20


class StreamChecksums:
    """Checksums of bytes fed in blocks (``update``), e.g. an object streamed from a store: size, crc32c, sha256."""

    def __init__(self, *, sha256: bool = False) -> None:
        self.size = 0
        self._crc = google_crc32c.Checksum()
        self._sha = hashlib.sha256() if sha256 else None

    def update(self, block: bytes) -> None:
        self.size += len(block)
        self._crc.update(block)
        if self._sha is not None:
            self._sha.update(block)

    def result(self) -> dict[str, str]:
        """``{"crc32c": "<8 hex>"}``, plus ``"sha256"`` when asked for."""
        out = {"crc32c": self._crc.digest().hex()}
        if self._sha is not None:
            out["sha256"] = self._sha.hexdigest()
        return out


def file_checksums(path: str | Path, *, sha256: bool = False) -> dict[str, str]:
    """Return ``{"crc32c": "<8 hex>"}`` (plus ``"sha256"`` when asked) for the file at ``path``."""
    sums = StreamChecksums(sha256=sha256)
    with open(path, "rb", buffering=0) as f:
        while block := f.read(BLOCK):
            sums.update(block)
    return sums.result()


def matches(path: str | Path, expected_crc32c: str | None, expected_sha256: str | None) -> bool:
    """True when the file's checksums equal every expected value given."""
    got = file_checksums(path, sha256=expected_sha256 is not None)
    if expected_crc32c is not None and got["crc32c"] != expected_crc32c:
        return False
    return expected_sha256 is None or got["sha256"] == expected_sha256
