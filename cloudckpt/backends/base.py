"""The storage backend contract: object I/O under a run's root, plus the one conditional write the commit needs.

A backend knows nothing of checkpoints: it moves bytes to and from ``<root>/<rel>``, lists and deletes them, and
reads/writes the index with compare-and-swap. ``rel`` is always a ``/``-separated path relative to the run root.
Everything above (commit protocol, restore, gc) is written once against this contract.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ..errors import IntegrityError

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


#: returned by ``read_index(known=token)`` instead of the bytes when the index is still at ``token``
UNCHANGED = b"\x00cloudckpt-unchanged"


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object: path relative to the run root, size in bytes, last-modified time (unix seconds)."""

    rel: str
    size: int
    mtime: float


class Backend(ABC):
    """Bytes under one run URL. Subclasses implement the abstract methods; the rest is shared."""

    #: True when :meth:`write_index` is a real atomic compare-and-swap on this store.
    atomic: bool = True
    #: What a verified upload checked on this store, for logs and docs.
    verification: str = "size"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.verify_readback = bool(self.storage_options.pop("verify_readback", False))

    # --- the index: read with a version token, write only if the token still holds -----------------------------

    @abstractmethod
    def read_index(self, known: Any = None) -> tuple[bytes | None, Any]:
        """Return ``(bytes, token)``, ``(None, None)`` when the run has no index yet, or ``(UNCHANGED, known)`` when
        the index is still at the ``known`` token (so a writer's cached copy needn't be downloaded or parsed)."""

    @abstractmethod
    def write_index(self, data: bytes, token: Any) -> Any:
        """Replace the index if it is still at ``token`` (None: only if absent), else raise IndexConflictError;
        return the new token."""

    # --- objects ------------------------------------------------------------------------------------------------

    @abstractmethod
    def upload(self, local: Path, rel: str, *, size: int, crc32c: Callable[[], str],
               progress: Progress | None = None) -> None:
        """Store the file at ``rel`` and check what the store can check (see :attr:`verification`). ``crc32c()``
        gives the file's crc32c (hex); it may still be being computed while the bytes go out, so call it only once
        the transfer is done. ``progress(n)`` is told of bytes sent as they go (negative when a part is resent)."""

    @abstractmethod
    def download(self, rel: str, local: Path, *, progress: Progress | None = None) -> str | None:
        """Write the object at ``rel`` to the local file (streamed), telling ``progress(n)`` of bytes written.
        Return the crc32c (hex) that the client verified the written bytes against while streaming, or None when
        it verified none (the caller hashes)."""

    def read_stream(self, rel: str, sink: Callable[[bytes], None]) -> None:
        """Feed the object's bytes to ``sink`` in blocks as they arrive, writing no file (memory stays bounded).
        FileNotFoundError when the object is missing. This default goes through a temporary file; the backends
        here stream."""
        import tempfile

        from ..checksum import BLOCK

        with tempfile.TemporaryDirectory(prefix="cloudckpt-read-") as tmp:
            probe = Path(tmp) / "probe"
            self.download(rel, probe)
            with open(probe, "rb") as f:
                while block := f.read(BLOCK):
                    sink(block)

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Small objects only (manifests)."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Small objects only (manifests)."""

    @abstractmethod
    def list_objects(self) -> list[ObjectInfo]:
        """Every object under the run root."""

    @abstractmethod
    def delete(self, rels: list[str]) -> None:
        """Delete these objects; missing ones are ignored."""

    def check_access(self) -> None:
        """Raise AccessError/CheckpointNotFoundError early for a missing bucket or denied access (default: no-op)."""

    def check_uploaded(self, rel: str, crc32c: str) -> None:
        """With the ``verify_readback`` option: download the object again and compare its crc32c (any store)."""
        if not self.verify_readback:
            return
        from ..checksum import StreamChecksums

        sums = StreamChecksums()
        self.read_stream(rel, sums.update)  # streamed through the hash: no copy in the temp directory
        got = sums.result()["crc32c"]
        if got != crc32c:
            raise IntegrityError(f"{self.url}/{rel}: read-back crc32c {got} != {crc32c}")

    def describe(self) -> str:
        return self.url
