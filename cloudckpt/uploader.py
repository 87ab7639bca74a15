"""The background uploader: snapshots go in on the training thread, commits come out on a worker thread.

Training hands over a finished checkpoint directory (:meth:`Uploader.submit`) that the uploader owns from then on —
the caller snapshots into a staging directory (hard links or copies) so the next save can't change it mid-upload.
A single worker thread pushes the jobs to the :class:`~cloudckpt.store.CheckpointStore` in order. If uploads fall
behind, a new job supersedes the queued (not yet started) jobs that are not protected (protected = a new best):
they are dropped and their staging removed, so the queue never grows without bound. Upload errors are logged as
they happen; :meth:`Uploader.flush` waits (with a deadline) until everything queued has been committed or failed.

Example:
    >>> import tempfile, pathlib
    >>> from cloudckpt.store import CheckpointStore
    >>> store = CheckpointStore(tempfile.mkdtemp())
    >>> up = Uploader(store)
    >>> snap = pathlib.Path(tempfile.mkdtemp()) / "job"
    >>> _ = snap.mkdir(), (snap / "model.weights.h5").write_bytes(b"w")
    >>> job = up.submit(snap, dict(epoch=1, step=3, metrics={"val_loss": 0.5}, monitor="val_loss"))
    >>> up.flush(30.0)
    True
    >>> up.close()
    True
    >>> store.latest().step
    3
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import StaleWriterError, TransferError
from .manifest import CheckpointEntry
from .store import CheckpointStore

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One checkpoint to commit: a staged directory the uploader owns, and the keyword arguments of the push."""

    path: Path
    push_args: dict[str, Any]
    protected: bool = False
    prepare: Callable[[Path], object] | None = None
    seq: int = 0
    entry: CheckpointEntry | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def snapshot(files: dict[str, Path], into: Path) -> Path:
    """Hard-link (or copy, across file systems) ``{relative name: source file}`` into the new directory ``into``."""
    into.mkdir(parents=True)
    for rel, src in files.items():
        dst = into / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, dst)
            continue
        try:
            dst.hardlink_to(src)
        except OSError:
            shutil.copy2(src, dst)
    return into


STAGING_PREFIX = "cloudckpt-staging-"
OWNER_LOCK = ".owner.lock"
#: a staging directory without an owner lock is left alone this long (it may be being created)
UNLOCKED_GRACE = 60.0
_held: dict[Path, FileLock] = {}  # this process's staging directories and the locks that say they are in use


def new_staging_dir(root: str | Path | None, near: Path) -> Path:
    """A fresh staging directory for this process, outside the checkpoint folder ``near`` but on its file system
    (so snapshots are hard links): under ``root`` if given, else the system temp dir when it is on the same file
    system, else ``.cloudckpt-staging`` beside ``near``.

    The directory's owner holds an exclusive lock on ``<dir>/.owner.lock`` (filelock: flock, or a Windows lock)
    until :func:`remove_staging`; the operating system drops it when the owner dies, however it dies. Staging
    directories whose lock can be taken are abandoned and removed: the lock, not a PID, decides, so processes in
    different PID namespaces (containers on one host) sharing a staging root never remove each other's.
    """
    if root is None:
        near.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.gettempdir())
        root = tmp if os.stat(tmp).st_dev == os.stat(near).st_dev else near.parent / ".cloudckpt-staging"
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{STAGING_PREFIX}*"):
        if old.is_dir() and old not in _held:
            _sweep_if_abandoned(old)
    path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=root))
    lock = FileLock(path / OWNER_LOCK)
    lock.acquire(timeout=0)  # a fresh directory: nobody else can hold it
    _held[path] = lock
    return path


def _sweep_if_abandoned(old: Path) -> None:
    lock_path = old / OWNER_LOCK
    if not lock_path.exists():  # being created, or left by a version without owner locks: judge by age
        try:
            if time.time() - old.stat().st_mtime < UNLOCKED_GRACE:
                return
        except FileNotFoundError:
            return
    else:
        lock = FileLock(lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return  # its owner is alive
        lock.release()  # (Windows can't delete a locked file; the owner is gone, so nothing re-takes it)
    log.info("removing staging left by a dead process: %s", old)
    shutil.rmtree(old, ignore_errors=True)


def remove_staging(path: Path) -> None:
    """Remove a staging directory made by :func:`new_staging_dir` and drop its owner lock."""
    lock = _held.pop(Path(path), None)
    shutil.rmtree(path, ignore_errors=True)
    if lock is not None:
        lock.release()


class Uploader:
    """Commits staged checkpoint directories to ``store`` on one background thread, in order.

    Args:
        store: where to push.
        on_commit: called on the worker thread with each committed :class:`CheckpointEntry` (and its job).
            Default None.
    """

    def __init__(self, store: CheckpointStore, *,
                 on_commit: Callable[[CheckpointEntry, Job], None] | None = None) -> None:
        self.store = store
        self.on_commit = on_commit
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._active: Job | None = None
        self._closed = False
        self._seq = 0
        self.committed: list[CheckpointEntry] = []
        self.errors: list[tuple[Job, BaseException]] = []
        self.dropped = 0
        self.fatal: BaseException | None = None  # StaleWriterError: stop training
        self.last_job: Job | None = None
        self._thread = threading.Thread(target=self._run, name="cloudckpt-uploader", daemon=True)
        self._thread.start()

    # --- training thread ---------------------------------------------------------------------------------------

    def submit(self, path: Path, push_args: dict[str, Any], *, protected: bool = False,
               prepare: Callable[[Path], object] | None = None) -> Job:
        """Queue the staged directory ``path`` (now owned by the uploader); return its job. Never blocks on I/O.

        ``prepare(path)``, if given, runs on the uploader's thread just before the push (e.g. to write files from
        data captured in memory); a superseded job's ``prepare`` never runs.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the uploader is closed")
            self._seq += 1
            job = Job(Path(path), dict(push_args), protected, prepare, self._seq)
            superseded = [j for j in self._queue if not j.protected]
            for j in superseded:
                self._queue.remove(j)
            self._queue.append(job)
            self.last_job = job
            self._cond.notify_all()
        for j in superseded:
            log.info("uploads are behind: checkpoint for epoch %s step %s superseded before upload",
                     j.push_args.get("epoch"), j.push_args.get("step"))
            self._discard(j, None)
        self.dropped += len(superseded)
        return job

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (self._active is not None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has been committed or has failed; False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._active is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker thread. Returns whether everything queued was handled in time."""
        ok = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if ok:
            self._thread.join(timeout=5)
        return ok

    def raise_if_final_failed(self) -> None:
        """Raise if the last submitted job did not commit (the final state is not safe in the store)."""
        job = self.last_job
        if job is None:
            return
        if job.error is not None:
            raise TransferError(f"the final checkpoint could not be committed to {self.store.url}: {job.error}") \
                from job.error
        if job.entry is None:
            raise TransferError(f"the final checkpoint was not committed to {self.store.url} (upload unfinished)")

    # --- worker thread -----------------------------------------------------------------------------------------

    def _discard(self, job: Job, error: BaseException | None) -> None:
        job.error = error
        shutil.rmtree(job.path, ignore_errors=True)
        job.done.set()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._active = job
            try:
                self._push(job)
            finally:
                with self._cond:
                    self._active = None
                    self._cond.notify_all()

    def _push(self, job: Job) -> None:
        if self.fatal is not None:
            self._discard(job, self.fatal)
            return
        t0 = time.monotonic()
        try:
            if job.prepare is not None:
                job.prepare(job.path)
            entry = self.store.push(job.path, **job.push_args)
        except StaleWriterError as exc:
            log.error("upload stopped: %s", exc)
            self.fatal = exc
            self.errors.append((job, exc))
            self._discard(job, exc)
            return
        except Exception as exc:  # logged now, raised at train end if it was the final state
            log.error("upload of checkpoint (epoch %s, step %s) to %s failed: %s", job.push_args.get("epoch"),
                      job.push_args.get("step"), self.store.url, exc)
            self.errors.append((job, exc))
            self._discard(job, exc)
            return
        job.entry = entry
        self.committed.append(entry)
        log.debug("uploaded %s in %.2fs", entry.id, time.monotonic() - t0)
        if self.on_commit is not None:
            try:
                self.on_commit(entry, job)
            except Exception as exc:
                log.warning("after committing %s: %s", entry.id, exc)
        self._discard(job, None)
