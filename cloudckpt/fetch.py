"""How one file of a checkpoint is fetched: split into ranges fetched in parallel, each written at its offset into a
staging ``.part`` file and hashed as it lands, resumable range by range, checked whole before it is published.

- **Parallel ranges.** A file is cut into ``range_size`` ranges (the last one shorter); each is one ranged GET
  (:meth:`~cloudckpt.backends.base.Backend.read_range`, on every store) run in a :class:`RangePool` of
  ``concurrency`` threads shared by all the files of a pull, and written at its offset (one range of a file at a
  time, in :data:`WRITE_SLICE` pieces: the kernel serializes a file's writes anyway). A thread
  holds one range at a time: memory is bounded by ``concurrency × range_size`` (16 × 4 MiB = 64 MiB by default).
- **Checked whole.** Each range's crc32c is computed from the bytes written; the file's crc32c is combined from
  them (:mod:`~cloudckpt.crc_combine`, no second read) and must equal the manifest's, as must the sha256 (that one
  needs a read of the file) when the manifest has one. Only then is the ``.part`` renamed to its name.
- **Resumable.** Beside ``<name>.cloudckpt-part`` a small sidecar ``<name>.cloudckpt-part.json`` lists the finished
  ranges and each one's crc32c (rewritten atomically after each range). A later fetch into the same place reads
  those ranges back from disk, keeps those whose crc32c still matches, and fetches only the rest; a sidecar that
  doesn't describe this file (another size, checksum or range size) or can't be read starts the file afresh. The
  sidecar is input too: whatever it claims, the file is published only if it matches the manifest.

The local store keeps its plain copy (:meth:`~cloudckpt.backends.base.Backend.download`), as does a backend with no
ranged read.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import google_crc32c

from . import cancel
from .backends import Backend
from .checksum import file_checksums
from .concurrency import pull_concurrency
from .concurrency import range_size as default_range_size
from .crc_combine import combine
from .entry import FileEntry
from .errors import ConfigurationError, IntegrityError

Progress = Callable[[int], None]

PART_SUFFIX = ".cloudckpt-part"
SIDECAR_SUFFIX = ".cloudckpt-part.json"
SIDECAR_TMP_SUFFIX = SIDECAR_SUFFIX + ".tmp"
#: A range is written in pieces of this size: one 4 MiB pwrite into the page cache cost ~4x the kernel time of the
#: same bytes in 256 KiB writes on the test machines once a GiB or so was dirty (docs/benchmarks.md, restore speed).
WRITE_SLICE = 256 * 1024


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` land until the whole file is verified."""
    return dest.with_name(dest.name + PART_SUFFIX)


def sidecar_path(dest: Path) -> Path:
    """The list of the finished ranges of ``part_path(dest)`` and their crc32cs."""
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


def is_unfinished(path: Path) -> bool:
    """Whether ``path`` is a fetch's own file (a ``.part`` file, its sidecar or the sidecar being rewritten)."""
    return path.name.endswith((PART_SUFFIX, SIDECAR_SUFFIX, SIDECAR_TMP_SUFFIX))


def landed_bytes(part: Path) -> int:
    """How many bytes of the unfinished file ``part`` (a ``part_path``) its sidecar lists as landed (0 if it can't
    be read): a ``.part`` file's own size says nothing, its ranges land anywhere in it."""
    try:
        saved = json.loads(sidecar_path(part.with_name(part.name.removesuffix(PART_SUFFIX))).read_text())
        size, step = int(saved["size"]), int(saved["range_size"])
        return sum(_length(int(i), size, step) for i in saved["ranges"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


class RangePool:
    """The threads that fetch ranges for one pull: ``concurrency`` ranged GETs at a time, each of at most
    ``range_size`` bytes (defaults from $CLOUDCKPT_CONCURRENCY and $CLOUDCKPT_RANGE_SIZE, else measured ones).

    Use it as a context manager; its threads end with it.
    """

    def __init__(self, concurrency: int | None = None, range_size: int | None = None) -> None:
        self.concurrency = concurrency or pull_concurrency()
        self.range_size = range_size or default_range_size()
        if self.concurrency < 1 or self.range_size < 1:
            raise ConfigurationError(f"concurrency and range_size must be >= 1. Received: "
                                     f"concurrency={concurrency}, range_size={range_size}")
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="cloudckpt-range")

    def submit(self, fn: Callable[[], Any]) -> Future:
        # in the caller's context: a range sees the cancel token of the pull it belongs to (cloudckpt.cancel)
        return self._pool.submit(contextvars.copy_context().run, fn)

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> RangePool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # interrupted (Ctrl-C, SIGTERM) or failed: don't wait for ranges in flight; each stops at its next check and
        # writes only into its own part file through a descriptor of its own
        self.close(wait=exc_type is None)


def fetch_file(backend: Backend, key: str, entry: FileEntry, dest: Path, *, ranges: RangePool,
               deadline: float | None = None, progress: Progress | None = None) -> None:
    """Fetch the object ``key`` into ``dest``, verified against ``entry`` (size, crc32c, sha256), resuming a partial
    fetch left at ``part_path(dest)``; ``dest`` appears only once verified.

    ``progress(n)`` is told of bytes as they land (a range kept from an earlier fetch counts too).

    Raises:
        IntegrityError: the file's bytes don't match ``entry`` (the partial file and its sidecar are removed, so the
            next fetch starts afresh), or the object is shorter than ``entry`` says.
        FileNotFoundError: the object is missing.
        TimeoutError: ``deadline`` passed.
        StoreError: as the backend raised it (a fetch called again resumes from the ranges that landed).
    """
    if backend.kind == "local" or type(backend).read_range is Backend.read_range or entry.size == 0:
        _fetch_whole(backend, key, entry, dest, deadline=deadline, progress=progress)
        return
    try:
        _fetch_ranges(backend, key, entry, dest, ranges=ranges, deadline=deadline, progress=progress)
    except _Mismatch as exc:
        if not exc.kept:
            raise IntegrityError(str(exc)) from None
        # ranges kept from disk vouched for bytes that aren't the file's: they are gone; fetch it all afresh
        if progress is not None:
            progress(-entry.size)
        try:
            _fetch_ranges(backend, key, entry, dest, ranges=ranges, deadline=deadline, progress=progress)
        except _Mismatch as again:
            raise IntegrityError(str(again)) from None


class _Mismatch(Exception):
    """The fetched file isn't the manifest's; ``kept``: how many of its ranges were kept from an earlier fetch."""

    def __init__(self, message: str, kept: int) -> None:
        super().__init__(message)
        self.kept = kept


def _fetch_ranges(backend: Backend, key: str, entry: FileEntry, dest: Path, *, ranges: RangePool,
                  deadline: float | None, progress: Progress | None) -> int:
    """One ranged fetch of ``key`` into ``dest``, resuming the ``.part`` file; return the number of ranges kept
    from disk. _Mismatch (with that number) when the result doesn't match ``entry``: nothing is left behind."""
    part, sidecar = part_path(dest), sidecar_path(dest)
    size, step = entry.size, ranges.range_size
    count = max(1, -(-size // step))
    state = _State(sidecar, {"size": size, "crc32c": entry.crc32c, "sha256": entry.sha256, "range_size": step})
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        done = state.load(fd, count, size, step)
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)  # never grown here: the ranges' writes make it ``size`` (an index is input)
    finally:
        os.close(fd)
    if progress is not None and done:
        progress(sum(_length(i, size, step) for i in done))
    stop = threading.Event()
    # ranges are submitted a few at a time, as earlier ones end: a huge size in the index costs one failing GET,
    # not millions of queued ranges
    slots = threading.BoundedSemaphore(2 * ranges.concurrency)
    writing = threading.Lock()

    def one(i: int) -> None:
        try:
            fetch_range(i)
        except BaseException:
            stop.set()  # no more ranges of this file are submitted
            raise

    def fetch_range(i: int) -> None:
        if stop.is_set():
            return
        cancel.check()
        Backend.remaining(deadline)
        start, length = i * step, _length(i, size, step)
        # the last range asks for one byte more: an object longer than the index says fails here
        data = backend.read_range(key, start, length, deadline=deadline, last=i == count - 1)
        # a descriptor of its own: a range still in flight when the caller gave up (Ctrl-C) writes its own bytes
        # into this part file, or finds it gone; never into a file that reused a shared descriptor's number
        out = os.open(part, os.O_WRONLY)
        try:
            with writing:  # one at a time, as the kernel would; waiting here rather than spinning on its inode lock
                write_at(out, data, start)
        finally:
            os.close(out)
        state.finished(i, google_crc32c.value(data))
        if progress is not None:
            progress(length)

    futures: list[Future] = []
    try:
        for i in range(count):
            if i in done:
                continue
            while not slots.acquire(timeout=0.1):
                cancel.check()
            if stop.is_set():
                slots.release()
                break
            try:
                fut = ranges.submit(functools.partial(one, i))
            except RuntimeError:  # the pool was shut down under us: the pull was interrupted
                slots.release()
                cancel.check()
                raise
            fut.add_done_callback(lambda _f: slots.release())
            futures.append(fut)
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        stop.set()  # after a failure or an interruption, ranges not started yet are skipped
    wait(futures)
    for fut in futures:
        exc = fut.exception()
        if exc is not None:
            raise exc
    problem = _publish(part, sidecar, dest, entry, state.whole_crc32c(count, size, step))
    if problem is not None:
        raise _Mismatch(f"{backend.url}/{key}: {problem}", len(done))
    return len(done)


def write_at(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``, :data:`WRITE_SLICE` bytes per call (a short write goes on
    where it stopped)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:done + WRITE_SLICE], offset + done)
        if n <= 0:
            raise OSError(f"wrote nothing at offset {offset + done}")
        done += n


def _length(i: int, size: int, step: int) -> int:
    return max(0, min(step, size - i * step))


class _State:
    """The finished ranges of one ``.part`` file and their crc32cs, mirrored to its sidecar after each range."""

    def __init__(self, path: Path, about: dict[str, Any]) -> None:
        self.path, self.about = path, about
        self.crcs: dict[int, int] = {}
        self._lock = threading.Lock()

    def load(self, fd: int, count: int, size: int, step: int) -> set[int]:
        """Keep the ranges the sidecar lists whose bytes on disk still have their crc32c; return their numbers."""
        try:
            saved = json.loads(self.path.read_text())
            listed = {int(k): int(v, 16) for k, v in saved["ranges"].items()} \
                if {k: saved.get(k) for k in self.about} == self.about else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            listed = {}  # none, or not ours to trust: start afresh
        if not listed:
            os.ftruncate(fd, 0)
        for i, crc in sorted(listed.items()):
            if 0 <= i < count and google_crc32c.value(os.pread(fd, _length(i, size, step), i * step)) == crc:
                self.crcs[i] = crc
        self._save()
        return set(self.crcs)

    def finished(self, i: int, crc: int) -> None:
        with self._lock:
            self.crcs[i] = crc
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name.removesuffix(SIDECAR_SUFFIX) + SIDECAR_TMP_SUFFIX)
        tmp.write_text(json.dumps({**self.about, "ranges": {str(i): f"{c:08x}" for i, c in self.crcs.items()}}))
        os.replace(tmp, self.path)

    def whole_crc32c(self, count: int, size: int, step: int) -> str:
        crc = 0
        for i in range(count):
            crc = combine(crc, self.crcs[i], _length(i, size, step)) if i else self.crcs[0]
        return f"{crc:08x}"


def _publish(part: Path, sidecar: Path, dest: Path, entry: FileEntry, crc32c: str) -> str | None:
    """Rename ``part`` to ``dest`` if its bytes are ``entry``'s (``crc32c``: theirs, as written) and return None;
    otherwise remove it and its sidecar and say what is wrong."""
    problem = None
    if part.stat().st_size != entry.size:
        problem = f"{part.stat().st_size} bytes, the index says {entry.size}"
    elif entry.crc32c and crc32c != entry.crc32c:
        problem = f"checksum mismatch (crc32c {crc32c}, expected {entry.crc32c})"
    elif entry.sha256:
        got = file_checksums(part, sha256=True)
        if got["crc32c"] != crc32c or got["sha256"] != entry.sha256:
            problem = f"checksum mismatch (sha256 {got['sha256']}, expected {entry.sha256})"
    if problem is not None:
        part.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        return problem
    os.replace(part, dest)
    sidecar.unlink(missing_ok=True)
    return None


def _fetch_whole(backend: Backend, key: str, entry: FileEntry, dest: Path, *, deadline: float | None,
                 progress: Progress | None) -> None:
    """One streamed download (a local copy, or a store with no ranged read), hashed as written, then published."""
    part, sidecar = part_path(dest), sidecar_path(dest)
    sidecar.unlink(missing_ok=True)
    verified = backend.download(key, part, deadline=deadline, progress=progress)
    if verified is None or entry.sha256:  # the client checked nothing as it streamed (or sha256 is wanted): hash
        verified = file_checksums(part)["crc32c"]
    problem = _publish(part, sidecar, dest, entry, verified)
    if problem is not None:
        raise IntegrityError(f"{backend.url}/{key}: {problem}")

