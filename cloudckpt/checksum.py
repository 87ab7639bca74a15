"""Checksums of local files, streamed in blocks (memory stays bounded). crc32c by default, sha256 on request."""

from __future__ import annotations

import hashlib
from pathlib import Path

import google_crc32c

BLOCK = 8 * 2**20


def file_checksums(path: str | Path, *, sha256: bool = False) -> dict[str, str]:
    """Return ``{"crc32c": "<8 hex>"}`` (plus ``"sha256"`` when asked) for the file at ``path``."""
    crc = google_crc32c.Checksum()
    sha = hashlib.sha256() if sha256 else None
    with open(path, "rb", buffering=0) as f:
        while block := f.read(BLOCK):
            crc.update(block)
            if sha is not None:
                sha.update(block)
    out = {"crc32c": crc.digest().hex()}
    if sha is not None:
        out["sha256"] = sha.hexdigest()
    return out


def matches(path: str | Path, expected_crc32c: str | None, expected_sha256: str | None) -> bool:
    """True when the file's checksums equal every expected value given."""
    got = file_checksums(path, sha256=expected_sha256 is not None)
    if expected_crc32c is not None and got["crc32c"] != expected_crc32c:
        return False
    return expected_sha256 is None or got["sha256"] == expected_sha256
