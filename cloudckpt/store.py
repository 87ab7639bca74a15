"""CheckpointStore: a run at one URL — push, list, pull, prune, verify, gc. It only composes the parts below it.

A push uploads and checks every file under ``<run>/<id>/``, writes the checkpoint's manifest, then adds the entry
to the index with a compare-and-swap (applying the run's retention in the same update), then deletes what was
pruned. Readers trust only the index, so a crash at any step leaves either the old index or the new one.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import failpoints, retry
from .backends import open_backend
from .commit import IndexKeeper, OutcomeUnknownError, Update
from .errors import CheckpointNotFoundError, ConfigurationError, IntegrityError
from .garbage import plan_gc
from .manifest import (
    MANIFEST_NAME,
    CheckpointEntry,
    Index,
    Manifest,
    RunPolicy,
    WriterLease,
    dump,
    parse_manifest,
    utcnow,
)
from .progress import byte_progress
from .restore import pull_into
from .retention import Record, plan_prune, policy_from
from .transfer import scan, upload_all, verify_stored

log = logging.getLogger(__name__)


def new_checkpoint_id(epoch: int | None, step: int | None) -> str:
    parts = ["ckpt"]
    if epoch is not None:
        parts.append(f"e{epoch:06d}")
    if step is not None:
        parts.append(f"s{step:010d}")
    parts.append(uuid.uuid4().hex[:8])
    return "-".join(parts)


@dataclass(frozen=True)
class PullResult:
    """What a pull restored: the entry, the local directory, and the ids it skipped because they failed to verify."""

    entry: CheckpointEntry
    path: Path
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyResult:
    id: str
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class GcReport:
    deleted: list[str] = field(default_factory=list)
    bytes: int = 0
    checkpoints: list[str] = field(default_factory=list)
    kept_young: list[str] = field(default_factory=list)
    dry_run: bool = False


def _records(index: Index) -> list[Record]:
    return [Record(c.id, c.epoch, c.step, c.metrics, c.pinned) for c in index.checkpoints]


class CheckpointStore:
    """A training run's checkpoints at one URL.

    Example:
        >>> import tempfile, pathlib
        >>> run = tempfile.mkdtemp()
        >>> src = pathlib.Path(tempfile.mkdtemp()) / "model.weights.h5"
        >>> _ = src.write_bytes(b"weights")
        >>> with CheckpointStore(run) as store:
        ...     entry = store.push(src, epoch=1, step=10, metrics={"val_loss": 0.5}, monitor="val_loss")
        ...     pulled = store.pull("best", to=tempfile.mkdtemp() + "/restored")
        >>> (pulled.path / "model.weights.h5").read_bytes()
        b'weights'

    Args:
        url: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///path`` or a local path. Default:
            ``$CLOUDCKPT_REMOTE``.
        budget: wall-clock seconds each logical operation (one file's upload, one index update) may retry for.
            Default 300.
        workers: parallel file transfers and checksums. Default 8.
        progress: byte progress bars on stderr; None shows them only on a terminal. Default False.
        writer_id: this writer's name in the index; default ``host:pid:random``.
        **storage_options: passed to the backend (fsspec/boto3/google-cloud-storage options such as
            ``endpoint_url``, ``key``, ``token``; plus ``verify_readback=True`` to re-download every upload).
    """

    def __init__(self, url: str | None = None, *, budget: float = 300.0, workers: int = 8,
                 progress: bool | None = False, writer_id: str | None = None, **storage_options: Any) -> None:
        url = url or os.environ.get("CLOUDCKPT_REMOTE")
        if not url:
            raise ConfigurationError("no store URL given and $CLOUDCKPT_REMOTE is not set")
        if budget <= 0 or workers < 1:
            raise ConfigurationError(
                f"budget must be > 0 and workers >= 1. Received: budget={budget}, workers={workers}")
        self.backend = open_backend(url, storage_options)
        self.url = self.backend.url
        self.budget = budget
        self.progress = progress
        self.keeper = IndexKeeper(self.backend, budget=min(budget, 120.0), writer_id=writer_id)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cloudckpt-io")
        self._busy: set[str] = set()  # in flight or being restored by this process: never pruned
        self._busy_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _hold(self, cid: str, on: bool) -> None:
        with self._busy_lock:
            (self._busy.add if on else self._busy.discard)(cid)

    # --- reading -----------------------------------------------------------------------------------------------

    def index(self) -> Index:
        """The run's index; CheckpointNotFoundError when there is no run at the URL."""
        return self.keeper.read_existing()

    def list(self) -> list[CheckpointEntry]:
        """Committed checkpoints, oldest first."""
        return list(self.index().checkpoints)

    def get(self, selector: str | int) -> CheckpointEntry:
        """``best``, ``latest``, an epoch number or a checkpoint id."""
        return self.index().resolve(selector)

    def best(self) -> CheckpointEntry:
        return self.get("best")

    def latest(self) -> CheckpointEntry:
        return self.get("latest")

    # --- writing -----------------------------------------------------------------------------------------------

    def claim(self) -> WriterLease:
        """Become this run's only writer; earlier writers get StaleWriterError on their next commit."""
        return self.keeper.claim()

    def push(self, source: str | Path, *, epoch: int | None = None, step: int | None = None,
             metrics: Mapping[str, float] | None = None, meta: Mapping[str, str] | None = None,
             monitor: str | None = None, mode: str | None = None, keep_best: int | None = None,
             keep_last: int | None = None, keep_every: int | None = None, sha256: bool = False,
             prune: bool = True) -> CheckpointEntry:
        """Commit the file or directory at ``source`` as a checkpoint; return its index entry.

        ``monitor``/``mode``/``keep_*``, when given, become the run's policy; retention is applied in the same index
        update (the new checkpoint, the latest, the best and pinned ones are always kept).
        """
        if mode not in (None, "min", "max"):
            raise ConfigurationError(f"mode must be 'min' or 'max'. Received: mode={mode!r}")
        files = scan(source)
        self.backend.ensure_conditional_writes(self.budget)  # refuse a store without CAS before uploading anything
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        cid = new_checkpoint_id(epoch, step)
        self._hold(cid, True)
        try:
            t0 = time.monotonic()
            total = sum(f.path.stat().st_size for f in files)
            try:
                with byte_progress(total, f"push {cid}", self.progress) as advance:
                    entries = upload_all(self.backend, cid, files, sha256=sha256, budget=self.budget, pool=self._pool,
                                         progress=advance)
            except Exception:
                self._discard_upload(cid, [f.rel for f in files])
                raise
            total = sum(e.size for e in entries)
            entry = CheckpointEntry(id=cid, epoch=epoch, step=step, created=utcnow(), metrics=metrics,
                                    files=tuple(entries), size=total, writer=self.keeper.writer_id,
                                    meta=dict(meta or {}))
            failpoints.hit("push.after_upload")
            manifest = dump(Manifest(checkpoint=entry))
            retry.run(lambda: self.backend.write_bytes(f"{cid}/{MANIFEST_NAME}", manifest), url=self.url,
                      what="write manifest", budget=self.budget)
            failpoints.hit("push.after_manifest")
            overrides = {k: v for k, v in dict(monitor=monitor, mode=mode, keep_best=keep_best, keep_last=keep_last,
                                                keep_every=keep_every).items() if v is not None}

            def change(index: Index) -> Index | None:
                if any(c.id == cid for c in index.checkpoints):
                    return None  # defensive: only this push adds cid, and a write that happened is never re-applied
                new = index
                if overrides:
                    run = RunPolicy.model_validate({**index.run.model_dump(), **overrides})
                    if run != index.run:
                        new = new.with_policy(run)
                new = new.with_checkpoint(entry)
                if prune:
                    doomed = self._plan(new, None)
                    new = new.without(doomed) if doomed else new
                return new

            done = self._apply(change, what=f"commit {cid}")
            pruned = done.removed
            log.info("committed %s to %s (%d files, %d bytes, %.2fs)", cid, self.url, len(entries), total,
                     time.monotonic() - t0)
        finally:
            self._hold(cid, False)
        failpoints.hit("push.after_index")
        self._delete_checkpoints(pruned)
        return entry

    def _apply(self, change: Callable[[Index], Index | None], *, what: str) -> Update:
        """One index update; when its outcome can't be known, still delete what it pruned that is no longer listed
        (a checkpoint once unlisted is never listed again), then raise."""
        try:
            return self.keeper.apply(change, what=what)
        except OutcomeUnknownError as exc:
            self._delete_checkpoints(exc.gone)
            raise

    def _discard_upload(self, cid: str, rels: builtins.list[str]) -> None:
        """Best effort after a failed upload: remove what this push stored (gc removes anything left)."""
        try:
            self.backend.delete([f"{cid}/{rel}" for rel in rels])
        except Exception as exc:  # the original error matters more; gc cleans up later
            log.warning("could not remove the partial upload %s at %s (%s); `cloudckpt gc` will", cid, self.url, exc)

    def _plan(self, index: Index, policy_args: dict | None) -> set[str]:
        run = index.run
        args = policy_args or dict(keep_best=run.keep_best, keep_last=run.keep_last, keep_every=run.keep_every)
        policy = policy_from(**args, monitor=run.monitor, mode=run.mode)
        with self._busy_lock:
            always = {index.latest, index.best, *self._busy} - {None}
        return plan_prune(_records(index), policy, always=always)  # type: ignore[arg-type]

    def prune(self, *, keep_best: int | None = None, keep_last: int | None = None, keep_every: int | None = None,
              dry_run: bool = False) -> builtins.list[CheckpointEntry]:
        """Delete what retention doesn't keep (the given keep-* settings, else the run's policy); return it.

        The index is updated first, then the objects are deleted; the latest, best, pinned and in-flight
        checkpoints are always kept.
        """
        args = None
        if any(v is not None for v in (keep_best, keep_last, keep_every)):
            args = dict(keep_best=keep_best, keep_last=keep_last, keep_every=keep_every)
        planned: list[CheckpointEntry] = []

        def change(index: Index) -> Index | None:
            doomed = self._plan(index, args)
            planned[:] = [c for c in index.checkpoints if c.id in doomed]
            return index.without(doomed) if doomed and not dry_run else None

        self.index()  # a missing run is an error, not an empty prune
        done = self._apply(change, what="prune")
        if dry_run:
            return planned
        pruned = done.removed  # what the write that happened pruned, even when its answer was lost
        failpoints.hit("prune.after_index")
        self._delete_checkpoints(pruned)
        for c in pruned:
            log.info("pruned %s from %s", c.id, self.url)
        return pruned

    def discard(self, ids: Iterable[str]) -> builtins.list[CheckpointEntry]:
        """Remove the checkpoints ``ids`` (a framework dropped them) from the index, then their objects; the latest,
        best, pinned and in-flight checkpoints are never removed. Returns what was removed."""
        wanted = set(ids)

        def change(index: Index) -> Index | None:
            with self._busy_lock:
                keep = {index.latest, index.best, *self._busy} | {c.id for c in index.checkpoints if c.pinned}
            doomed = {c.id for c in index.checkpoints if c.id in wanted} - keep
            return index.without(doomed) if doomed else None

        done = self._apply(change, what="discard")
        self._delete_checkpoints(done.removed)
        for c in done.removed:
            log.info("discarded %s from %s", c.id, self.url)
        return done.removed

    def _delete_checkpoints(self, entries: Iterable[CheckpointEntry]) -> None:
        rels = [f"{c.id}/{f.path}" for c in entries for f in c.files] + [f"{c.id}/{MANIFEST_NAME}" for c in entries]
        if not rels:
            return
        try:
            retry.run(lambda: self.backend.delete(rels), url=self.url, what="delete pruned", budget=self.budget)
        except Exception as exc:  # the index no longer lists them: gc removes what is left
            log.warning("could not delete pruned objects at %s (%s); `cloudckpt gc` will remove them", self.url, exc)

    # --- restoring and checking -------------------------------------------------------------------------------

    def pull(self, selector: str | int = "latest", to: str | Path = "checkpoint", *,
             fallback: bool = False) -> PullResult:
        """Download a checkpoint into directory ``to``, verified, all or nothing.

        With ``fallback``, a checkpoint that fails verification is skipped for the newest older one that verifies.
        """
        skipped: list[str] = []
        errors: list[str] = []
        for _ in range(3):  # re-resolve if the chosen checkpoint is pruned while we download it
            index = self.index()
            chosen = index.resolve(selector)
            order = [c for c in index.checkpoints]
            pos = order.index(chosen)
            candidates = [chosen] + (list(reversed(order[:pos])) if fallback else [])
            for cand in candidates:
                if cand.id in skipped:
                    continue
                self._hold(cand.id, True)
                try:
                    with byte_progress(cand.size, f"pull {cand.id}", self.progress) as advance:
                        path = pull_into(self.backend, cand, Path(to), budget=self.budget, pool=self._pool,
                                         progress=advance, source_url=self.url)
                    if skipped:
                        log.warning("restored %s instead of %s, which failed verification", cand.id, skipped[0])
                    return PullResult(cand, path, tuple(skipped))
                except IntegrityError as exc:
                    if cand.id not in {c.id for c in self.index().checkpoints}:
                        break  # pruned meanwhile: resolve again
                    if not fallback:
                        raise
                    log.warning("checkpoint %s failed verification (%s); trying an older one", cand.id, exc)
                    skipped.append(cand.id)
                    errors.append(f"{cand.id}: {exc}")
                finally:
                    self._hold(cand.id, False)
            else:
                raise IntegrityError(
                    f"{self.url}: no checkpoint at or before {chosen.id} verifies: " + "; ".join(errors))
        raise CheckpointNotFoundError(f"{self.url}: {selector} kept being pruned while it was pulled")

    def verify(self, selector: str | int | None = "latest", *, all: bool = False) -> builtins.list[VerifyResult]:
        """Download and check every file (and the manifest) of one checkpoint, or of all with ``all=True``."""
        index = self.index()
        targets = list(index.checkpoints) if all else [index.resolve(selector if selector is not None else "latest")]
        results = []
        for entry in targets:
            try:
                rel = f"{entry.id}/{MANIFEST_NAME}"
                manifest = parse_manifest(retry.run(lambda: self.backend.read_bytes(rel),  # noqa: B023 (run here)
                                                    url=self.url, what=f"read {rel}", budget=self.budget))
                if manifest.checkpoint != entry:
                    raise IntegrityError(f"{entry.id}: its manifest differs from the index entry")
                with byte_progress(entry.size, f"verify {entry.id}", self.progress) as advance:
                    verify_stored(self.backend, entry.id, entry.files, budget=self.budget, pool=self._pool,
                                  progress=advance)
                results.append(VerifyResult(entry.id, True))
            except (IntegrityError, FileNotFoundError) as exc:
                results.append(VerifyResult(entry.id, False, str(exc)))
        return results

    def gc(self, *, dry_run: bool = False, min_age: float = 3600.0) -> GcReport:
        """Delete objects no committed checkpoint owns (left by crashed commits), older than ``min_age`` seconds."""
        index, _ = self.keeper.read()  # no index yet: a run whose first commit crashed still has leftovers
        objects = retry.run(self.backend.list_objects, url=self.url, what="list objects", budget=self.budget)
        if not objects and not index.checkpoints:
            self.index()  # nothing at all at the URL: say there is no run
        plan = plan_gc(objects, index, now=time.time(), min_age=min_age)
        with self._busy_lock:
            busy = set(self._busy)
        doomed = [rel for rel in plan.delete if rel.split("/", 1)[0] not in busy]
        if doomed and not dry_run:
            # the index may have changed since: never delete what a newer index lists
            fresh, _ = self.keeper.read()
            listed = {f"{c.id}/{f.path}" for c in fresh.checkpoints for f in c.files}
            listed |= {f"{c.id}/{MANIFEST_NAME}" for c in fresh.checkpoints}
            doomed = [rel for rel in doomed if rel not in listed]
            failpoints.hit("gc.before_delete")
            retry.run(lambda: self.backend.delete(doomed), url=self.url, what="gc delete", budget=self.budget)
            log.info("gc removed %d objects (%d bytes) from %s", len(doomed), plan.bytes, self.url)
        return GcReport(doomed, plan.bytes, sorted(plan.checkpoints), sorted(plan.kept_young), dry_run)
