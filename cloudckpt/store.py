"""CheckpointStore: a run at one URL — push, list, pull, prune, verify, gc. It only composes the parts below it.

A push uploads and checks every file under ``<run>/<id>/``, writes the checkpoint's manifest, then adds the entry
to the index with a compare-and-swap (applying the run's retention in the same update), then deletes what was
pruned. Readers trust only the index, so a crash at any step leaves either the old index or the new one. Where the
objects live is :mod:`cloudckpt.layout`; the index changes are the pure functions of :mod:`cloudckpt.changes`.
"""

from __future__ import annotations

import builtins
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import cancel, failpoints, layout, retry
from .backends import open_backend
from .busy import BusySet as BusySet
from .cache import Cache
from .changes import Change, commit_checkpoint, discard_checkpoints, label_checkpoint, prune_checkpoints
from .commit import IndexKeeper, OutcomeUnknownError, Update
from .condemn import commit_refusal, reserve
from .errors import CheckpointCondemnedError, CheckpointNotFoundError, ConfigurationError, IntegrityError
from .inline import encode, inline_contents, split_inline, stored_files
from .labels import tag_problem
from .manifest import CheckpointEntry, FileEntry, Index, Manifest, WriterLease, dump, utcnow
from .metrics import finite_metrics
from .progress import byte_progress
from .pull_plan import Step, plan, summary
from .repair import RepairPlan, repair_index
from .restore import pull_into
from .retention import Retention
from .sweep import GcReport as GcReport
from .sweep import collect
from .transfer import LocalFile, read_inline, read_manifest, scan, upload_all, verify_stored

log = logging.getLogger(__name__)

#: uploads of one push whose checkpoint gc condemned each time before it was committed
PUSH_ATTEMPTS = 3


@dataclass(frozen=True)
class PullResult:
    """What a pull restored: the entry, the local directory, the ids it skipped because they failed to verify, and
    where its files came from (files and bytes per source: :func:`cloudckpt.pull_plan.summary`)."""

    entry: CheckpointEntry
    path: Path
    skipped: tuple[str, ...] = ()
    sources: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyResult:
    id: str
    ok: bool
    error: str | None = None


def _candidates(index: Index | None, chosen: CheckpointEntry, *, fallback: bool,
                failed: Iterable[str]) -> list[CheckpointEntry]:
    """What a pull tries, in order: ``chosen``, then with ``fallback`` each older checkpoint of ``index`` (all
    listed), newest first; none that already ``failed``."""
    order = list(index.checkpoints) if index is not None else [chosen]
    older = list(reversed(order[:order.index(chosen)])) if fallback else []
    skip = set(failed)
    return [c for c in [chosen, *older] if c.id not in skip]


def _entry(**fields: Any) -> CheckpointEntry:
    """The index entry of a push; ConfigurationError for what the caller gave that the schema refuses."""
    try:
        return CheckpointEntry(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigurationError(f"checkpoint {fields['id']}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _policy(policy: Retention | None, **settings: Any) -> Retention:
    """One policy object from ``policy=`` or the shorthand keyword settings (not both)."""
    given = {k: v for k, v in settings.items() if v is not None}
    if policy is not None and given:
        raise ConfigurationError(f"give policy= or {', '.join(sorted(given))}, not both")
    return policy if policy is not None else Retention(**given)


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
        cache_dir: the node-level pull cache (:mod:`cloudckpt.cache`); default ``$CLOUDCKPT_CACHE_DIR``, else none.
        cache_size: its bound in bytes (or ``"20G"``); default ``$CLOUDCKPT_CACHE_SIZE``, else 20 GiB.
        **storage_options: passed to the backend (fsspec/boto3/google-cloud-storage options such as
            ``endpoint_url``, ``key``, ``token``; plus ``verify_readback=True`` to re-download every upload).
    """

    def __init__(self, url: str | os.PathLike[str] | None = None, *, budget: float = 300.0, workers: int = 8,
                 progress: bool | None = False, writer_id: str | None = None, cache_dir: str | Path | None = None,
                 cache_size: int | str | None = None, **storage_options: Any) -> None:
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
        self.cache = Cache.configured(cache_dir, cache_size)
        self._busy = BusySet()  # in flight or being restored by this process: never pruned

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def close(self, *, interrupted: bool = False) -> None:
        """Stop the transfer threads; ``interrupted``: without waiting for a read stuck in the network."""
        self._pool.shutdown(wait=not interrupted, cancel_futures=interrupted)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(interrupted=kind is not None and issubclass(kind, KeyboardInterrupt))

    # --- reading -----------------------------------------------------------------------------------------------

    def index(self) -> Index:
        """The run's index with every checkpoint listed, sealed segments read and checked (IntegrityError when one
        is missing or altered); CheckpointNotFoundError when there is no run at the URL."""
        return self.keeper.read_all(self.keeper.read_existing())

    def list(self) -> list[CheckpointEntry]:
        """Committed checkpoints, oldest first."""
        return list(self.index().checkpoints)

    def get(self, selector: str | int) -> CheckpointEntry:
        """``best``, ``latest``, an epoch number or a checkpoint id. ``best`` and ``latest`` are read from the
        index's head alone; an epoch or id not there is looked up in the sealed segments."""
        head = self.keeper.read_existing()
        try:
            return head.resolve(selector)
        except CheckpointNotFoundError:
            if not head.segments:
                raise
        return self.keeper.read_all(head).resolve(selector)

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
             policy: Retention | None = None, monitor: str | None = None, mode: str | None = None,
             keep_best: int | None = None, keep_last: int | None = None, keep_every: int | None = None,
             sha256: bool = False, prune: bool = True, inline_small: bool = False) -> CheckpointEntry:
        """Commit the file or directory at ``source`` as a checkpoint; return its index entry.

        A NaN or infinite metric is recorded as no value (left out, warned once: :mod:`cloudckpt.metrics`).

        With ``inline_small`` the small files (:mod:`cloudckpt.inline`: each up to 256 KiB, 1 MiB in all) ride inside
        the checkpoint's manifest object instead of taking a PUT each; a pull materializes them like any file.

        The settings given in ``policy`` (or as ``monitor``/``mode``/``keep_*``, not both) become the run's policy;
        with ``prune`` retention is applied in the same index update (the new checkpoint, the latest, the best and
        pinned ones are always kept).
        """
        policy = _policy(policy, monitor=monitor, mode=mode, keep_best=keep_best, keep_last=keep_last,
                         keep_every=keep_every)
        values = finite_metrics(metrics)  # NaN/inf: no value (cloudckpt.metrics)
        files = scan(source)
        self.backend.ensure_conditional_writes(self.budget)  # refuse a store without CAS before uploading anything
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            cid = layout.new_checkpoint_id(epoch, step)
            try:
                entry, done = self._push_as(cid, files, epoch=epoch, step=step, metrics=values, meta=meta,
                                            policy=policy, sha256=sha256, prune=prune, inline_small=inline_small,
                                            reserve_id=attempt > 1)
                break
            except CheckpointCondemnedError as exc:
                self._discard_upload(cid, [*(f.rel for f in files), layout.MANIFEST_NAME])
                if attempt == PUSH_ATTEMPTS:
                    raise CheckpointCondemnedError(f"{self.url}: {exc}; gave up after {attempt} uploads") from exc
                log.warning("%s at %s; uploading it again as a new checkpoint", exc, self.url)
        failpoints.hit("push.after_index")
        self._delete_checkpoints(done.pruned)
        return entry

    def _push_as(self, cid: str, files: builtins.list[LocalFile], *, epoch: int | None, step: int | None,
                 metrics: dict[str, float], meta: Mapping[str, str] | None, policy: Retention, sha256: bool,
                 prune: bool, inline_small: bool, reserve_id: bool) -> tuple[CheckpointEntry, Update]:
        """Upload ``files`` as checkpoint ``cid`` (``reserve_id``: reserved in the index first) and commit it;
        CheckpointCondemnedError when gc condemned ``cid`` meanwhile (then a failed upload or manifest write was gc
        deleting its objects, not the store failing)."""
        if reserve_id:  # gc condemned this push's upload before: make sure it doesn't again
            self.keeper.apply(lambda index: Change(reserve(index, cid)), what=f"reserve {cid}")
        began = self.keeper.seq_floor()  # before any object of cid exists: gc can only condemn cid after this
        with self._busy.holding(cid):
            t0 = time.monotonic()
            try:
                big, small = split_inline(files) if inline_small else (files, [])
                inline = read_inline(small, sha256=sha256, budget=self.budget)
                by_path = {e.path: e for e in self._upload(cid, big, sha256=sha256)} | {e.path: e for e, _ in inline}
                stored = [by_path[f.rel] for f in files]
                entry = _entry(id=cid, epoch=epoch, step=step, created=utcnow(), metrics=metrics,
                               files=tuple(stored), size=sum(e.size for e in stored), writer=self.keeper.writer_id,
                               meta=dict(meta or {}))
                failpoints.hit("push.after_upload")
                self._write_manifest(entry, encode({e.path: data for e, data in inline}))
            except Exception as exc:
                try:
                    why = commit_refusal(self.keeper.read()[0], cid, began=began)
                except Exception:  # the index can't be read either: the upload's own error says more
                    why = None
                if why is None:
                    raise
                raise CheckpointCondemnedError(why) from exc
            failpoints.hit("push.after_manifest")
            done = self._apply(lambda index: commit_checkpoint(index, entry, policy, prune=prune, busy=self._busy.ids(),
                                                               load=self.keeper.segment, began=began),
                               what=f"commit {cid}")
            log.info("committed %s to %s (%d files, %d bytes, %.2fs)", cid, self.url, len(stored), entry.size,
                     time.monotonic() - t0)
        return entry, done

    def _upload(self, cid: str, files: builtins.list[LocalFile], *, sha256: bool) -> builtins.list[FileEntry]:
        """Store and check every file under ``<cid>/``; on failure remove what was stored (best effort), raise."""
        total = sum(f.path.stat().st_size for f in files)
        with cancel.default_sigterm_stops_transfers():
            try:
                with byte_progress(total, f"push {cid}", self.progress) as advance:
                    return upload_all(self.backend, cid, files, sha256=sha256, budget=self.budget, pool=self._pool,
                                      progress=advance)
            except Exception:
                self._discard_upload(cid, [f.rel for f in files])
                raise
            except KeyboardInterrupt:
                cancel.keep(f"push interrupted: the objects uploaded so far stay under {self.url}/{cid}/, "
                            f"uncommitted; `cloudckpt gc` removes them once older than its --min-age (default 1 hour)")
                raise

    def _write_manifest(self, entry: CheckpointEntry, inline: dict[str, str]) -> None:
        data = dump(Manifest(checkpoint=entry, inline=inline))
        key = layout.manifest_key(entry.id)
        retry.run(lambda: self.backend.write_bytes(key, data), url=self.url, what="write manifest", budget=self.budget)

    def _apply(self, change: Callable[[Index], Change], *, what: str) -> Update:
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
            self.backend.delete([layout.object_key(cid, rel) for rel in rels])
        except Exception as exc:  # the original error matters more; gc cleans up later
            log.warning("could not remove the partial upload %s at %s (%s); `cloudckpt gc` removes it later", cid,
                        self.url, " ".join(str(exc).split()))

    def prune(self, *, keep_best: int | None = None, keep_last: int | None = None, keep_every: int | None = None,
              dry_run: bool = False) -> builtins.list[CheckpointEntry]:
        """Delete what retention doesn't keep (the given keep-* settings, else the run's policy); return it.

        The index is updated first, then the objects are deleted; the latest, best, pinned and in-flight
        checkpoints are always kept.
        """
        keep = Retention(keep_best=keep_best, keep_last=keep_last, keep_every=keep_every)
        rules = keep if keep.keeps_some else None
        index = self.keeper.read_existing()  # a missing run is an error, not an empty prune
        load = self.keeper.segment
        if dry_run:
            return list(prune_checkpoints(index, rules, busy=self._busy.ids(), load=load).pruned)
        done = self._apply(lambda index: prune_checkpoints(index, rules, busy=self._busy.ids(), load=load),
                           what="prune")
        failpoints.hit("prune.after_index")
        self._delete_checkpoints(done.pruned)  # what the write that happened pruned, even when its answer was lost
        for c in done.pruned:
            log.info("pruned %s from %s", c.id, self.url)
        return list(done.pruned)

    def discard(self, ids: Iterable[str]) -> builtins.list[CheckpointEntry]:
        """Remove the checkpoints ``ids`` (a framework dropped them) from the index, then their objects; the latest,
        best, pinned and in-flight checkpoints are never removed. Returns what was removed."""
        wanted = frozenset(ids)
        done = self._apply(lambda index: discard_checkpoints(index, wanted, busy=self._busy.ids(),
                                                             load=self.keeper.segment), what="discard")
        self._delete_checkpoints(done.pruned)
        for c in done.pruned:
            log.info("discarded %s from %s", c.id, self.url)
        return list(done.pruned)

    # --- labels ------------------------------------------------------------------------------------------------

    def pin(self, selector: str | int) -> CheckpointEntry:
        """Pin a checkpoint: retention never prunes it (nor ``discard``). Returns its entry."""
        return self._label(str(selector), pinned=True)

    def unpin(self, selector: str | int) -> CheckpointEntry:
        """Unpin a checkpoint: retention decides for it again."""
        return self._label(str(selector), pinned=False)

    def tag(self, selector: str | int, name: str) -> CheckpointEntry:
        """Give a checkpoint the tag ``name`` (taken off any other: a tag names one checkpoint); ``pull(name)``
        restores it. A tag does not keep a checkpoint from retention: pin it for that. ConfigurationError for a
        name :func:`cloudckpt.labels.tag_problem` refuses."""
        problem = tag_problem(name)
        if problem:
            raise ConfigurationError(problem)
        return self._label(str(selector), tag=name)

    def untag(self, selector: str | int, name: str) -> CheckpointEntry:
        """Take the tag ``name`` off a checkpoint; CheckpointNotFoundError if it has no such tag."""
        return self._label(str(selector), untag=name)

    def _label(self, selector: str, **change: Any) -> CheckpointEntry:
        done = self._apply(lambda index: label_checkpoint(index, selector, load=self.keeper.segment, **change),
                           what=f"label {selector}")
        target = self.keeper.read_all(done.before).resolve(selector).id
        return self.keeper.read_all(done.after).get(target)

    def _delete_checkpoints(self, entries: Iterable[CheckpointEntry]) -> None:
        rels = [key for c in entries for key in layout.checkpoint_keys(c.id, (f.path for f in stored_files(c.files)))]
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
        failed: dict[str, str] = {}  # id -> why it failed verification, in the order tried
        for _ in range(3):  # resolve again when the checkpoint being pulled is pruned meanwhile
            index = self.index() if fallback else None  # every checkpoint only when older ones may be tried
            chosen = index.resolve(selector) if index is not None else self.get(selector)
            result = self._pull_first(index, chosen, Path(to), fallback=fallback, failed=failed)
            if result is not None:
                if result.skipped:  # one line for the event: what was restored, what failed and why
                    log.warning("restored %s instead of %s, which failed verification (%s: %s)", result.entry.id,
                                " and ".join(result.skipped), result.skipped[0], failed[result.skipped[0]])
                return result
        raise CheckpointNotFoundError(f"{self.url}: {selector} kept being pruned while it was pulled")

    def _pull_first(self, index: Index | None, chosen: CheckpointEntry, to: Path, *, fallback: bool,
                    failed: dict[str, str]) -> PullResult | None:
        """Pull ``chosen`` or, with ``fallback``, the newest older one that verifies, recording each that doesn't in
        ``failed``; None when one was pruned while it was pulled (the selector must be resolved again)."""
        for cand in _candidates(index, chosen, fallback=fallback, failed=failed):
            steps: builtins.list[Step] = []
            try:
                path = self._pull_listed(cand, to, steps)
            except IntegrityError as exc:
                if not fallback:
                    raise
                log.info("checkpoint %s failed verification (%s); trying an older one", cand.id, exc)
                failed[cand.id] = str(exc)
                continue
            return PullResult(cand, path, tuple(failed), summary(steps)) if path is not None else None
        raise IntegrityError(f"{self.url}: no checkpoint at or before {chosen.id} verifies: "
                             + "; ".join(f"{cid}: {why}" for cid, why in failed.items()))

    def _pull_listed(self, entry: CheckpointEntry, to: Path, steps: builtins.list[Step]) -> Path | None:
        """Pull ``entry`` into ``to``; None when it failed because it is no longer listed (pruned meanwhile)."""
        with self._busy.holding(entry.id), cancel.default_sigterm_stops_transfers():
            try:
                with byte_progress(entry.size, f"pull {entry.id}", self.progress) as advance:
                    return pull_into(self.backend, entry, to, budget=self.budget, pool=self._pool,
                                     progress=advance, source_url=self.url, cache=self.cache, steps=steps)
            except IntegrityError:
                if self._listed(entry.id):
                    raise
                return None

    def plan_pull(self, selector: str | int = "latest", to: str | Path = "checkpoint"
                  ) -> tuple[CheckpointEntry, builtins.list[Step]]:
        """What :meth:`pull` would do, nothing fetched or written: the checkpoint, and for each file where its bytes
        would come from (:mod:`cloudckpt.pull_plan`; inline files ride in the manifest and are not listed)."""
        entry = self.get(selector)
        return entry, plan(stored_files(entry.files), Path(to), self.cache, self._pool)

    def _listed(self, cid: str) -> bool:
        """Whether the run lists ``cid`` now (the head first, the segments only when it isn't there)."""
        head = self.keeper.read_existing()
        if any(c.id == cid for c in head.checkpoints):
            return True
        return bool(head.segments) and any(c.id == cid for c in self.keeper.read_all(head).checkpoints)

    def verify(self, selector: str | int | None = "latest", *, all: bool = False) -> builtins.list[VerifyResult]:
        """Download and check every file (and the manifest) of one checkpoint, or of all with ``all=True``."""
        targets = self.list() if all else [self.get(selector if selector is not None else "latest")]
        results = []
        for entry in targets:
            try:
                manifest = read_manifest(self.backend, entry.id, budget=self.budget)
                inline = inline_contents(manifest, entry)  # the manifest is the entry's; inline bytes checked
                with byte_progress(entry.size, f"verify {entry.id}", self.progress) as advance:
                    advance(sum(len(data) for data in inline.values()))
                    verify_stored(self.backend, entry.id, stored_files(entry.files), budget=self.budget,
                                  pool=self._pool, progress=advance)
                results.append(VerifyResult(entry.id, True))
            except (IntegrityError, FileNotFoundError) as exc:
                results.append(VerifyResult(entry.id, False, str(exc)))
        return results

    def repair(self, *, dry_run: bool = False) -> RepairPlan:
        """Rewrite the index without what a reader refuses or tolerates (:mod:`cloudckpt.repair`): malformed entries
        removed, ``null`` metrics dropped, with the compare-and-swap of every update. Returns the plan carried out
        (``plan.index`` None: nothing to fix); IntegrityError for what repair can't fix (nothing is written)."""
        return repair_index(self.backend, budget=self.budget, dry_run=dry_run)

    def gc(self, *, dry_run: bool = False, min_age: float = 3600.0) -> GcReport:
        """Delete objects no committed checkpoint owns (left by crashed, fenced or refused commits) and temporary
        files. Safe beside live writers whatever ``min_age``: unowned checkpoints and segments are condemned in the
        index before they are deleted (:mod:`cloudckpt.condemn`); ``min_age`` (seconds) only spares younger ones a
        re-upload. ``dry_run`` writes nothing, the index included."""
        return collect(self.backend, self.keeper, budget=self.budget, dry_run=dry_run, min_age=min_age,
                       busy=self._busy.ids)
