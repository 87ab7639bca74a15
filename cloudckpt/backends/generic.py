"""Any other fsspec URL (memory://, sftp://, az://, ...). Works, but the index swap is check-then-write, not an
atomic compare-and-swap, so two writers racing on one run can lose an update: a warning says so."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import fsspec

from ..errors import IndexConflictError, IntegrityError
from ..manifest import INDEX_NAME
from .base import Backend, ObjectInfo


class GenericBackend(Backend):
    atomic = False
    verification = "object size"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        warnings.warn(f"{url}: this store has no conditional write; commits there are not atomic against a concurrent "
                      "writer (use s3://, gs:// or a local path for that)", stacklevel=3)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read_index(self) -> tuple[bytes | None, Any]:
        try:
            data = self.fs.cat_file(self._path(INDEX_NAME))
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def write_index(self, data: bytes, token: Any) -> None:
        if self.read_index()[1] != token:
            raise IndexConflictError(f"{self.url}: index changed since it was read")
        self.fs.pipe_file(self._path(INDEX_NAME), data)

    def upload(self, local: Path, rel: str, *, size: int, crc32c: str) -> None:
        self.fs.put_file(str(local), self._path(rel))
        got = self.fs.info(self._path(rel))["size"]
        if got != size:
            raise IntegrityError(f"{self.url}/{rel}: stored object is {got} bytes, expected {size}")
        self.check_uploaded(rel, crc32c)

    def download(self, rel: str, local: Path) -> None:
        self.fs.get_file(self._path(rel), str(local))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)

    def list_objects(self) -> list[ObjectInfo]:
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for path, info in found.items():
            mtime = info.get("mtime") or info.get("created") or 0
            out.append(ObjectInfo(path[len(self.root) + 1:], int(info.get("size") or 0),
                                  mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)))
        return out

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            try:
                self.fs.rm_file(self._path(rel))
            except FileNotFoundError:
                pass
