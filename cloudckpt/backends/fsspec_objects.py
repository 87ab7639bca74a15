"""Object I/O through an fsspec filesystem (s3fs, gcsfs, or any other): the data half of a backend.

Used by :class:`~cloudckpt.backends.generic.GenericBackend` for every non-S3/GCS URL, and by the S3 and GCS backends
with the storage option ``transport="fsspec"`` (data through s3fs/gcsfs, the index still swapped by the SDK's
conditional write). Subclasses set ``self.fs`` and ``self.root`` (the run's path inside ``fs``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checksum import BLOCK
from ..errors import IntegrityError
from ..source import Source
from .base import ObjectInfo, Progress


def _callback(progress: Progress | None) -> dict[str, Any]:
    """``callback=`` for fsspec's get_file that tells ``progress`` of the bytes moved."""
    if progress is None:
        return {}
    from fsspec.callbacks import Callback

    report = progress  # narrowed to not-None for the class body

    class _Bytes(Callback):
        seen = 0

        def call(self, *args: Any, **kwargs: Any) -> None:
            delta, self.seen = self.value - self.seen, self.value
            if delta:
                report(delta)

    return {"callback": _Bytes()}


def _discard(out: Any) -> None:
    """Throw away a write-mode fsspec file after a failure: closing it would store the bytes written so far."""
    try:
        out.discard()  # s3fs aborts its multipart upload, gcsfs cancels its resumable one
    except Exception:
        pass
    out.closed = True  # or its __del__ would close it, finishing the upload with a partial file


class FsspecObjects:
    fs: Any
    root: str
    url: str

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _fs_crc32c(self, info: dict) -> str | None:
        value = info.get("crc32c")  # gcsfs reports the server's crc32c, base64
        if isinstance(value, str):
            try:
                return base64.b64decode(value).hex()
            except ValueError:
                return None
        return None

    def upload(self, source: Source, rel: str, *, deadline: float | None = None,
               progress: Progress | None = None) -> None:
        # The bytes go to the filesystem through a write-mode file (it buffers one block and sends it as a part):
        # what is sent is exactly what ``source`` hashed, in one pass, and no copy of the whole file is held.
        path = self._path(rel)
        source.progress = progress
        self.fs.mkdirs(self.fs._parent(path), exist_ok=True)  # as put_file does: FTP/SFTP need the directory
        out = self.fs.open(path, "wb")
        try:
            for block in source.blocks():
                out.write(block)
                self.remaining(deadline)  # type: ignore[attr-defined]
            out.close()
        except BaseException:
            _discard(out)
            raise
        self.fs.invalidate_cache(path)
        info = self.fs.info(path)
        if int(info.get("size") or 0) != source.size:
            raise IntegrityError(f"{self.url}/{rel}: stored object is {info.get('size')} bytes, expected {source.size}")
        server, want = self._fs_crc32c(info), source.crc32c()
        if server is not None and server != want:
            raise IntegrityError(f"{self.url}/{rel}: server crc32c {server} differs from the bytes sent {want}")
        self.check_uploaded(rel, want)  # type: ignore[attr-defined]

    def download(self, rel: str, local: Path, *, deadline: float | None = None,
                 progress: Progress | None = None) -> None:
        self.fs.get_file(self._path(rel), str(local), **_callback(progress))

    def read_stream(self, rel: str, sink: Callable[[bytes], object], *, deadline: float | None = None) -> None:
        with self.fs.open(self._path(rel), "rb", block_size=BLOCK, cache_type="none") as f:
            while block := f.read(BLOCK):
                sink(block)
                self.remaining(deadline)  # type: ignore[attr-defined]

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def read_range(self, rel: str, start: int, length: int, *, deadline: float | None = None,
                   last: bool = False) -> bytes:
        if length == 0:
            return b""
        self.remaining(deadline)  # type: ignore[attr-defined]
        # by keyword: s3fs takes ``version_id`` as its second positional argument
        data = self.fs.cat_file(self._path(rel), start=start, end=start + length + last)
        return self.check_range(rel, start, length, data, last)  # type: ignore[attr-defined]

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)

    def list_objects(self) -> list[ObjectInfo]:
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created") or 0
            if isinstance(mtime, str):
                from datetime import datetime

                mtime = datetime.fromisoformat(mtime.replace("Z", "+00:00"))
            out.append(ObjectInfo(path[len(self.root) + 1:], int(info.get("size") or 0),
                                  mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)))
        return out

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            try:
                self.fs.rm_file(self._path(rel))
            except FileNotFoundError:
                pass
