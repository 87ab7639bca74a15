"""Any other fsspec URL (memory://, sftp://, az://, ...). Reading works; the index swap is check-then-write, not an
atomic compare-and-swap, so two writers racing on one run can lose an update: writing needs the storage option
``unsafe_no_cas=true`` (see :meth:`~cloudckpt.backends.base.Backend.ensure_conditional_writes`)."""

from __future__ import annotations

import hashlib
from typing import Any

import fsspec

from ..errors import IndexConflictError, StoreError
from ..manifest import INDEX_NAME
from .base import UNCHANGED, Backend
from .fsspec_objects import FsspecObjects


class GenericBackend(FsspecObjects, Backend):
    verification = "object size"
    kind = "fsspec"
    OPTIONS = None  # passed to the fsspec filesystem, which refuses what it doesn't take

    def translate(self, exc: Exception) -> BaseException | None:
        """fsspec filesystems raise built-in errors (FileNotFoundError, PermissionError, OSError): those pass. Any
        other error of an implementation's own library is a StoreError (its retries are the implementation's)."""
        if type(exc).__module__ == "builtins":
            return None
        return super().translate(exc) or StoreError(f"{self.url}: {type(exc).__name__}: {exc}")

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self.fs, root = fsspec.core.url_to_fs(url.rstrip("/"), **self.storage_options)  # the real URL
        self.root = root.rstrip("/")

    def conditional_write_problem(self) -> str | None:
        return "this store has no conditional write (use s3://, gs://, az:// or a local path for atomic commits)"

    def read_index(self, known: Any = None) -> tuple[bytes | None, Any]:
        try:
            data = self.fs.cat_file(self._path(INDEX_NAME))
        except FileNotFoundError:
            return None, None
        token = hashlib.sha256(data).hexdigest()
        return (UNCHANGED if token == known else data), token

    def write_index(self, data: bytes, token: Any) -> Any:
        if self.read_index()[1] != token:
            raise IndexConflictError(f"{self.url}: index changed since it was read")
        self.fs.pipe_file(self._path(INDEX_NAME), data)
        return hashlib.sha256(data).hexdigest()
