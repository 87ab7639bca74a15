"""Moving a checkpoint's files: scan local files, upload them in parallel with retries (each hashed as it is read,
in the same pass), download and verify them. Each file is one retried operation with its own wall-clock budget
(the clients' per-request timeouts bound an attempt that hangs); the backend does the streaming."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import cancel, retry
from .backends import Backend
from .checksum import StreamChecksums
from .errors import ConfigurationError, IntegrityError, SourceChangedError, UnsafePathError
from .fetch import RangePool, fetch_file
from .layout import manifest_key, object_key
from .manifest import FileEntry, Manifest, check_relative_path, parse_manifest
from .source import MemorySource, Source

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
Progress = Callable[[int], None]


@dataclass(frozen=True)
class LocalFile:
    """A file to push: where it is, and its path inside the checkpoint."""

    path: Path
    rel: str


@dataclass(frozen=True)
class StagedFile:
    """A file to push whose bytes cloudckpt itself staged in memory (``chunks``, in order; immutable): uploaded from
    there, with no local file written and read back."""

    chunks: tuple[bytes, ...]
    rel: str

    def source(self, sha256: bool) -> MemorySource:
        return MemorySource(self.chunks, f"<{self.rel} in memory>", sha256=sha256)


def scan(source: str | Path) -> list[LocalFile]:
    """List the files of a checkpoint at ``source``: one file, or every file below a directory (sorted).

    Symbolic links and names that can't be stored safely are a ConfigurationError (a checkpoint stores bytes, not
    links that may point anywhere).
    """
    root = Path(source)
    if root.is_symlink():
        raise ConfigurationError(f"{source}: is a symbolic link; push the file it points to")
    if root.is_file():
        return [LocalFile(root, _rel(root.name))]
    if not root.is_dir():
        raise ConfigurationError(f"{source}: no such file or directory to push")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                raise ConfigurationError(f"{p}: symbolic links can't be part of a checkpoint")
        for name in filenames:
            p = Path(dirpath) / name
            files.append(LocalFile(p, _rel(p.relative_to(root).as_posix())))
    if not files:
        raise ConfigurationError(f"{source}: the directory is empty; nothing to push")
    return sorted(files, key=lambda f: f.rel)


def _rel(path: str) -> str:
    try:
        return check_relative_path(path)
    except UnsafePathError as e:
        raise ConfigurationError(f"can't push {path!r}: {e}") from None


def upload_all(backend: Backend, prefix: str, files: Sequence[LocalFile | StagedFile], *, sha256: bool,
               budget: float, pool: ThreadPoolExecutor, progress: Progress | None = None) -> list[FileEntry]:
    """Upload each file to ``<prefix>/<rel>`` and return its entry; raise TransferError when one can't be stored.

    Each file is read once: the bytes handed to the store are hashed as they are read
    (:class:`~cloudckpt.source.Source`), the store checks what it stored against that hash, and the entry records
    it. A file that changed while it was read is uploaded again from a fresh read; one that keeps changing is a
    SourceChangedError.
    """

    def one(f: LocalFile | StagedFile) -> FileEntry:
        rel = object_key(prefix, f.rel)
        deadline = time.monotonic() + budget
        moved = _Moved(progress)

        def attempt() -> FileEntry:
            moved.restart()  # a retried upload starts from zero: so does its share of the bar
            with Source(f.path, sha256=sha256) if isinstance(f, LocalFile) else f.source(sha256) as src:
                try:
                    backend.upload(src, rel, deadline=deadline, progress=moved)
                except Exception as exc:
                    src.check_unchanged(exc)  # a mismatch or short read caused by the file changing: say so, retry
                    raise
                src.check_unchanged()
                return FileEntry(path=f.rel, size=src.size, crc32c=src.crc32c(), sha256=src.sha256())

        entry = retry.run(attempt, url=backend.url, what=f"upload {rel}", budget=budget, retry_on=_upload_retryable)
        moved.finish(entry.size)
        return entry

    return _run_all(pool, one, files)


def read_inline(files: list[LocalFile], *, sha256: bool, budget: float) -> list[tuple[FileEntry, bytes]]:
    """Read each (small) file once, hashed as read, for a manifest that carries it inline (:mod:`cloudckpt.inline`):
    its entry (marked ``inline``) and its bytes. A file that changed while it was read is read again; one that keeps
    changing is a SourceChangedError."""

    def one(f: LocalFile) -> tuple[FileEntry, bytes]:
        def attempt() -> tuple[FileEntry, bytes]:
            with Source(f.path, sha256=sha256) as src:
                data = src.read()
                src.check_unchanged()
                return FileEntry(path=f.rel, size=src.size, crc32c=src.crc32c(), sha256=src.sha256(),
                                 inline=True), data

        return retry.run(attempt, url=str(f.path), what=f"read {f.rel}", budget=budget,
                         retry_on=lambda exc: isinstance(exc, SourceChangedError))

    return [one(f) for f in files]


def _upload_retryable(exc: BaseException) -> bool:
    """A file that changed is read again; so is an upload whose stored bytes didn't match (a transient fault)."""
    return isinstance(exc, SourceChangedError) or retry.transient_or_mismatch(exc)


def download_verified(backend: Backend, prefix: str, entries: Iterable[FileEntry], into: Path, *, budget: float,
                      pool: ThreadPoolExecutor, progress: Progress | None = None) -> None:
    """Download every entry below ``into`` and check size and checksums of each: files in parallel in ``pool``,
    each in ranges fetched in parallel (:mod:`~cloudckpt.fetch`), resuming the ranges a partial fetch left there."""
    base = into.resolve()

    with RangePool() as ranges:

        def one(e: FileEntry) -> None:
            dest = into.joinpath(*e.path.split("/"))
            if not dest.resolve().is_relative_to(base):
                raise UnsafePathError(f"manifest path {e.path!r} escapes the target directory")
            dest.parent.mkdir(parents=True, exist_ok=True)
            rel = object_key(prefix, e.path)
            deadline = time.monotonic() + budget
            moved = _Moved(progress)

            def fetch() -> None:
                moved.restart()  # a retried fetch reports the ranges it keeps again
                fetch_file(backend, rel, e, dest, ranges=ranges, deadline=deadline, progress=moved)

            _read_listed(backend, rel, fetch, what="download", budget=budget)
            moved.finish(e.size)

        _run_all(pool, one, entries)


def _read_listed(backend: Backend, rel: str, read: Callable[[], T], *, what: str, budget: float) -> T:
    """Run ``read`` of an object the index lists, retried within ``budget``: a missing object is an IntegrityError
    (the index promised it); retries spent, a TransferError (:func:`~cloudckpt.retry.run`)."""
    try:
        return retry.run(read, url=backend.url, what=f"{what} {rel}", budget=budget)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{backend.url}/{rel}: listed in the index but missing from the store") from exc


def read_manifest(backend: Backend, cid: str, *, budget: float) -> Manifest:
    """The manifest of listed checkpoint ``cid``, parsed (a missing one is an IntegrityError: the index lists it)."""
    rel = manifest_key(cid)
    return parse_manifest(_read_listed(backend, rel, lambda: backend.read_bytes(rel), what="read", budget=budget))


def verify_stored(backend: Backend, prefix: str, entries: Iterable[FileEntry], *, budget: float,
                  pool: ThreadPoolExecutor, progress: Progress | None = None) -> None:
    """Check size and checksums of every stored entry by streaming its bytes through the hash: nothing is written
    to disk (a RAM-backed temp directory can't fill up) and memory stays bounded by the backend's block size."""

    def one(e: FileEntry) -> None:
        rel = object_key(prefix, e.path)
        deadline = time.monotonic() + budget
        moved = _Moved(progress)

        def stream() -> StreamChecksums:
            moved.restart()
            sums = StreamChecksums(sha256=e.sha256 is not None)

            def sink(block: bytes) -> None:
                sums.update(block)
                moved(len(block))

            backend.read_stream(rel, sink, deadline=deadline)
            return sums

        sums = _read_listed(backend, rel, stream, what="verify", budget=budget)
        got = sums.result()
        if sums.size != e.size:
            raise IntegrityError(f"{backend.url}/{rel}: stored object is {sums.size} bytes, the index says {e.size}")
        if (e.crc32c and got["crc32c"] != e.crc32c) or (e.sha256 and got.get("sha256") != e.sha256):
            raise IntegrityError(
                f"{backend.url}/{rel}: checksum mismatch (crc32c {got['crc32c']}, expected {e.crc32c})")
        moved.finish(e.size)

    _run_all(pool, one, entries)


class _Moved:
    """One file's share of a byte progress bar: counts what the backend reports, takes it back when the transfer
    is retried, and tops it up to the file's size at the end (for a backend that reports nothing)."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self.count = 0

    def __call__(self, n: int) -> None:
        cancel.check()  # every backend reports each block it moves: an interrupted transfer stops here
        if self._progress is None or not n:
            return
        with self._lock:
            self.count += n
        self._progress(n)

    def restart(self) -> None:
        with self._lock:
            back, self.count = self.count, 0
        if back and self._progress is not None:
            self._progress(-back)

    def finish(self, size: int) -> None:
        self(size - self.count)


def _run_all(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """Run ``fn`` over ``items`` in ``pool``; wait for all, then raise the first error (no stray threads left) or
    return the results in order.

    Interrupted while waiting (Ctrl-C; SIGTERM in the CLI): the batch's :class:`~cloudckpt.cancel.Token` is set,
    tasks not started are cancelled, those in flight stop at their next block (their progress callback checks the
    token); after at most :data:`~cloudckpt.cancel.GRACE` seconds the interruption is raised again."""
    token = cancel.Token()
    futures = [pool.submit(cancel.bind(token).run, fn, item) for item in items]
    first: BaseException | None = None
    try:
        for fut in futures:
            exc = fut.exception()
            if exc is not None and first is None:
                first = exc
    except BaseException:
        token.cancel()
        for fut in futures:
            fut.cancel()
        wait(futures, timeout=cancel.GRACE)
        raise
    if first is not None:
        raise first
    return [fut.result() for fut in futures]
