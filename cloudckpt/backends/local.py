"""The embedded default: a run in a local directory. Files are written to a temp name and renamed into place; the
index is swapped with ``os.replace`` under an exclusive lock (filelock: ``flock`` on POSIX, ``LockFileEx`` on Windows;
released by the operating system if the holder dies), compare-and-swap on the bytes' hash."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock

try:
    import fcntl
except ImportError:  # Windows: an open file can't be removed, which keeps gc off it
    fcntl = None  # type: ignore[assignment]

from ..checksum import BLOCK, HashingWriter, file_checksums
from ..errors import ConfigurationError, IndexConflictError, IntegrityError, StoreError
from ..layout import INDEX_NAME, LOCK_NAME, TMP_MARK
from ..localfs import fsync_dir
from ..source import Source
from .base import UNCHANGED, Backend, ObjectInfo, Progress


def _lock(fd: int) -> None:
    """Hold an exclusive ``flock`` on ``fd`` until it is closed (POSIX; elsewhere an open file can't be removed)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _in_use(path: Path) -> bool:
    """Whether a writer holds ``path`` (a temporary file) locked: it is being written, not left over."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


class LocalBackend(Backend):
    verification = "size and crc32c of the written copy"
    OPTIONS = frozenset({"fsync"})

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        path = url[len("file://"):] if url.startswith("file://") else url
        if not path:
            raise ConfigurationError(f"empty local store path. Received: url={url!r}")
        self.root = Path(path).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigurationError(f"{url}: exists and is not a directory")
        self.fsync = bool(self.storage_options.pop("fsync", True))

    def _abs(self, rel: str) -> Path:
        return self.root.joinpath(*rel.split("/"))

    def _write_atomic(self, target: Path, write: Callable[[BinaryIO], object]) -> None:
        """Write to a temporary file beside ``target``, then rename it into place. The temporary file is locked
        (``flock``, POSIX) while it is written, so ``gc`` leaves it alone (:meth:`delete`); if it still vanishes (gc
        removed it, or the emptied directory, between its creation and the lock) the write fails with a transient
        StoreError, which the caller's retry writes again."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{target.name}")
            try:
                with open(tmp, "wb") as f:
                    _lock(f.fileno())
                    write(f)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                    if fcntl is not None:
                        os.replace(tmp, target)  # before the lock is released with the file
                if fcntl is None:
                    os.replace(tmp, target)  # Windows renames only a closed file
            finally:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError as exc:
            raise StoreError(f"{self.url}: {target.name}: its temporary file or folder was removed while it was "
                             f"written (by gc?): {exc}", transient=True) from exc
        if self.fsync:
            fsync_dir(target.parent)

    # --- index -------------------------------------------------------------------------------------------------

    def read_index(self, known: Any = None) -> tuple[bytes | None, Any]:
        try:
            data = self._abs(INDEX_NAME).read_bytes()
        except FileNotFoundError:
            return None, None
        token = hashlib.sha256(data).hexdigest()
        return (UNCHANGED if token == known else data), token

    def write_index(self, data: bytes, token: Any) -> Any:
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / LOCK_NAME):
            _, current = self.read_index()
            if current != token:
                raise IndexConflictError(f"{self.url}: index changed since it was read")
            self._write_atomic(self._abs(INDEX_NAME), lambda f: f.write(data))
            return hashlib.sha256(data).hexdigest()

    def conditional_write_problem(self) -> str | None:
        """The index swap is safe only if ``flock`` excludes every writer: not on NFS mounted ``nolock`` /
        ``local_lock``, nor on FUSE mounts (locks local to one machine), and only where it excludes at all."""
        from .capabilities import flock_problem, mount_lock_problem

        self.root.mkdir(parents=True, exist_ok=True)
        return mount_lock_problem(self.root) or flock_problem(self.root / LOCK_NAME)

    # --- objects -----------------------------------------------------------------------------------------------

    def upload(self, source: Source, rel: str, *, deadline: float | None = None,
               progress: Progress | None = None) -> None:
        target = self._abs(rel)
        source.progress = progress

        def copy(f: BinaryIO) -> None:
            for block in source.blocks(BLOCK):
                f.write(block)

        self._write_atomic(target, copy)
        try:
            got_size = target.stat().st_size
            got, want = file_checksums(target)["crc32c"], source.crc32c()
        except FileNotFoundError as exc:  # removed as soon as written: its checkpoint was condemned by gc
            raise StoreError(f"{self.url}/{rel}: removed as soon as it was written (by gc?)", transient=True) from exc
        if got_size != source.size or got != want:
            raise IntegrityError(f"{self.url}/{rel}: stored copy is {got_size} bytes crc32c {got}, expected "
                                 f"{source.size} {want}")

    def download(self, rel: str, local: Path, *, deadline: float | None = None,
                 progress: Progress | None = None) -> str:
        with open(local, "wb") as dst:
            out = HashingWriter(dst, progress)
            self.read_stream(rel, out.write, deadline=deadline)
        return out.crc32c()

    def read_stream(self, rel: str, sink: Callable[[bytes], object], *, deadline: float | None = None) -> None:
        with open(self._abs(rel), "rb") as src:
            while block := src.read(BLOCK):
                sink(block)
                self.remaining(deadline)

    def read_bytes(self, rel: str) -> bytes:
        return self._abs(rel).read_bytes()

    def read_range(self, rel: str, start: int, length: int, *, deadline: float | None = None,
                   last: bool = False) -> bytes:
        with open(self._abs(rel), "rb") as src:
            src.seek(start)
            return self.check_range(rel, start, length, src.read(length + last), last)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._write_atomic(self._abs(rel), lambda f: f.write(data))

    def list_objects(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        if not self.root.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                p = Path(dirpath) / name
                rel = p.relative_to(self.root).as_posix()
                if rel == LOCK_NAME:
                    continue
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(rel, st.st_size, st.st_mtime))
        return out

    def delete(self, rels: list[str]) -> None:
        parents = set()
        for rel in rels:
            p = self._abs(rel)
            if p.name.startswith(TMP_MARK) and _in_use(p):
                continue  # a live writer's temporary file (gc's listing saw it): not a leftover
            p.unlink(missing_ok=True)
            parents.add(p.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while parent != self.root and parent.is_relative_to(self.root):
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
