"""The storage backend contract: object I/O under a run's root, plus the one conditional write the commit needs.

A backend knows nothing of checkpoints: it moves bytes to and from ``<root>/<rel>``, lists and deletes them, and
reads/writes the index with compare-and-swap. ``rel`` is always a ``/``-separated path relative to the run root.
Everything above (commit protocol, restore, gc) is written once against this contract.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, IntegrityError
from ..source import Source

log = logging.getLogger(__name__)


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
        connect, read = self.storage_options.pop("connect_timeout", 10), self.storage_options.pop("read_timeout", 60)
        try:
            self.timeout = (float(connect), float(read))  # seconds for a connection / between bytes of an answer
        except (TypeError, ValueError):
            self.timeout = (-1.0, -1.0)
        if min(self.timeout) <= 0:
            raise ConfigurationError(f"{self.url}: connect_timeout and read_timeout are seconds > 0. Received: "
                                     f"connect_timeout={connect!r}, read_timeout={read!r}")

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
    def upload(self, source: Source, rel: str, *, deadline: float | None = None) -> None:
        """Store the bytes of ``source`` at ``rel``, read from it once in order (it hashes what is read; a client's
        retry may seek back and read again), and check what the store can check against ``source.crc32c()`` (see
        :attr:`verification`): raise IntegrityError when the stored object differs. ``deadline``
        (``time.monotonic()``): stop with TimeoutError once it has passed."""

    @abstractmethod
    def download(self, rel: str, local: Path, *, deadline: float | None = None) -> str | None:
        """Write the object at ``rel`` to the local file (streamed). Return the crc32c (hex) of exactly the bytes
        written, computed or checked as they were written, or None when it has none (the caller hashes the file)."""

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
        import tempfile

        from ..checksum import file_checksums

        with tempfile.TemporaryDirectory(prefix="cloudckpt-readback-") as tmp:
            probe = Path(tmp) / "probe"
            got = self.download(rel, probe) or file_checksums(probe)["crc32c"]
        if got != crc32c:
            raise IntegrityError(f"{self.url}/{rel}: read-back crc32c {got} != {crc32c}")

    @staticmethod
    def remaining(deadline: float | None) -> float | None:
        """Seconds left until ``deadline`` (None: no deadline); TimeoutError once it has passed."""
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the transfer's wall-clock budget is spent")
        return left

    def describe(self) -> str:
        return self.url
