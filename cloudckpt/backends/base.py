"""The storage backend contract: object I/O under a run's root, plus the one conditional write the commit needs.

A backend knows nothing of checkpoints: it moves bytes to and from ``<root>/<rel>``, lists and deletes them, and
reads/writes the index with compare-and-swap. ``rel`` is always a ``/``-separated path relative to the run root.
Everything above (commit protocol, restore, gc) is written once against this contract.

Errors are translated where they arise: every contract method (and the constructor) of every backend runs inside
its :meth:`Backend.translate`, which turns its client library's errors into the cloudckpt hierarchy (access denied,
no credentials or no such bucket: AccessError; a lost conditional write: IndexConflictError; anything else the
store answered: StoreError, transient or not) or the built-ins the contract names (a missing object:
FileNotFoundError). Nothing above a backend sees an SDK's exception.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import retry
from ..errors import CloudCkptError, ConfigurationError, IntegrityError, StoreError
from ..redact import redact_url
from ..source import Source

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


#: the storage option / environment variable that accepts a store whose conditional writes are not enforced
UNSAFE_OPTION = "unsafe_no_cas"
UNSAFE_ENV = "CLOUDCKPT_UNSAFE_NO_CAS"

#: returned by ``read_index(known=token)`` instead of the bytes when the index is still at ``token``
UNCHANGED = b"\x00cloudckpt-unchanged"

#: storage options every store understands (read by :class:`Backend` itself)
COMMON_OPTIONS = frozenset({"verify_readback", UNSAFE_OPTION, "connect_timeout", "read_timeout"})

#: the methods that run inside :meth:`Backend.translate` (the constructor and the contract)
_BOUNDARY = ("__init__", "read_index", "write_index", "put_if", "upload", "download", "read_stream", "read_bytes",
             "read_range",
             "write_bytes", "list_objects", "delete", "conditional_write_problem")


def _at_boundary(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with its client's errors translated by the backend's :meth:`Backend.translate`."""

    @functools.wraps(method)
    def translated(self: Backend, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (CloudCkptError, ImportError):  # typed already; a missing client library is open_backend's to name
            raise
        except Exception as exc:
            typed = self.translate(exc)
            if typed is None or typed is exc:
                raise
            raise typed from exc

    translated.at_boundary = True  # type: ignore[attr-defined]
    return translated


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object: path relative to the run root, size in bytes, last-modified time (unix seconds)."""

    rel: str
    size: int
    mtime: float


class Backend(ABC):
    """Bytes under one run URL. Subclasses implement the abstract methods and :meth:`translate`; the rest is shared.

    Storage options other than :data:`COMMON_OPTIONS` and the subclass's :attr:`OPTIONS` are refused at once.
    """

    #: What a verified upload checked on this store, for logs and docs.
    verification: str = "size"
    #: the store's name in messages
    kind: str = "local"
    #: storage options this store understands besides :data:`COMMON_OPTIONS`; None: any (passed to its client)
    OPTIONS: frozenset[str] | None = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _BOUNDARY:
            method = getattr(cls, name, None)
            if callable(method) and not getattr(method, "at_boundary", False) \
                    and not getattr(method, "__isabstractmethod__", False):
                setattr(cls, name, _at_boundary(method))

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = redact_url(url.rstrip("/"))  # shown and recorded; a subclass connects with the real ``url``
        self.storage_options = dict(storage_options or {})
        unknown = set(self.storage_options) - COMMON_OPTIONS - (self.OPTIONS or set())
        if self.OPTIONS is not None and unknown:
            raise ConfigurationError(f"{self.url}: unknown {self.kind} storage option(s) {sorted(unknown)}; known: "
                                     f"{sorted(COMMON_OPTIONS | self.OPTIONS)}")
        self.verify_readback = bool(self.storage_options.pop("verify_readback", False))
        unsafe = self.storage_options.pop(UNSAFE_OPTION, None)
        self.unsafe_no_cas = _truthy(os.environ.get(UNSAFE_ENV) if unsafe is None else unsafe)
        self._cas_checked = False
        self._cas_lock = threading.Lock()
        connect, read = self.storage_options.pop("connect_timeout", 10), self.storage_options.pop("read_timeout", 60)
        try:
            self.timeout = (float(connect), float(read))  # seconds for a connection / between bytes of an answer
        except (TypeError, ValueError):
            self.timeout = (-1.0, -1.0)
        if min(self.timeout) <= 0:
            raise ConfigurationError(f"{self.url}: connect_timeout and read_timeout are seconds > 0. Received: "
                                     f"connect_timeout={connect!r}, read_timeout={read!r}")

    def translate(self, exc: Exception) -> BaseException | None:
        """The typed error that ``exc``, raised by this store's client library, stands for.

        None lets ``exc`` through as it is: a built-in the contract names, or a programming error. Default: a broken
        connection or answer of the HTTP stack under the clients (urllib3, http.client) is a transient StoreError.
        """
        import http.client

        broken: tuple[type[Exception], ...] = (http.client.HTTPException,)
        try:
            import urllib3  # under boto3 and requests; not needed by a local store

            broken += (urllib3.exceptions.HTTPError,)
        except ImportError:
            pass
        if isinstance(exc, broken):
            return StoreError(f"{self.url}: {type(exc).__name__}: {exc}", transient=True)
        return None

    # --- the index: read with a version token, write only if the token still holds -----------------------------

    @abstractmethod
    def read_index(self, known: Any = None) -> tuple[bytes | None, Any]:
        """Return the index's ``(bytes, token)``.

        ``(None, None)`` when the run has no index yet; ``(UNCHANGED, known)`` when the index is still at the ``known``
        token (so a writer's cached copy needn't be downloaded or parsed).
        """

    @abstractmethod
    def write_index(self, data: bytes, token: Any) -> Any:
        """Replace the index if it is still at ``token`` (None: only if absent); return the new token.

        Raises IndexConflictError when the index is no longer at ``token``.
        """

    # --- objects ------------------------------------------------------------------------------------------------

    @abstractmethod
    def upload(self, source: Source, rel: str, *, deadline: float | None = None,
               progress: Progress | None = None) -> None:
        """Store the bytes of ``source`` at ``rel`` and check them.

        ``source`` is read once in order (it hashes what is read; a client's retry may seek back and read again);
        what the store can check is compared with ``source.crc32c()`` (see :attr:`verification`): IntegrityError
        when the stored object differs. ``deadline`` (``time.monotonic()``): stop with TimeoutError once it has
        passed. ``progress(n)`` is told of bytes sent as they go (negative when bytes are sent again).
        """

    @abstractmethod
    def download(self, rel: str, local: Path, *, deadline: float | None = None,
                 progress: Progress | None = None) -> str | None:
        """Write the object at ``rel`` to the local file (streamed), telling ``progress(n)`` of bytes written. Return
        the crc32c (hex) of exactly the bytes written, computed or checked as they were written, or None when it has
        none (the caller hashes the file)."""

    @abstractmethod
    def read_stream(self, rel: str, sink: Callable[[bytes], object], *, deadline: float | None = None) -> None:
        """Feed the object's bytes to ``sink`` in blocks as they arrive, writing no file (memory stays bounded).
        FileNotFoundError when the object is missing; TimeoutError once ``deadline`` has passed."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Small objects only (manifests)."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Small objects only (manifests)."""

    def read_range(self, rel: str, start: int, length: int, *, deadline: float | None = None,
                   last: bool = False) -> bytes:
        """``length`` bytes of the object at ``rel`` from byte ``start`` (one ranged GET; nothing else of the object
        is fetched). FileNotFoundError when the object is missing; IntegrityError when it ends before
        ``start + length`` (callers ask only for ranges a validated manifest promises) or, with ``last``, when it
        goes on past it (one byte more is asked for: an object extended after its commit is caught by the same GET).
        ``length`` >= 1 with ``last``. ``deadline`` (``time.monotonic()``): the client's own retries end there;
        TimeoutError once it has passed."""
        raise NotImplementedError(f"{type(self).__name__} has no ranged read")

    def past_end(self, rel: str, start: int) -> IntegrityError:
        """The error for a ranged read the store refused as past the object's end (HTTP 416)."""
        return IntegrityError(f"{self.url}/{rel}: the object ends before byte {start} (the object is shorter than "
                              "its manifest says)")

    def check_range(self, rel: str, start: int, length: int, data: bytes, last: bool = False) -> bytes:
        """``data`` if it is the ``length`` bytes asked for at ``start`` (asked with one more if ``last``), else
        IntegrityError: the object is shorter than that, or (``last``) longer."""
        if last and len(data) > length:
            raise IntegrityError(f"{self.url}/{rel}: the object goes on past byte {start + length} (the object is "
                                 "longer than its manifest says)")
        if len(data) != length:
            raise IntegrityError(f"{self.url}/{rel}: asked for {length} bytes at {start}, the store returned "
                                 f"{len(data)} (the object is shorter than its manifest says)")
        return data

    @abstractmethod
    def list_objects(self) -> list[ObjectInfo]:
        """Every object under the run root."""

    @abstractmethod
    def delete(self, rels: list[str]) -> None:
        """Delete these objects; missing ones are ignored."""

    # --- is this store fit for the commit protocol? --------------------------------------------------------------

    def ensure_conditional_writes(self, budget: float = 60.0) -> None:
        """Before this backend's first write: check that the store enforces the conditional write the index relies
        on (:meth:`conditional_write_problem`), once per backend object. Where it doesn't, raise ConfigurationError
        naming the option that accepts the risk (``unsafe_no_cas=true`` / ``$CLOUDCKPT_UNSAFE_NO_CAS=1``)."""
        with self._cas_lock:
            if self._cas_checked:
                return
            if self.unsafe_no_cas:
                log.warning("%s: conditional writes are not checked (%s): concurrent writers can lose index updates "
                            "and a superseded writer is not fenced", self.url, UNSAFE_OPTION)
            else:
                problem = retry.run(self.conditional_write_problem, url=self.url, what="check conditional writes",
                                    budget=budget)
                if problem:
                    raise ConfigurationError(
                        f"{self.url}: refusing to write: {problem}; concurrent writers could lose index updates. "
                        f"To accept the risk (one writer at a time), set the storage option {UNSAFE_OPTION}=true "
                        f"(-o {UNSAFE_OPTION}=true) or {UNSAFE_ENV}=1")
                log.debug("%s: conditional writes are enforced", self.url)
            self._cas_checked = True

    def conditional_write_problem(self) -> str | None:
        """Why this store can't be trusted with the index's compare-and-swap, or None. Default: probe an object
        with :meth:`put_if` (see :mod:`~cloudckpt.backends.capabilities`)."""
        from .capabilities import object_cas_problem

        return object_cas_problem(self.put_if, self.read_bytes, self.delete)

    def put_if(self, rel: str, data: bytes, token: Any) -> Any:
        """Write a small object only if it is still at ``token`` (None: only if absent), else raise
        IndexConflictError; return the new token. The index's :meth:`write_index` is this on ``index.json``."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional write")

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

    @staticmethod
    def remaining(deadline: float | None) -> float | None:
        """Seconds left until ``deadline`` (None: no deadline); TimeoutError once it has passed."""
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the transfer's wall-clock budget is spent")
        return left


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("", "0", "false", "no", "off"):
            return False
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        raise ConfigurationError(f"{UNSAFE_OPTION} must be true or false. Received: {value!r}")
    return bool(value)
