"""The background uploader: snapshots go in on the training thread, commits come out on a worker thread.

Training hands over a finished checkpoint directory (:meth:`Uploader.submit`) that the uploader owns from then on —
the caller snapshots into a staging directory (hard links or copies) so the next save can't change it mid-upload.
A single worker thread pushes the jobs to the :class:`~cloudckpt.store.CheckpointStore` in order. If uploads fall
behind, a new job supersedes the queued (not yet started) jobs that are not protected (protected = a new best):
they are dropped and their staging removed, so the queue never grows without bound.

A job whose push fails (after the store's retry budget) is logged and *held*: its staging stays, and the next
:meth:`Uploader.submit` queues it again ahead of the new job when it is protected (a best is retried, never replaced
by a worse checkpoint), or drops it when it is not (the newer checkpoint supersedes it). :meth:`Uploader.retry`
queues every held job again (the end of training's last attempt). :meth:`Uploader.flush` waits (with a deadline)
until everything queued has been handled and returns True only if every job submitted so far is committed (or was
superseded by a newer one): the held ones are named by :meth:`Uploader.failures`; :meth:`Uploader.raise_if_uncommitted`
raises :class:`~cloudckpt.errors.CommitFailedError` naming them.

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

from .errors import SaveFailure, StaleWriterError, commit_failed
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
    tag: Any = None
    entry: CheckpointEntry | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    attempts: int = 0
    superseded: bool = False  # replaced by a newer checkpoint before it was committed: it never will be

    @property
    def label(self) -> str:
        return f"epoch {self.push_args.get('epoch')} step {self.push_args.get('step')}"

    def failure(self) -> SaveFailure:
        return SaveFailure(self.push_args.get("epoch"), self.push_args.get("step"), self.label, self.error)


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
#: a staging directory younger than this is left alone whatever its lock says (it may be being created: its owner
#: takes the lock an instant after the directory exists)
UNLOCKED_GRACE = 60.0
#: how long a new staging directory's owner waits for its own lock (another process's sweep may probe it meanwhile)
OWNER_LOCK_WAIT = 30.0
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
    # A fresh directory, but another process's sweep may be probing it right now (between this lock file's creation
    # and its lock): it holds the lock only for the probe, and leaves a directory this young alone.
    lock.acquire(timeout=OWNER_LOCK_WAIT)
    _held[path] = lock
    return path


def _sweep_if_abandoned(old: Path) -> None:
    try:  # a directory this young may be being created, its owner not yet holding its lock: never abandoned
        if time.time() - old.stat().st_mtime < UNLOCKED_GRACE:
            return
    except FileNotFoundError:
        return
    lock_path = old / OWNER_LOCK
    if lock_path.exists():  # else left by a version without owner locks: its age decided
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
        on_failure: called on the worker thread with each job whose push failed (it is held). Default None.
    """

    def __init__(self, store: CheckpointStore, *,
                 on_commit: Callable[[CheckpointEntry, Job], None] | None = None,
                 on_failure: Callable[[Job], None] | None = None) -> None:
        self.store = store
        self.on_commit = on_commit
        self.on_failure = on_failure
        self._queue: deque[Job] = deque()
        self._held: list[Job] = []  # pushes that failed: kept for a retry (see the module's rule)
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
               prepare: Callable[[Path], object] | None = None, tag: Any = None) -> Job:
        """Queue the staged directory ``path`` (now owned by the uploader); return its job. Never blocks on I/O.

        ``prepare(path)``, if given, runs on the uploader's thread just before each push attempt (e.g. to write files
        from data captured in memory); a superseded job's ``prepare`` never runs. Held jobs (failed pushes) that are
        protected are queued again ahead of this one; the others are superseded by it. ``tag``: the caller's.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the uploader is closed")
            self._seq += 1
            job = Job(Path(path), dict(push_args), protected, prepare, self._seq, tag)
            superseded = [j for j in self._queue if not j.protected] + [j for j in self._held if not j.protected]
            retried = [j for j in self._held if j.protected]
            for j in self._queue.copy():
                if not j.protected:
                    self._queue.remove(j)
            self._held = []
            for j in retried:
                j.done.clear()
            self._queue.extend(retried)
            self._queue.append(job)
            self.last_job = job
            self._cond.notify_all()
        for j in superseded:
            log.info("checkpoint for %s superseded before it was committed", j.label)
            j.superseded = True
            self._discard(j, j.error)
        for j in retried:
            log.info("retrying the upload of the checkpoint for %s (a best: kept until committed)", j.label)
        self.dropped += len(superseded)
        return job

    def retry(self) -> int:
        """Queue every held job again (protected or not); return how many."""
        with self._cond:
            held, self._held = self._held, []
            for j in held:
                j.done.clear()
            self._queue.extendleft(reversed(held))
            self._cond.notify_all()
        for j in held:
            log.info("retrying the upload of the checkpoint for %s", j.label)
        return len(held)

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (self._active is not None)

    def failures(self) -> list[SaveFailure]:
        """The submitted checkpoints that are not committed because their push failed (held for a retry)."""
        with self._cond:
            return [j.failure() for j in self._held]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has been committed or has failed. True only if every checkpoint submitted
        so far is committed (or was superseded by a newer one); False if one failed (see :meth:`failures`) or
        ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._active is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
            return not self._held and self.fatal is None

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker thread. Returns what :meth:`flush` returned."""
        ok = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.pending():
            self._thread.join(timeout=5)
        return ok

    def uncommitted(self) -> list[SaveFailure]:
        """Every submitted checkpoint not committed (yet): held after a failed push (with its error), being pushed
        or queued (error None)."""
        with self._cond:
            left = [j.failure() for j in self._held]
            left += [SaveFailure(j.push_args.get("epoch"), j.push_args.get("step"), j.label, None)
                     for j in ([self._active] if self._active else []) + list(self._queue)]
        job = self.last_job
        if job is not None and job.entry is None and job.error is not None and not left:  # fenced: dropped
            left = [job.failure()]
        return left

    def raise_if_uncommitted(self) -> None:
        """Raise :class:`~cloudckpt.errors.CommitFailedError` naming each submitted checkpoint that is not committed
        (see :meth:`uncommitted`)."""
        left = self.uncommitted()
        if left:
            raise commit_failed(left, self.store.url)

    def raise_if_final_failed(self) -> None:
        """Kept for callers of cloudckpt <= 0.3: :meth:`raise_if_uncommitted`."""
        self.raise_if_uncommitted()

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
        job.attempts += 1
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
        except Exception as exc:  # held: retried at the next submit (a best) or superseded by it
            log.error("upload of the checkpoint for %s to %s failed (attempt %d): %s; kept locally, %s",
                      job.label, self.store.url, job.attempts, exc,
                      "retried at the next save" if job.protected else "until a newer checkpoint supersedes it")
            self.errors.append((job, exc))
            job.error = exc
            with self._cond:
                self._held.append(job)
            if self.on_failure is not None:
                try:
                    self.on_failure(job)
                except Exception as hook_exc:
                    log.warning("after the failed upload for %s: %s", job.label, hook_exc)
            job.done.set()
            return
        job.entry, job.error = entry, None
        self.committed.append(entry)
        log.debug("uploaded %s in %.2fs", entry.id, time.monotonic() - t0)
        if self.on_commit is not None:
            try:
                self.on_commit(entry, job)
            except Exception as exc:
                log.warning("after committing %s: %s", entry.id, exc)
        self._discard(job, None)
