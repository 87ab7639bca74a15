"""A local file being pushed, read once: the bytes handed to the store are hashed as they are read, and a change to
the file while it is pushed is detected, so the checksum a manifest records is the checksum of the bytes stored.

A trainer may save over a file while a push (or ``sync``) reads it. Hashing in a separate pass beside the upload
could then record one version's checksum for another version's bytes, and a torn mixture could be committed. Here
one sequential read feeds both the hash and the upload; :meth:`Source.check_unchanged` then proves the bytes read
are one consistent version of the file: its inode, size and mtime (``fstat`` of the open file, nanoseconds) must be
those seen before the first read. If only its ctime moved (a hard link added or removed: the Keras writer renames
each new version over the name that an older one, still being pushed, had), the bytes are read again and compared.
A file modified within :data:`RACY_SECONDS` before its first read is "racy" (a write in the same timestamp tick may
not move the mtime, as git's racy-clean problem); it is hashed once more after the upload and the two hashes compared.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
    >>> _ = p.write_bytes(b"weights")
    >>> with Source(p) as src:
    ...     data = src.read()
    ...     src.check_unchanged()
    ...     src.crc32c()
    '923eaa45'
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import google_crc32c

from .checksum import BLOCK
from .errors import SourceChangedError

log = logging.getLogger(__name__)

#: a file whose mtime/ctime is this close to the start of its read is re-hashed after the upload
RACY_SECONDS = 2.0


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Source:
    """A read-only, seekable view of one local file for one upload attempt; hashes each byte the first time it is
    read (crc32c, and sha256 when asked). Reads never go past the size seen at open.

    Clients that retry a chunk seek back and read it again: bytes below the hashed mark are not hashed twice, and if
    they differ from the first read the file changed, which :meth:`check_unchanged` reports.

    Args:
        path: the local file.
        sha256: also compute sha256. Default False.
        progress: told ``progress(n)`` of the bytes read as they go; a seek back takes back what was read past the
            new position (those bytes are sent again). A backend may set :attr:`progress` instead. Default None.
    """

    def __init__(self, path: str | Path, *, sha256: bool = False,
                 progress: Callable[[int], None] | None = None) -> None:
        self.progress = progress
        self.path = Path(path)
        try:
            self._f: BinaryIO = open(self.path, "rb", buffering=0)
        except FileNotFoundError as e:
            raise SourceChangedError(f"{self.path}: the file was removed while it was pushed; push a finished "
                                     "checkpoint") from e
        st = os.fstat(self._f.fileno())
        self._before = _signature(st)
        self._racy = max(st.st_mtime_ns, st.st_ctime_ns) >= time.time_ns() - int(RACY_SECONDS * 1e9)
        self._begin(st.st_size, sha256)

    def _begin(self, size: int, sha256: bool) -> None:
        self.size = size
        self._crc = google_crc32c.Checksum()
        self._sha = hashlib.sha256() if sha256 else None
        self._hashed = 0  # bytes [0, _hashed) went into the hashes, in order
        self._pos = 0
        self._counted = 0  # bytes [0, _counted) were reported to ``progress``

    def _pread(self, n: int, pos: int) -> bytes:
        return os.pread(self._f.fileno(), n, pos)

    # --- file-like, for clients that read a stream ------------------------------------------------------------

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left of the size seen at open when ``n`` < 0) from the current position."""
        left = self.size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = self._pread(n, self._pos)
        start = self._pos
        self._pos += len(data)
        if start <= self._hashed < self._pos:
            fresh = data if start == self._hashed else data[self._hashed - start:]
            self._crc.update(fresh)
            if self._sha is not None:
                self._sha.update(fresh)
            self._hashed = self._pos
        if self.progress is not None and self._pos > self._counted:
            self.progress(self._pos - self._counted)
            self._counted = self._pos
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def blocks(self, size: int = BLOCK) -> Iterator[bytes]:
        """Yield the rest of the file in blocks of ``size`` bytes."""
        while block := self.read(size):
            yield block

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        if self.progress is not None and self._pos < self._counted:
            self.progress(self._pos - self._counted)  # bytes to be sent again: take them back
            self._counted = self._pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what was read ------------------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True once every byte of the file (its size at open) has been read and hashed."""
        return self._hashed == self.size

    def crc32c(self) -> str:
        """crc32c (hex) of the bytes read; the whole file must have been read."""
        self._require_complete()
        return self._crc.digest().hex()

    def sha256(self) -> str | None:
        self._require_complete()
        return self._sha.hexdigest() if self._sha is not None else None

    def _require_complete(self) -> None:
        if not self.complete:
            self.check_unchanged()  # a file that shrank reads short: that is a change, say so
            raise RuntimeError(f"{self.path}: only {self._hashed} of {self.size} bytes were read")

    def changed(self) -> str | None:
        """Why the file is not the version whose bytes were read (None if it is)."""
        try:
            now = _signature(os.fstat(self._f.fileno()))
        except (OSError, ValueError):
            return "it could no longer be examined"
        if now[:4] != self._before[:4]:
            return "its size or modification time changed"
        if self._hashed < self.size:
            return None  # not read to the end yet (an upload that failed early): nothing more to compare
        # Re-read when the file was modified just before the read (a later write may not have moved the
        # timestamps), or when only its ctime moved: a link added or removed (a new version renamed over the name the
        # file had) moves the ctime without touching the bytes, and the bytes decide.
        if self._racy or now[4] != self._before[4]:
            crc = google_crc32c.Checksum()
            offset = 0
            while offset < self.size:
                block = os.pread(self._f.fileno(), min(BLOCK, self.size - offset), offset)
                if not block:
                    break
                crc.update(block)
                offset += len(block)
            if offset != self.size or crc.digest() != self._crc.digest():
                return "its bytes changed (read again after the upload)"
        return None

    def check_unchanged(self, cause: BaseException | None = None) -> None:
        """Raise SourceChangedError (caused by ``cause``) if the file changed since this Source was opened."""
        why = self.changed()
        if why is not None:
            raise SourceChangedError(f"{self.path}: the file changed while it was pushed ({why}); push a finished "
                                     "checkpoint, or save to a new file and rename it into place") from cause


class MemorySource(Source):
    """A :class:`Source` over bytes cloudckpt staged in memory itself (e.g. the items a DCP rank serialized), which
    nothing else can change: no file to write first and read back, nothing to re-read after the upload.

    Args:
        chunks: the bytes, in order (not joined: a read that spans two chunks copies only what it returns).
        name: what messages call it.
        sha256: also compute sha256. Default False.
        progress: as :class:`Source`'s.
    """

    def __init__(self, chunks: Sequence[bytes], name: str, *, sha256: bool = False,
                 progress: Callable[[int], None] | None = None) -> None:
        self.progress = progress
        self.path = Path(name)
        self._chunks = list(chunks)
        self._starts = list(itertools.accumulate((len(c) for c in self._chunks), initial=0))
        self._closed = False
        self._begin(self._starts[-1], sha256)

    def _pread(self, n: int, pos: int) -> bytes:
        i = bisect.bisect_right(self._starts, pos) - 1
        out = []
        while n > 0 and i < len(self._chunks):
            piece = self._chunks[i][pos - self._starts[i]:pos - self._starts[i] + n]  # a whole chunk: no copy
            out.append(piece)
            n -= len(piece)
            pos += len(piece)
            i += 1
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def changed(self) -> str | None:
        return None  # immutable bytes
