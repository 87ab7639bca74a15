"""The node-level pull cache: a folder of verified file contents keyed by size and checksum, shared by every process
of the machine (ranks of one job pulling the same checkpoint download each file once).

Layout under the cache folder: ``objects/<size>-<crc32c or sha256>`` (one file per content, written to ``tmp/`` and
renamed into place: an entry is complete or absent), ``locks/<key>.lock`` (held by the one process fetching that
content; the others wait, then read the entry it wrote) and ``evict.lock``. An entry's mtime is its last use; once
the entries' bytes exceed the bound, the least recently used go first.

The cache is input like the bucket: each use copies the entry while hashing it, and an entry whose size or checksum
is not the manifest's (a bit flip, a truncation) is removed and fetched again, never restored.

Off unless configured (``cache_dir=`` / ``--cache-dir`` / ``$CLOUDCKPT_CACHE_DIR``): a cache holds a second copy
of every pulled byte, on disks that training nodes often have little of, and re-pulling into the same folder needs
no cache (files already there are re-used).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock

from . import cancel
from .checksum import BLOCK, PIECE, StreamChecksums, file_crc32c
from .errors import ConfigurationError
from .manifest import FileEntry

log = logging.getLogger(__name__)
DIR_ENV = "CLOUDCKPT_CACHE_DIR"
SIZE_ENV = "CLOUDCKPT_CACHE_SIZE"
DEFAULT_MAX_BYTES = 20 * 2**30
TMP_GRACE = 3600.0  # seconds after which a half-written entry in tmp/ is a dead process's, and removed
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``"20G"`` → bytes (powers of 1024; ``K``, ``M``, ``G``, ``T``, optional ``iB``/``B``); ConfigurationError for
    anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigurationError(f"cache size {text!r}: expected bytes such as 500M or 20G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def key(entry: FileEntry) -> str:
    """The content's name: its size and its crc32c (sha256 when the manifest records no crc32c)."""
    return f"{entry.size}-{entry.crc32c or entry.sha256}"


def copy_verified(src: Path, dest: Path, entry: FileEntry) -> bool:
    """Copy ``src`` to ``dest`` (replaced), hashing the bytes as they are copied; True when they are the entry's
    (size and every checksum it records), else ``dest`` is removed and False. Stops (TransferCancelled) when the
    operation is interrupted. Without a sha256 to compute, the kernel copies (``copy_file_range``, :data:`PIECE` at a
    time) and the copy is then hashed in pieces on several threads."""
    if entry.sha256 is None:
        try:
            _kernel_copy(src, dest, entry.size)
            size, crc = file_crc32c(dest, check=cancel.check)
        except FileNotFoundError:
            dest.unlink(missing_ok=True)
            return False
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        if size == entry.size and entry.crc32c in (None, crc):
            return True
        dest.unlink(missing_ok=True)
        return False
    sums = StreamChecksums(sha256=True)
    try:
        with open(src, "rb", buffering=0) as fin, open(dest, "wb") as fout:
            while block := fin.read(BLOCK):
                cancel.check()
                sums.update(block)
                if sums.size > entry.size:
                    break
                fout.write(block)
    except FileNotFoundError:
        dest.unlink(missing_ok=True)
        return False
    if matches(sums, entry):
        return True
    dest.unlink(missing_ok=True)
    return False


_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


def _kernel_copy(src: Path, dest: Path, limit: int) -> None:
    """Copy ``src`` to ``dest`` (replaced) in the kernel, a :data:`PIECE` at a time (the operation's cancel token is
    checked between), at most ``limit`` + 1 bytes: a longer source fails the caller's size check without being
    copied whole."""
    with open(src, "rb", buffering=0) as fin, open(dest, "wb", buffering=0) as fout:
        done, kernel = 0, getattr(os, "copy_file_range", None) is not None
        while done <= limit:
            cancel.check()
            want = min(PIECE if kernel else BLOCK, limit + 1 - done)
            if kernel:
                try:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), want)
                except OSError as exc:  # not between these filesystems, or not here: through user space
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False
                    continue
            else:
                block = memoryview(fin.read(want))
                n = len(block)
                while block:  # a raw file may write less than asked
                    block = block[fout.write(block):]
            if n == 0:
                break
            done += n


def matches(sums: StreamChecksums, entry: FileEntry) -> bool:
    """Whether bytes hashed into ``sums`` are the entry's: its size and every checksum it records."""
    got = sums.result()
    return (sums.size == entry.size and (entry.crc32c is None or got["crc32c"] == entry.crc32c)
            and (entry.sha256 is None or got.get("sha256") == entry.sha256))


class Cache:
    """A pull cache at ``root`` holding at most ``max_bytes`` of file contents.

    Args:
        root: the cache folder (made if missing).
        max_bytes: the bound; least recently used entries are evicted past it. Default 20 GiB.
    """

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ConfigurationError(f"cache size must be >= 0. Received: {max_bytes}")
        self.root = Path(root).expanduser().absolute()
        self.max_bytes = max_bytes
        for sub in ("objects", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def configured(cls, root: str | Path | None = None, max_bytes: int | str | None = None) -> Cache | None:
        """The cache the arguments or the environment (``$CLOUDCKPT_CACHE_DIR``, ``$CLOUDCKPT_CACHE_SIZE``) name;
        None when neither names a folder (caching is off)."""
        root = root or os.environ.get(DIR_ENV) or None
        if root is None:
            return None
        size = max_bytes if max_bytes is not None else os.environ.get(SIZE_ENV)
        return cls(root, parse_size(size) if isinstance(size, str) else DEFAULT_MAX_BYTES if size is None else size)

    def path(self, entry: FileEntry) -> Path:
        return self.root / "objects" / key(entry)

    def has(self, entry: FileEntry) -> bool:
        """Whether an entry of the right size is there (not checked: :meth:`copy_out` checks)."""
        try:
            return self.path(entry).stat().st_size == entry.size
        except OSError:
            return False

    def check(self, entry: FileEntry) -> bool:
        """Whether the content is there and verifies (hashed, nothing written)."""
        if entry.sha256 is None:
            try:
                size, crc = file_crc32c(self.path(entry))
                return size == entry.size and entry.crc32c in (None, crc)
            except OSError:
                return False
        sums = StreamChecksums(sha256=True)
        try:
            with open(self.path(entry), "rb", buffering=0) as f:
                while block := f.read(BLOCK):
                    sums.update(block)
        except OSError:
            return False
        return matches(sums, entry)

    def copy_out(self, entry: FileEntry, dest: Path) -> bool:
        """Write the cached content of ``entry`` to ``dest``, verified as it is copied; False when it is not cached.
        An entry that doesn't verify is damaged: it is removed (and False returned, so the file is fetched)."""
        src = self.path(entry)
        if not self.has(entry):
            return False
        if copy_verified(src, dest, entry):
            with contextlib.suppress(OSError):
                os.utime(src)  # its last use, for LRU eviction
            return True
        if src.exists():
            log.warning("pull cache entry %s does not match the manifest's checksum (damaged): removed, the file is "
                        "fetched from the store", src)
            with contextlib.suppress(OSError):
                src.unlink()
        return False

    def put(self, entry: FileEntry, src: Path) -> None:
        """Store the (verified) file ``src`` as the content of ``entry``: copied by the kernel, then renamed into
        place. Not fsynced: an entry is hashed whenever it is used, so one torn by a crash is found damaged and
        fetched again (an fsync of a 1 GiB entry cost the pull that added it seconds)."""
        if entry.size > self.max_bytes:
            return
        tmp = self.root / "tmp" / f"{key(entry)}.{uuid.uuid4().hex}"
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, self.path(entry))
        except OSError as exc:  # a full or read-only cache disk must not fail the pull
            log.warning("could not add %s to the pull cache %s (%s)", entry.path, self.root, exc)
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def fetching(self, entries: Iterable[FileEntry]) -> Iterator[None]:
        """Hold the fetch lock of each entry's content (taken in one order: processes never wait on each other in a
        cycle): another process pulling the same contents waits, then finds them cached."""
        keys = sorted({key(e) for e in entries})
        with contextlib.ExitStack() as stack:
            for k in keys:
                stack.enter_context(FileLock(str(self.root / "locks" / f"{k}.lock")))
            yield

    def evict(self) -> list[str]:
        """Remove the least recently used entries until the cache holds at most ``max_bytes``; the names removed.
        A process reading an entry being removed keeps its open file."""
        removed = []
        with FileLock(str(self.root / "evict.lock")):
            found = []
            for p in (self.root / "objects").iterdir():
                with contextlib.suppress(OSError):
                    st = p.stat()
                    found.append((st.st_mtime, st.st_size, p))
            now = time.time()
            for p in (self.root / "tmp").iterdir():  # left by a process killed while it added an entry
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > TMP_GRACE:
                        p.unlink()
            total = sum(size for _, size, _ in found)
            for _, size, p in sorted(found, key=lambda t: t[0]):
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p.name)
                total -= size
        if removed:
            log.info("pull cache %s: evicted %d least recently used entries", self.root, len(removed))
        return removed
