"""The callback's local files: the folder they live in, how a checkpoint names them, how resume puts them back, and
(``prune_local``) which of them retention has made obsolete.

The run's index is input, not instructions. A checkpoint names the file Keras wrote by its path relative to the
callback's own folder (``local_file`` in the entry's ``meta``); the folder itself comes from the current
``filepath`` (its directory, up to the first ``{...}`` field), never from the index. A name that is not a plain
relative path (see :class:`~cloudckpt.keras.state.CheckpointMeta`), that Keras could not have written for this
``filepath`` (another suffix), that the checkpoint does not hold, or that leads out of the folder (through ``..`` or a
link) is skipped with a warning. Nothing is ever written or removed outside the folder, and nothing that exists there
is replaced.

Example:
    >>> str(local_root("/jobs/7/ckpt/{epoch:02d}/m.keras"))
    '/jobs/7/ckpt'
    >>> local_name(local_root("/jobs/7/ckpt/m.keras"), "/jobs/7/ckpt/m.keras")
    'm.keras'
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import localfs
from ..errors import CheckpointNotFoundError, CloudCkptError, IntegrityError, UnsafePathError
from ..manifest import CheckpointEntry, check_relative_path
from ..store import CheckpointStore
from ..uploader import Job
from .state import CheckpointMeta

log = logging.getLogger(__name__)

KERAS_SUFFIXES = (".weights.h5", ".keras", ".h5")  # what ModelCheckpoint writes (longest first)


def local_root(filepath: str) -> Path | None:
    """The callback's folder: the absolute directory of ``filepath`` up to its first ``{...}`` field; None for a
    remote ``filepath`` (``gs://...``), whose files are Keras' own business."""
    if "://" in str(filepath):
        return None
    fixed = []
    for part in Path(os.path.abspath(filepath)).parent.parts:
        if "{" in part:
            break
        fixed.append(part)
    return Path(*fixed)


def keras_suffix(filepath: str) -> str | None:
    """The file ending Keras requires for ``filepath`` (``.weights.h5``, ``.keras`` or ``.h5``), or None."""
    return next((s for s in KERAS_SUFFIXES if str(filepath).endswith(s)), None)


def local_name(root: Path | None, path: str) -> str | None:
    """``path`` (a file Keras just wrote) relative to ``root`` as a POSIX path, or None when it is not inside."""
    if root is None or "://" in path:
        return None
    rel = os.path.relpath(os.path.abspath(path), root)
    return None if rel.startswith("..") or os.path.isabs(rel) else Path(rel).as_posix()


def target_of(root: Path, name: Any, suffix: str | None) -> Path:
    """Where the file a checkpoint calls ``name`` lives in ``root``; UnsafePathError unless it is a plain relative
    path with the ``suffix`` Keras writes, that stays inside ``root`` (links resolved)."""
    check_relative_path(name)
    if suffix is None or not name.endswith(suffix) or name.rsplit("/", 1)[-1].startswith("."):
        raise UnsafePathError(f"{name!r} is not a file name Keras writes for this filepath (*{suffix})")
    target = root.joinpath(*name.split("/"))
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(target.parent)]) != real_root:
        raise UnsafePathError(f"{name!r} leads out of {root} through a link")
    return target


def live_files(root: Path | None, entries: Iterable[CheckpointEntry], suffix: str | None) -> set[str]:
    """Absolute paths (inside ``root``) of the local files the listed ``entries`` name; unsafe names are ignored."""
    live: set[str] = set()
    if root is None:
        return live
    for entry in entries:
        try:
            meta = CheckpointMeta.of(entry.meta)
            live.add(str(target_of(root, meta.local_file or meta.file, suffix)))
        except IntegrityError:  # UnsafePathError is one too
            continue
    return live


class LocalFiles:
    """The local files Keras wrote in one fit, oldest first, and (``prune_local``) the removal of those whose
    checkpoints retention has removed from the store. Only files inside the callback's folder are candidates, the
    most recent one never, and only files whose checkpoint was seen committed (listed, or reported by the uploader)
    and is no longer listed: a file whose checkpoint is still uploading, queued or failed is not "pruned" but not yet
    listed, and stays.

    Args:
        filepath: the callback's ``filepath``.
    """

    def __init__(self, filepath: str) -> None:
        self.root, self.suffix = local_root(filepath), keras_suffix(filepath)
        self._files: dict[str, None] = {}
        self._committed: set[str] = set()  # absolute paths of files whose checkpoint was seen committed
        self._jobs: dict[str, Job] = {}  # absolute path -> the upload job of its checkpoint
        self._lock = threading.Lock()

    def wrote(self, path: str) -> str | None:
        """Record that Keras just wrote ``path``; return its name relative to the callback's folder (None if
        outside)."""
        with self._lock:
            self._files.pop(path, None)
            self._files[path] = None
            self._committed.discard(os.path.abspath(path))  # new bytes: their checkpoint isn't committed yet
            self._jobs.pop(os.path.abspath(path), None)
        return local_name(self.root, path)

    def queued(self, path: str, job: Job) -> None:
        """Record the upload ``job`` of the checkpoint that holds ``path``: a job superseded before its upload
        (a newer checkpoint replaced it in the queue) will never be committed, so its file is not kept for it."""
        with self._lock:
            self._jobs[os.path.abspath(path)] = job

    def _superseded(self, path: str) -> bool:
        job = self._jobs.get(path)
        return job is not None and job.superseded

    def release(self, path: str) -> None:
        """Before Keras writes ``path``: unlink it if a snapshot still holds its inode (a hard link in staging), so
        Keras writes a new file instead of changing the snapshot."""
        try:
            if "://" not in path and os.stat(path).st_nlink > 1:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def prune(self, store: CheckpointStore, committed: CheckpointEntry | None = None) -> list[str]:
        """Delete the recorded files whose checkpoints were committed (listed in ``store`` once, or ``committed``:
        the entry the uploader just committed) and that no checkpoint listed in ``store`` names any more; return
        them."""
        try:
            live = live_files(self.root, store.list(), self.suffix)
        except CheckpointNotFoundError:  # nothing committed yet: only superseded files can go
            live = set()
        with self._lock:
            self._committed |= live
            if committed is not None:
                self._committed |= live_files(self.root, [committed], self.suffix)
            paths = list(self._files)[:-1]  # never the most recent file
            doomed = [p for p in paths if local_name(self.root, p) and os.path.abspath(p) not in live
                      and (os.path.abspath(p) in self._committed or self._superseded(os.path.abspath(p)))]
            for p in doomed:
                del self._files[p]
                self._committed.discard(os.path.abspath(p))
                self._jobs.pop(os.path.abspath(p), None)
        for p in doomed:
            try:
                os.remove(p)
                log.info("removed local %s (its checkpoint was pruned from the store, or superseded before upload)", p)
            except FileNotFoundError:
                pass
        return doomed


def _copy_new(src: Path, target: Path) -> None:
    """Copy ``src`` to ``target`` through a temporary file beside it; a link or file already there is left alone."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".cloudckpt-tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        os.chmod(tmp, 0o666 & ~localfs.umask())  # mkstemp's 0600 -> the mode Keras' own file would have
        try:
            os.link(tmp, target)  # fails if anything (a file, a link) appeared there meanwhile: never overwrites
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system (FUSE): checked absent just before
            os.replace(tmp, target)
            return
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def restore_local_files(store: CheckpointStore, latest: CheckpointEntry, pulled: Path, staging: Path,
                        filepath: str) -> list[Path]:
    """Put back the user's files of the latest and the best checkpoint that the callback's folder lacks, from
    ``pulled`` (the latest, already downloaded and verified) or a pull of the best into ``staging``. A hostile or
    unusable entry is skipped with a warning: training goes on. Returns the files written."""
    root, suffix = local_root(filepath), keras_suffix(filepath)
    if root is None:
        return []
    wanted = [latest]
    try:
        best = store.best()
        if best.id != latest.id:
            wanted.append(best)
    except CloudCkptError:  # no best, or an index that went bad since: nothing more to put back
        pass
    written = []
    for entry in wanted:
        try:
            meta = CheckpointMeta.of(entry.meta)
            name, stored = meta.local_file or meta.file, meta.file
            if not name or not stored:
                continue  # a state-only checkpoint
            target = target_of(root, name, suffix)
            if meta.local_path and os.path.abspath(meta.local_path) != str(target):
                log.warning("checkpoint %s names its local file %r, not %s in this callback's folder: ignored",
                            entry.id, meta.local_path, target)
            if stored not in {f.path for f in entry.files}:
                raise UnsafePathError(f"the checkpoint holds no file {stored!r}")
            if os.path.lexists(target):
                continue
            src = pulled if entry.id == latest.id else store.pull(entry.id, to=staging).path
            _copy_new(src.joinpath(*stored.split("/")), target)
        except (CloudCkptError, OSError) as exc:  # CheckpointNotFoundError is an OSError too
            kind = "pruned meanwhile" if isinstance(exc, CheckpointNotFoundError) else "skipped"
            log.warning("not restoring the local file of checkpoint %s (%s): %s", entry.id, kind, exc)
            continue
        log.info("restored %s from checkpoint %s", target, entry.id)
        written.append(target)
    return written
