"""Checksums of local files, streamed in blocks (memory stays bounded). crc32c by default, sha256 on request."""

from __future__ import annotations

import contextvars
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import google_crc32c

BLOCK = 8 * 2**20
#: a file's crc32c alone (no sha256) is computed in pieces of this size on :data:`HASH_THREADS` threads and the
#: pieces' crc32cs combined (google-crc32c lets other threads run): a re-used 1 GiB file is checked in about half
#: the time of one pass on the 2-core test machines, the reads from the page cache in parallel too
PIECE = 64 * 2**20
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


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


def file_crc32c(path: str | Path, *, check: Callable[[], None] | None = None) -> tuple[int, str]:
    """The size and crc32c (hex) of the file at ``path``; a file over one :data:`PIECE` is read and hashed in
    pieces on several threads. ``check()`` runs before each block (it may raise to stop, in the caller's context)."""
    from .crc_combine import combine

    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        count = max(1, -(-size // PIECE))

        def piece(i: int) -> tuple[int, int]:
            crc, done, start, end = 0, 0, i * PIECE, min(size, (i + 1) * PIECE)
            while start + done < end:
                if check is not None:
                    check()
                block = os.pread(f.fileno(), min(BLOCK, end - start - done), start + done)
                if not block:
                    break  # the file shrank meanwhile: the total says so
                crc = google_crc32c.extend(crc, block)
                done += len(block)
            return crc, done

        if count == 1:
            results = [piece(0)]
        else:
            ctx = contextvars.copy_context()  # the caller's: ``check`` may read its cancel token
            with ThreadPoolExecutor(min(HASH_THREADS, count), thread_name_prefix="cloudckpt-hash") as pool:
                results = list(pool.map(lambda i: ctx.copy().run(piece, i), range(count)))
        now = os.fstat(f.fileno()).st_size
    crc, total = results[0]
    for c, n in results[1:]:
        crc = combine(crc, c, n)
        total += n
    # a file that grew or shrank while it was read is reported at its new size: it matches no expected size
    return (total if now == size else now), f"{crc:08x}"


def matches(path: str | Path, expected_crc32c: str | None, expected_sha256: str | None) -> bool:
    """True when the file's checksums equal every expected value given."""
    got = file_checksums(path, sha256=expected_sha256 is not None)
    if expected_crc32c is not None and got["crc32c"] != expected_crc32c:
        return False
    return expected_sha256 is None or got["sha256"] == expected_sha256


class WritableFile(Protocol):
    """What :class:`HashingWriter` writes through to: a binary file that can restart from the beginning."""

    def write(self, data: bytes, /) -> int: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def truncate(self, size: int | None = None, /) -> int: ...
    def flush(self) -> None: ...


class HashingWriter:
    """A write-only file that computes the crc32c of exactly the bytes written to it, in order (a client that
    restarts from the beginning seeks to 0: the file is truncated and the hash starts over).

    Example:
        >>> import io
        >>> w = HashingWriter(io.BytesIO())
        >>> _ = w.write(b"weights")
        >>> w.crc32c()
        '923eaa45'
    """

    def __init__(self, f: WritableFile, progress: Callable[[int], None] | None = None) -> None:
        self._f = f
        self._progress = progress
        self._crc = google_crc32c.Checksum()
        self.written = 0

    def write(self, data: bytes) -> int:
        self._crc.update(data)
        self.written += len(data)
        if self._progress is not None:
            self._progress(len(data))
        return self._f.write(data)

    def tell(self) -> int:
        return self.written

    def seek(self, offset: int, whence: int = 0) -> int:
        if (offset, whence) != (0, 0):
            raise OSError("a hashed download can only restart from the beginning")
        self._f.seek(0)
        self._f.truncate()
        self._crc = google_crc32c.Checksum()
        if self._progress is not None and self.written:
            self._progress(-self.written)  # the bytes written so far are written again: take them back
        self.written = 0
        return 0

    def flush(self) -> None:
        self._f.flush()

    def crc32c(self) -> str:
        return self._crc.digest().hex()
