"""A request body that tells ``progress`` of the bytes the client reads to send (and takes back what it re-reads)."""

from __future__ import annotations

import io
from typing import Any

from .base import Progress


class CountingBody(io.BytesIO):
    """A request body that tells ``progress`` of the bytes the client reads to send. A rewind (for a retry, or after
    the client hashed the body to sign it) takes back what was read past the new position; a seek that only
    measures the body (to its end and back) counts nothing."""

    def __init__(self, data: bytes, progress: Progress) -> None:
        super().__init__(data)
        self._progress = progress
        self._counted = 0  # bytes [0, _counted) have been reported

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        if self.tell() > self._counted:
            self._progress(self.tell() - self._counted)
            self._counted = self.tell()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        after = super().seek(offset, whence)
        if after < self._counted:
            self._progress(after - self._counted)
            self._counted = after
        return after


def request_body(data: bytes, progress: Progress | None) -> Any:
    """``data`` as is, or wrapped so that ``progress`` hears of every byte read from it."""
    return data if progress is None else CountingBody(data, progress)
